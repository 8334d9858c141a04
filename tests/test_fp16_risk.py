"""Model families reported to overflow in fp16 get a warning when a run computes in fp16 (a T4 with precision auto),
and the non-finite-loss stop message names them; the precision itself is never changed."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers
from typer.testing import CliRunner

from helpers import make_config
from lora_cli.cli import train_app
from lora_cli.precision import choose_precision, fp16_risk
from lora_cli.training.loop import nonfinite_message

T4 = choose_precision("auto", capability=(7, 5))
A100 = choose_precision("auto", capability=(8, 0))
CPU = choose_precision("auto", capability=None)

FRAGILE = [
    (transformers.Gemma2Config, "Gemma 2"),
    (transformers.Gemma3TextConfig, "Gemma 3"),
    (transformers.Gemma3Config, "Gemma 3"),  # the multimodal one: its text config says gemma3_text
    (transformers.Gemma3nTextConfig, "Gemma 3n"),
    (transformers.Qwen3MoeConfig, "Qwen3-MoE"),
    (transformers.Glm4MoeConfig, "GLM-4-MoE"),
    (transformers.GptOssConfig, "gpt-oss"),
]


@pytest.mark.parametrize("config_class,family", FRAGILE, ids=[f for _, f in FRAGILE])
def test_fragile_families_are_warned_about_on_a_t4(config_class, family):
    assert T4.precision == "fp16"  # auto on compute capability 7.5: unchanged by the warning
    warning = fp16_risk(config_class(), T4)
    assert warning.startswith(f"{family} models are reported to break in fp16")
    assert "compute capability 7.5" in warning and "train.precision=fp32" in warning and "bf16" in warning
    assert fp16_risk(config_class(), T4, at_start=False).startswith(family)
    # Not where the run is not fp16: bf16 on an A100, fp32 on CPU.
    assert fp16_risk(config_class(), A100) is None and fp16_risk(config_class(), CPU) is None
    # fp16 asked for on a bf16 GPU is still fp16.
    assert family in fp16_risk(config_class(), choose_precision("fp16", capability=(8, 0)))


def test_a_model_object_works_as_well_as_its_config():
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert "Gemma 2" in fp16_risk(model, T4)


def test_qwen2_is_named_only_when_the_loss_goes_non_finite():
    # Mixed reports (NaN losses in fp16 SFT; Qwen2.5-0.5B trains in fp16 in unsloth's T4 test): no warning up front.
    assert fp16_risk(transformers.Qwen2Config(), T4) is None
    assert fp16_risk(transformers.Qwen2Config(), T4, at_start=False).startswith("Qwen2/Qwen2.5")
    assert fp16_risk(transformers.LlamaConfig(), T4) is None
    assert fp16_risk(transformers.LlamaConfig(), T4, at_start=False) is None


def test_the_stop_message_names_the_family():
    risk = fp16_risk(transformers.Gemma2Config(), T4, at_start=False)
    message = nonfinite_message(10, T4, 2e-4, risk)
    assert "non-finite" in message and "Gemma 2" in message and message.endswith(risk)
    assert nonfinite_message(10, T4, 2e-4) == nonfinite_message(10, T4, 2e-4, None)
    plus = " ".join(nonfinite_message(10, T4, 2e-4, None, 500).split())
    assert "lower train.learning_rate (now 0.0002) or lora.loraplus_lr_ratio (now 500, so lora_B learns at 0.1)" in plus
    assert "loraplus" not in nonfinite_message(10, T4, 2e-4)


def test_lora_train_prints_the_warning_and_adds_it_to_the_stop_message(tmp_path, trainable_model_dir, monkeypatch):
    """The wiring: the start of a run and the non-finite stop (fp16 cannot run on this CPU, so the check is faked)."""
    import lora_cli.losses as losses_module
    import lora_cli.training.loop as loop_module

    train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function

    calls = []

    def fake_risk(model, precision, at_start=True):
        calls.append((type(model).__name__, precision.precision, at_start))
        return "START RISK" if at_start else "STOP RISK"

    monkeypatch.setattr(train_module, "fp16_risk", fake_risk)
    monkeypatch.setattr(loop_module, "fp16_risk", fake_risk)
    monkeypatch.setattr(losses_module, "causal_lm_loss", lambda model, batch, **kw: (torch.tensor(float("nan")), 1))
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_nonfinite_steps": 2})
    result = CliRunner().invoke(train_app, [str(config)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "warning: START RISK" in text and text.endswith("Note: STOP RISK")
    assert calls == [("LlamaForCausalLM", "fp32", True), ("LlamaForCausalLM", "fp32", False)]
