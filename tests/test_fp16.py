"""fp16 on a T4, tested on the CPU: the pieces under fp16 autocast and a loss scale, and the real training entry
point under emulated fp16 AMP (tests/amp_emulation.py: fp16 base, fp32 LoRA, fp16 autocast, GradScaler).

fp16 matmuls are ~100x slower than fp32 ones on this CPU: everything here is tiny (hidden 32, a few steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import amp_emulation
from helpers import make_config
from lora_cli.cli import train_app
from lora_cli.config import load_config
from lora_cli.errors import UserError
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.lora import LoraLinear
from lora_cli.losses import head_cross_entropy
from lora_cli.models import load_base_model
from lora_cli.packing import check_packing_supported
from lora_cli.train import train

runner = CliRunner()
FP16_ADVICE = ("train.precision=bf16", "train.precision=fp32")


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl, parsed strictly: NaN or Infinity in it (not JSON) fail the test."""
    def refuse(name):
        raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def overflowing_model_dir(tmp_path_factory):
    return amp_emulation.save_overflowing_model(tmp_path_factory.mktemp("overflowing") / "llama")


# --- the fused LoRA node: scaling < 1 must not overflow before the plain path -----------------------------------


def _scaled_grads_finite(layer: LoraLinear, x: torch.Tensor, fused: bool, loss_scale: float) -> dict[str, bool]:
    """Backward of a loss times `loss_scale` under CPU fp16 autocast (what GradScaler does): which grads are finite."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    LoraLinear.use_fused = fused
    try:
        torch.manual_seed(1)  # the same dropout mask for both paths
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(x)
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape) * 2.0**-8
        ((out.float() * weights).sum() * loss_scale).backward()
    finally:
        LoraLinear.use_fused = True
    grads = {"lora_A": layer.lora_A.weight.grad, "lora_B": layer.lora_B.weight.grad, "x": x.grad}
    return {name: bool(torch.isfinite(g).all()) for name, g in grads.items()}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_node_overflows_no_earlier_than_the_plain_path_when_scaling_is_below_one(kind, dropout):
    """alpha/r = 1/16: the fused node used to form the rank-r products unscaled in fp16 and scale them afterwards,
    so its grads of lora_B and x overflowed at a 4x lower loss scale than the plain composition's (measured here)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96) if kind == "linear" else transformers.pytorch_utils.Conv1D(96, 64)
    layer = LoraLinear.from_base(base.requires_grad_(False).half(), r=16, alpha=1.0, dropout=dropout).train()
    assert layer.scaling == 1 / 16
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.5)
    x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(2)).half()
    exponents = range(12, 30)
    highest_finite = {}
    for fused in (True, False):
        finite = [_scaled_grads_finite(layer, x, fused, 2.0**k) for k in exponents]
        highest_finite[fused] = {name: max((k for k, f in zip(exponents, finite) if f[name]), default=None)
                                 for name in finite[0]}
    plain, fused = highest_finite[False], highest_finite[True]
    # The plain path overflows inside the range tried, so the comparison means something.
    assert all(k is not None and k < exponents[-1] for k in plain.values()), plain
    for name in plain:
        assert fused[name] >= plain[name], (name, fused, plain)


# --- the chunked loss: its backward multiplier under a loss scale ------------------------------------------------


def test_frozen_head_loss_backward_at_one_trained_token_and_the_initial_loss_scale():
    """GradScaler starts at 2^16; with one trained token the loss's backward multiplier is 65536, beyond fp16's
    largest value (65504), although its product with the loss's input gradient is small. It used to be cast to fp16
    first (inf), which made the scaler skip the step."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 384, bias=False).half().requires_grad_(False)
    hidden = torch.randn(1, 32).half().requires_grad_(True)
    target = torch.tensor([7])
    with torch.autocast("cpu", dtype=torch.float16):
        loss = head_cross_entropy(head, hidden, target)
    (loss * 2.0**16).backward()
    reference = hidden.detach().float().requires_grad_(True)
    reference_loss = torch.nn.functional.cross_entropy(reference @ head.weight.float().t(), target, reduction="sum")
    (reference_loss * 2.0**16).backward()
    assert hidden.grad.dtype == torch.float16
    assert torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(hidden.grad.float(), reference.grad, rtol=5e-3, atol=5e-3 * reference.grad.abs().max())


# --- the packing check: an fp16 overflow is not a packing problem -------------------------------------------------


def test_packing_check_reports_an_fp16_overflow_as_such(overflowing_model_dir):
    model = load_base_model(str(overflowing_model_dir), torch.float16)
    apply_lora(model, LoraSettings(r=4, alpha=8.0, target_modules="all-linear"))
    with pytest.raises(UserError) as caught:
        check_packing_supported(model, "cpu")
    message = str(caught.value)
    assert "overflows float16" in message and "65504" in message
    assert "data.packing=false does not avoid it" in message
    assert all(advice in message for advice in FP16_ADVICE)
    assert "not supported for this model" not in message
    # The same model in fp32 packs fine: the check itself is right.
    fp32 = load_base_model(str(overflowing_model_dir))
    apply_lora(fp32, LoraSettings(r=4, alpha=8.0, target_modules="all-linear"))
    check_packing_supported(fp32, "cpu")


def test_packed_attention_without_native_grouped_query_support_repeats_k_and_v(monkeypatch):
    """On a T4 sdpa's enable_gqa would force its math kernel (flash, the only kernel that takes it, needs compute
    capability 8.0): the packed attention then repeats k/v per query head. Same losses and gradients as unpacked."""
    import lora_cli.packing as packing
    from helpers import examples, lora_model, loss_and_grads
    from lora_cli import data

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        seen.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False)))
        return real_sdpa(query, key, value, *args, **kwargs)

    assert packing._native_gqa(torch.zeros(1, 4, 2, 8))  # CPU: enable_gqa as it is
    monkeypatch.setattr(packing, "_native_gqa", lambda query: False)
    monkeypatch.setattr(packing.F, "scaled_dot_product_attention", sdpa)
    model = lora_model("llama")  # 4 query heads, 2 k/v heads
    exs = examples([9, 5, 12, 7, 3])
    expected, expected_n, expected_grads = loss_and_grads(model, data.collate(exs, pad_token_id=3))
    packed = data.collate_packed([[exs[0], exs[1], exs[2]], [exs[3], exs[4]]], pad_token_id=3)
    with packing.packed_attention(model, "cpu"):
        seen.clear()
        got, got_n, got_grads = loss_and_grads(model, packed)
    assert seen and set(seen) == {(4, 4, False)}  # k/v repeated to the query heads, no enable_gqa
    assert got_n == expected_n
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# --- the real training entry point under emulated fp16 AMP -----------------------------------------------------


@pytest.fixture
def observed_lora_calls(monkeypatch):
    """(input dtype, base weight dtype, LoRA weight dtype, autocast dtype or None) of every LoRA layer call."""
    calls = []
    real = LoraLinear.forward

    def forward(self, x):
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        calls.append((x.dtype, self.weight.dtype, self.lora_A.weight.dtype, autocast))
        return real(self, x)

    monkeypatch.setattr(LoraLinear, "forward", forward)
    return calls


def test_emulated_fp16_training_tracks_fp32(tmp_path, trainable_model_dir, observed_lora_calls):
    """The issue's measurement as a test: 20 steps on the tiny trainable llama, fp16 AMP vs fp32, losses within a few
    percent at every step (measured: within 0.2%), no step skipped at the default initial scale."""
    curves = {}
    for name in ("fp32", "fp16"):
        folder = tmp_path / name
        folder.mkdir()
        config = make_config(folder, trainable_model_dir("llama"), train={"max_steps": 20})
        if name == "fp32":
            train(load_config(config), quiet=True)
        else:
            observed_lora_calls.clear()
            with amp_emulation.emulated_fp16() as seen:
                train(load_config(config), quiet=True)
        curves[name] = [r for r in metrics(folder / "out") if "loss" in r]
    # It really ran as on a T4: fp16 base, fp32 LoRA weights, fp16 autocast, and the GradScaler scaled every step.
    assert observed_lora_calls and set(observed_lora_calls) == {
        (torch.float16, torch.float16, torch.float32, torch.float16)}
    scaler = seen["accelerators"][-1].scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == amp_emulation.DEFAULT_INIT_SCALE
    fp32, fp16 = ([r["loss"] for r in curves[name]] for name in ("fp32", "fp16"))
    assert len(fp16) == len(fp32) == 20
    assert fp16[-1] < 0.5 * fp16[0], fp16
    for step, (a, b) in enumerate(zip(fp32, fp16), start=1):
        assert abs(b - a) <= 0.03 * a, (step, a, b)
    assert curves["fp16"][-1]["skipped_steps"] == 0
    assert all(math.isfinite(r["grad_norm"]) for r in curves["fp16"])


def test_emulated_fp16_one_trained_token_per_step_does_not_overflow(tmp_path):
    """Every window trains exactly one token (the reply's first: max_length cuts the rest), so the loss's backward
    multiplier is the full initial loss scale, 2^16. No step may be skipped for it.

    The tiny model's embeddings are 10x the default init: with hidden states of ~0.02 the final RMSNorm's backward
    (x 1/rms) overflows fp16 at this scale in any loss implementation, which would hide the loss's own overflow."""
    model_dir = amp_emulation.save_edited_model(tmp_path / "model", lambda m: m.model.embed_tokens.weight.mul_(10))
    rows = [{"messages": [{"role": "user", "content": f"Who is the mayor {i}?"},
                          {"role": "assistant", "content": "The mayor is Orla Fenwick."}]} for i in range(4)]
    config = make_config(tmp_path, model_dir, rows=rows, data={"max_length": 27},
                         train={"max_steps": 3, "micro_batch_size": 1, "learning_rate": 1e-3})
    with amp_emulation.emulated_fp16() as seen:
        result = train(load_config(config), quiet=True)
    assert result.state.global_step == 3 and result.state.tokens_seen == 3  # one trained token per step
    records = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)
    assert seen["accelerators"][-1].scaler.get_scale() == amp_emulation.DEFAULT_INIT_SCALE


@pytest.fixture
def step_grads():
    """The LoRA gradients each applied optimizer step sees (after unscaling and clipping), in step order."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    recorded = []

    def record(optimizer, args, kwargs):
        recorded.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(record)
    yield recorded
    handle.remove()


def test_emulated_fp16_gradient_checkpointing_with_dropout_gives_the_same_grads(tmp_path, trainable_model_dir,
                                                                               step_grads):
    """Non-reentrant checkpointing recomputes each layer in backward: under fp16 autocast it must re-enter autocast
    and replay the same LoRA dropout masks, or the gradients differ from the run without checkpointing."""
    runs = []
    for checkpointing in (False, True):
        folder = tmp_path / str(checkpointing)
        folder.mkdir()
        config = make_config(folder, trainable_model_dir("llama"), lora={"dropout": 0.3},
                             train={"max_steps": 3, "gradient_checkpointing": checkpointing})
        step_grads.clear()
        with amp_emulation.emulated_fp16():
            train(load_config(config), quiet=True)
        runs.append([list(step) for step in step_grads])
    plain, checkpointed = runs
    assert len(plain) == len(checkpointed) == 3
    assert any(g.abs().max() > 0 for g in plain[-1])
    for step, (a_grads, b_grads) in enumerate(zip(plain, checkpointed), start=1):
        for a, b in zip(a_grads, b_grads):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"step {step}")
    # And dropout is really on: a run with another seed draws other masks, hence other gradients.
    folder = tmp_path / "other_seed"
    folder.mkdir()
    step_grads.clear()
    config = make_config(folder, trainable_model_dir("llama"), lora={"dropout": 0.3},
                         train={"max_steps": 3, "seed": 1})
    with amp_emulation.emulated_fp16():
        train(load_config(config), quiet=True)
    assert any(not torch.allclose(a, b) for a, b in zip(plain[-1], step_grads[-1]))


@pytest.mark.parametrize("packing", [True, False])
def test_emulated_fp16_overflowing_model_gives_the_fp16_message(tmp_path, overflowing_model_dir, packing):
    """With packing the packing check meets the overflow first (it used to call it "packing not supported"); without,
    the training loop does (non-finite losses). Both must say it is fp16 and what to use instead, exit 2."""
    config = make_config(tmp_path, overflowing_model_dir, data={"packing": packing},
                         train={"max_steps": 5, "max_nonfinite_steps": 3})
    with amp_emulation.emulated_fp16():
        result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "fp16" in message or "float16" in message
    assert all(advice in message for advice in FP16_ADVICE), message
    assert "not supported for this model" not in message
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# --- skipped steps (issue 14 item 2): what the loop must do with them -------------------------------------------
#
# Expectations, for the loop change to meet:
# * train.max_steps counts APPLIED optimizer updates: TrainState.global_step, the "step" of metrics records and the
#   progress all count applied updates; a step the GradScaler skips (inf/NaN gradients) or a window with a
#   non-finite loss is not one.
# * Skipped steps are reported: every training record of metrics.jsonl keeps the field "skipped_steps" (as today:
#   the running total of skipped steps of either kind so far), TrainState.skipped_steps holds the final total, and
#   the console says how many were skipped.
# * metrics.jsonl is strict JSON: a non-finite grad norm is written as null, never NaN or Infinity.
# * train.max_nonfinite_steps consecutive skips of either kind (scaler overflow or non-finite loss) stop the run
#   with exit code 2 and the fp16 advice (train.precision=bf16 where the GPU has it, else train.precision=fp32);
#   no adapter is saved.


def _applied_updates():
    """Counts the optimizer updates that really ran: AdamW's own step count after its last step call (a skipped
    update is either never called, as GradScaler does for unfused optimizers, or, fused, undone in the kernel)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]

    def seen(optimizer, *args, **kwargs):
        count[0] = max((int(state["step"]) for state in optimizer.state.values() if "step" in state), default=0)

    handle = register_optimizer_step_post_hook(seen)
    return count, handle


def test_emulated_fp16_huge_initial_scale_skips_then_applies_max_steps_updates(tmp_path, trainable_model_dir):
    """init scale 2^40: the first ~25 steps overflow and halve the scale each time; then 4 updates are applied."""
    config = make_config(tmp_path, trainable_model_dir("llama"),
                         train={"max_steps": 4, "max_nonfinite_steps": 64, "logging_steps": 1})
    applied, handle = _applied_updates()
    try:
        with amp_emulation.emulated_fp16(init_scale=2.0**40) as seen:
            result = runner.invoke(train_app, [str(config)])
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    scaler = seen["accelerators"][-1].scaler
    skipped = round(math.log2(2.0**40 / scaler.get_scale()))  # every skip halves the scale (no growth this early)
    assert skipped >= 10  # the test needs many skips to mean something
    assert applied[0] == 4
    out = tmp_path / "out"
    records = [r for r in metrics(out) if "loss" in r]  # strict JSON: no NaN grad norm of a skipped step
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["skipped_steps"] == skipped
    assert all(r["grad_norm"] is None or math.isfinite(r["grad_norm"]) for r in records)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["skipped_steps"] == skipped
    assert f"{skipped} " in result.output and "skipped" in result.output


def test_emulated_fp16_every_step_skipped_stops_with_the_fp16_advice(tmp_path, trainable_model_dir):
    """An infinite loss scale makes every step overflow: after train.max_nonfinite_steps (3) consecutive skips the
    run stops with exit 2 and the fp16 advice, having applied no update and saved no adapter."""
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 5, "max_nonfinite_steps": 3})
    applied, handle = _applied_updates()
    try:
        with amp_emulation.emulated_fp16(init_scale=math.inf):
            result = runner.invoke(train_app, [str(config)])
    finally:
        handle.remove()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "3 updates in a row were skipped" in message and all(advice in message for advice in FP16_ADVICE), message
    assert applied[0] == 0
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_emulation_leaves_accelerate_and_precision_as_they_were(tmp_path, trainable_model_dir):
    """After an emulated run, an ordinary fp32 run in the same process works (AcceleratorState is a singleton)."""
    from lora_cli.precision import choose_precision

    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 1, "overwrite_output_dir": True})
    with amp_emulation.emulated_fp16():
        assert choose_precision("auto").precision == "fp16"
        train(load_config(config), quiet=True)
    assert choose_precision("auto").precision == "fp32"
    result = train(load_config(config), quiet=True)
    assert result.state.global_step == 1
