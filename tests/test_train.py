"""lora-train end to end on tiny models: learning, outputs, determinism, precision choice, errors."""

import importlib
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from helpers import CHAT_ROWS, losses, make_config
from lora_cli.cli import train_app
from lora_cli.config import load_config
from lora_cli.errors import UserError
from lora_cli.precision import choose_precision
from lora_cli.train import train

runner = CliRunner()


def test_loss_falls_by_half_and_outputs_are_complete(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"))
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    curve = losses(out)
    assert len(curve) == 40
    assert curve[-1] < 0.5 * curve[0], curve
    for name in ("adapter_model.safetensors", "adapter_config.json", "lora_config.yaml", "tokenizer.json",
                 "trainer_state.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(trainable_model_dir("llama"))
    # The resolved config reloads to the same settings.
    assert load_config(out / "lora_config.yaml") == load_config(config)


def test_saved_adapter_loads_in_peft_with_same_logits(tmp_path, trainable_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lora_cli.adapter import load_adapter

    model_dir = trainable_model_dir("gpt2")
    config = make_config(tmp_path, model_dir, rows=CHAT_ROWS, lora={"target_modules": None}, train={"max_steps": 5})
    train(load_config(config), quiet=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out")
    ours = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(ours, tmp_path / "out")
    with torch.no_grad():
        expected, got = peft_model.eval()(ids).logits, ours.eval()(ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits, got, atol=1e-4)


def test_same_seed_gives_same_loss_curve(tmp_path, trainable_model_dir):
    curves = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        config = make_config(folder, trainable_model_dir("llama"), train={"max_steps": 6, "learning_rate": 1.0e-3})
        train(load_config(config), quiet=True)
        curves.append(losses(folder / "out"))
    assert curves[0] == curves[1]


def test_checkpoints_eval_and_limit(tmp_path, trainable_model_dir):
    config = make_config(
        tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
        data={"val_size": 4}, train={"max_steps": 6, "save_steps": 2, "save_total_limit": 1, "eval_steps": 3},
    )
    result = train(load_config(config), quiet=True)
    out = tmp_path / "out"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["eval_ppl"] == pytest.approx(torch.tensor(e["eval_loss"]).exp().item(), rel=1e-6) for e in evals)
    assert result.final_eval_loss == evals[-1]["eval_loss"]


def test_gradient_checkpointing_still_trains(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"),
                         train={"gradient_checkpointing": True, "max_steps": 15})
    train(load_config(config), quiet=True)
    curve = losses(tmp_path / "out")
    assert curve[-1] < 0.8 * curve[0]


def test_epochs_decide_steps_with_accumulation(tmp_path, trainable_model_dir):
    # 8 rows, micro batch 2 -> 4 batches an epoch, accumulation 2 -> 2 steps an epoch, 1.5 epochs -> 3 steps.
    config = make_config(tmp_path, trainable_model_dir("llama"), train={
        "max_steps": None, "epochs": 1.5, "micro_batch_size": 2, "gradient_accumulation_steps": 2})
    result = train(load_config(config), quiet=True)
    assert result.state.global_step == 3


def test_dry_run_trains_nothing(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS)
    result = runner.invoke(train_app, [str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "resolved config" in result.output
    assert "trainable params" in result.output
    assert "12 train" in result.output
    assert "0 truncated" in result.output
    assert "Orla Fenwick" in result.output  # the preview of the first example
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # Captured like a pipe, without colour: the trained reply is marked in plain text, and YAML lines stay whole.
    assert "trained tokens between [[ and ]]" in result.output
    example = result.output.split("trained tokens between [[ and ]])", 1)[1]
    marked = example.split("[[", 1)[1].split("]]", 1)[0]
    assert "Orla Fenwick" in marked and "user" not in marked
    long_value = "a prompt long enough to pass the eighty columns a pipe gets by default, and more"
    wide = runner.invoke(train_app, [str(config), "--dry-run", f"train.eval_prompts=[{long_value}]"])
    assert f"eval_prompts: [{long_value}]" in wide.output


def test_overrides_apply(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"))
    result = runner.invoke(train_app, [str(config), "train.max_steps=2", "lora.target_modules=[q_proj]",
                                       "train.learning_rate=1e-3"])
    assert result.exit_code == 0, result.output
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["q_proj"]
    assert len(losses(tmp_path / "out")) == 2


def test_existing_adapter_is_not_overwritten(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 1})
    assert runner.invoke(train_app, [str(config)]).exit_code == 0
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2
    assert "train.overwrite_output_dir" in result.output
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    assert runner.invoke(train_app, [str(config), "train.overwrite_output_dir=true"]).exit_code == 0


def test_nonfinite_loss_stops_with_advice(tmp_path, trainable_model_dir, monkeypatch):
    import lora_cli.losses as losses_module

    def nan_loss(model, batch, **kwargs):
        return torch.tensor(float("nan")), 1

    monkeypatch.setattr(losses_module, "causal_lm_loss", nan_loss)  # what the training step's CausalLMLoss calls
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_nonfinite_steps": 3})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2
    assert "non-finite" in result.output and "train.learning_rate" in result.output
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


BAD_CONFIGS = [
    ({"lora": {"rr": 4}}, "did you mean `lora.r`"),
    ({"train": {"learning_rate": -1}}, "train.learning_rate"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"model": {"name_or_path": "/nonexistent/model"}}, "does not exist"),
    ({"data": {"path": "/nonexistent/data.jsonl"}}, "/nonexistent/data.jsonl"),
    ({"lora": {"target_modules": ["q_proj", "typo_proj"]}}, "typo_proj"),
    ({"train": {"precision": "fp16"}}, "needs a CUDA GPU"),
    ({"data": {"format": "alpaca"}}, "instruction"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_bad_configs_exit_2_with_message(tmp_path, trainable_model_dir, change, message):
    config = make_config(tmp_path, trainable_model_dir("llama"), **change)
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_debug_flag_shows_traceback(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), lora={"rr": 4})
    result = subprocess.run([sys.executable, "-m", "lora_cli", "train", str(config), "--debug"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr  # the same exit code as without --debug
    assert "Traceback (most recent call last)" in result.stderr and "UserError" in result.stderr
    assert "lora.rr: unknown key; did you mean `lora.r`?" in result.stderr.split("UserError")[-1]


@pytest.mark.parametrize(
    "requested,capability,expected",
    [("auto", None, "fp32"), ("auto", (7, 5), "fp16"), ("auto", (8, 0), "bf16"), ("auto", (9, 0), "bf16"),
     ("fp16", (8, 6), "fp16"), ("fp32", (7, 5), "fp32")],
)
def test_precision_choice(requested, capability, expected):
    assert choose_precision(requested, capability).precision == expected


def test_bf16_refused_on_t4():
    with pytest.raises(UserError, match="compute capability 7.5"):
        choose_precision("bf16", (7, 5))


def test_merge_at_end_writes_a_plain_model_equal_to_base_plus_adapter(tmp_path, trainable_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_cli.adapter import load_adapter

    model_dir = trainable_model_dir("llama")
    config = make_config(tmp_path, model_dir, train={"max_steps": 3, "merge_at_end": True})
    result = train(load_config(config), quiet=True)
    merged_dir = tmp_path / "out" / "merged"
    assert result.merged_dir == merged_dir
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert json.loads((merged_dir / "lora_adapter_config.json").read_text())["peft_type"] == "LORA"
    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(reference, tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, reference.eval()(ids).logits, atol=1e-5)


def test_dry_run_over_an_existing_adapter_warns_and_changes_nothing(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 1})
    assert runner.invoke(train_app, [str(config)]).exit_code == 0
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    result = runner.invoke(train_app, [str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "train.overwrite_output_dir" in result.output
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "setting,precision,device,expected",
    [("auto", "fp16", "cuda", torch.float16), ("auto", "bf16", "cuda", torch.bfloat16),
     ("auto", "bf16", "cpu", torch.float32), ("auto", "fp32", "cpu", torch.float32),
     ("bfloat16", "fp32", "cpu", torch.bfloat16)],
)
def test_base_dtype_is_half_only_on_gpu(setting, precision, device, expected):
    from lora_cli.precision import PrecisionChoice, base_dtype

    assert base_dtype(setting, PrecisionChoice(precision, device, "")) == expected


def test_the_model_is_freed_when_train_returns(tmp_path, trainable_model_dir, monkeypatch):
    """No reference cycle keeps the trained model (on a GPU: its memory) alive after train() returns or fails: a
    notebook that trains twice must not hold the first model until Python's cycle collector happens to run."""
    import gc
    import weakref

    train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function

    models = []
    real = train_module.prepare_model_and_data

    def spy(*args, **kwargs):
        loaded = real(*args, **kwargs)
        models.append(weakref.ref(loaded[1]))
        return loaded

    monkeypatch.setattr(train_module, "prepare_model_and_data", spy)
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2, "max_nonfinite_steps": 1})
    gc.disable()
    try:
        train(load_config(config), quiet=True)
        assert models[-1]() is None
        import lora_cli.losses as losses_module

        monkeypatch.setattr(losses_module, "causal_lm_loss", lambda model, batch, **k: (torch.tensor(float("nan")), 1))
        with pytest.raises(UserError):
            train(load_config(config, ["train.overwrite_output_dir=true"]), quiet=True)
        assert models[-1]() is None
    finally:
        gc.enable()


def test_training_never_uses_cudnn_attention(tmp_path, trainable_model_dir, monkeypatch):
    """cuDNN's attention plans a graph per new shape (15 ms a call on an H200): a run uses flash, memory-efficient
    or math attention only, and leaves PyTorch's choice as it found it."""
    import lora_cli.losses as losses_module

    seen = []
    real = losses_module.causal_lm_loss

    def recording(model, batch, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(model, batch, **kwargs)

    monkeypatch.setattr(losses_module, "causal_lm_loss", recording)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2})
    train(load_config(config), quiet=True)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_an_error_during_evaluation_leaves_the_model_training(monkeypatch):
    """evaluate() switches the model to eval mode (dropout off); an error inside (out of memory, Ctrl-C) must switch
    it back, or the rest of a notebook session would train without dropout."""
    import contextlib
    from types import SimpleNamespace

    from lora_cli.data import Example
    from lora_cli.training import evaluation

    def out_of_memory(model, batch):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(evaluation, "causal_lm_loss", out_of_memory)
    model = torch.nn.Linear(2, 2)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device="cpu", autocast=contextlib.nullcontext)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluation.evaluate(model, [Example([1, 2, 3], [1, 2, 3])], 0, 2, accelerator)
    assert model.training
