"""A training step that does not log, evaluate or checkpoint reads nothing back from the device (issue 21).

On a GPU every read of a tensor's value by the host (`.item()`, `.tolist()`, `bool()`/`float()`/`int()` of a tensor,
`.cpu()`, `.numpy()`) waits for the device to finish all the work queued before it; at the sizes T4 users train, a
step is bound by such stalls and by kernel launches, not by arithmetic. On the CPU the tests count them by patching
those methods, over one whole optimizer step of the real training loop (2 micro batches: forward with the model's own
code, backward, clipping, the update, and the collation of the next window), and count the aten operations it
dispatches (each one at least one kernel launch on a GPU) with a TorchDispatchMode.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amp_emulation
from helpers import make_config
from lora_cli.config import load_config
from lora_cli.train import train
from lora_cli.training import loop

READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
PEFT_TRAINER_READS = 8  # PEFT + Trainer, the same step of 2 micro batches (tiny Llama, fp32; counted in issue 21)
CHAT_ROWS = [  # 16-40 tokens each: 2-3 examples a packed row of 64
    {"messages": [{"role": "user", "content": "hi " * (1 + i % 3)},
                  {"role": "assistant", "content": "ok " * (1 + i % 4)}]}
    for i in range(24)
]


class HostReads:
    """Counts the reads of tensor values by the host while `counting`, each with the file that asked for it."""

    def __init__(self):
        self.counting = False
        self.reads: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}

        def wrap(name, original):
            def read(tensor, *args, **kwargs):
                if self.counting:
                    caller = traceback.extract_stack(limit=2)[0]
                    self.reads.append((name, f"{caller.filename}:{caller.lineno}"))
                return original(tensor, *args, **kwargs)

            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def own(self) -> list[tuple[str, str]]:
        package = str(Path(loop.__file__).resolve().parent.parent)
        return [(name, where) for name, where in self.reads if where.startswith(package)]


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def one_step_of_the_loop(monkeypatch, counter, step: int = 2):
    """Count with `counter` (a context manager factory) over optimizer step `step`: from the start of its window's
    forward to the start of the next window's (the loop's own code, the update and the next window's collation)."""
    windows = [0]
    real = loop.accumulate_gradients
    active: list = []

    def marked(*args, **kwargs):
        windows[0] += 1
        if windows[0] == step:
            active.append(counter())
            active[-1].__enter__()
        elif windows[0] == step + 1 and active:
            active.pop().__exit__(None, None, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", marked)


def _config(tmp_path, model_dir, packing: bool):
    return load_config(make_config(
        tmp_path, model_dir, rows=CHAT_ROWS, data={"packing": packing, "max_length": 64},
        # logging, evaluation and checkpoints only at the end: steps 1-3 are plain steps
        train={"max_steps": 4, "logging_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
               "max_grad_norm": 1.0},
    ))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_a_plain_step_reads_nothing_back(tmp_path, trainable_model_dir, monkeypatch, precision, packing):
    """Zero reads from lora-cli's own code, and from the model's forward and torch's update too (PEFT + Trainer: 8):
    fp32, and fp16 AMP with its loss scaler (emulated on the CPU, as on a T4), packed and unpacked."""
    reads = HostReads()

    @contextlib.contextmanager
    def counting():
        reads.counting = True
        yield
        reads.counting = False

    class Toggle:
        def __init__(self):
            self.cm = counting()

        def __enter__(self):
            self.cm.__enter__()

        def __exit__(self, *exc):
            self.cm.__exit__(*exc)

    one_step_of_the_loop(monkeypatch, Toggle)
    emulation = amp_emulation.emulated_fp16() if precision == "fp16" else contextlib.nullcontext()
    with reads.patched(), emulation:
        train(_config(tmp_path, trainable_model_dir("llama"), packing), quiet=True)
    assert reads.own() == [], reads.own()
    assert len(reads.reads) <= 1, reads.reads  # well under PEFT + Trainer's 8
    assert len(reads.reads) < PEFT_TRAINER_READS


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_a_step_dispatches_no_more_aten_ops_than_peft_and_trainer(tmp_path, trainable_model_dir, monkeypatch, packing):
    """On the same examples, 2 micro batches of 2 per step: lora-cli's step (packed or not) dispatches no more aten
    operations than PEFT + Trainer's padded step (Trainer's defaults, as scripts/bench.py runs it)."""
    peft = pytest.importorskip("peft")
    import transformers

    model_dir = trainable_model_dir("llama")
    ours: list[AtenOps] = []
    one_step_of_the_loop(monkeypatch, lambda: ours.append(AtenOps()) or ours[-1])
    train(_config(tmp_path, model_dir, packing), quiet=True)

    theirs = AtenOps()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    from lora_cli.data import build_datasets

    bundle = build_datasets(str(tmp_path / "data.jsonl"), tokenizer, max_length=64, train_on_inputs=True, seed=0)
    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": [ex.input_ids for ex in bundle.train]})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))

    class CountStep(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                theirs.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                theirs.__exit__(None, None, None)

    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "peft"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=2e-2, max_grad_norm=1.0, logging_steps=100, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[CountStep()],
                         data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    ours_total, theirs_total = sum(ours[0].ops.values()), sum(theirs.ops.values())
    print(f"aten ops per step: lora-cli {'packed' if packing else 'unpacked'} {ours_total}, PEFT+Trainer "
          f"{theirs_total}", file=sys.stderr)
    assert theirs_total > 200  # the count saw a whole step
    assert ours_total <= theirs_total, (ours[0].ops.most_common(15), theirs.ops.most_common(15))


# --- skips decided on the device -----------------------------------------------------------------------------------


class InfiniteGradient(torch.autograd.Function):
    """The loss unchanged going forward; an infinite gradient coming back."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_a_nonfinite_gradient_norm_without_a_loss_scaler_skips_and_says_so(tmp_path, trainable_model_dir,
                                                                           monkeypatch):
    """fp32 (no loss scaler): a finite loss whose gradients overflow skips that update, exactly (the weights and
    AdamW's state stay as they were), counts it, and says it was the gradient norm; it used to blame the fp16 loss
    scaler, which an fp32 run does not have."""
    import json

    from typer.testing import CliRunner

    import lora_cli.losses as losses_module
    from lora_cli.cli import train_app

    real, calls = losses_module.causal_lm_loss, [0]

    def overflowing_on_the_third_window(model, batch, **kwargs):
        calls[0] += 1
        loss, n = real(model, batch, **kwargs)
        return (InfiniteGradient.apply(loss) if calls[0] in (5, 6) else loss), n  # both micro batches of window 3

    monkeypatch.setattr(losses_module, "causal_lm_loss", overflowing_on_the_third_window)
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": 4, "logging_steps": 1, "micro_batch_size": 2,
                                "gradient_accumulation_steps": 2, "max_grad_norm": 1.0})
    from torch.optim.optimizer import register_optimizer_step_post_hook

    adam_steps = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, *a, **k: adam_steps.append(max(int(s["step"]) for s in optimizer.state.values())))
    try:
        result = CliRunner().invoke(train_app, [str(config)])
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    assert adam_steps == [1, 2, 2, 3, 4]  # the third call was skipped inside the fused kernel: no step counted
    text = " ".join(result.output.split())
    assert "after step 2: update skipped (the gradient norm was non-finite); 1 skipped so far" in text
    assert "loss scaler" not in text
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 1, 1]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["skipped_steps"] == 1


def test_nonfinite_gradient_norms_in_a_row_stop_the_run(tmp_path, trainable_model_dir, monkeypatch):
    """train.max_nonfinite_steps skips in a row stop the run with exit 2, as non-finite losses do."""
    from typer.testing import CliRunner

    import lora_cli.losses as losses_module
    from lora_cli.cli import train_app

    real = losses_module.causal_lm_loss
    monkeypatch.setattr(losses_module, "causal_lm_loss",
                        lambda model, batch, **kwargs: (InfiniteGradient.apply(real(model, batch)[0]), 1))
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 6, "max_nonfinite_steps": 3})
    result = CliRunner().invoke(train_app, [str(config)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "3 updates in a row were skipped" in text and "gradient norm was non-finite" in text
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_the_loss_sums_kept_on_the_device_hold_no_autograd_graph(tmp_path, trainable_model_dir, monkeypatch):
    """The window's loss sum stays on the device for a whole logging window: were it still attached to the step's
    graph, every step's graph (and what its nodes hold) would stay alive until the next record (seen as peak RSS
    growing by ~90 MB a step on the benchmark's 35M model)."""
    returned = []
    real = loop.accumulate_gradients
    monkeypatch.setattr(loop, "accumulate_gradients", lambda *a, **k: returned.append(real(*a, **k)) or returned[-1])
    train(_config(tmp_path, trainable_model_dir("llama"), packing=False), quiet=True)
    assert len(returned) == 4 and not any(t.requires_grad or t.grad_fn is not None for t in returned)
