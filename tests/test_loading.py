"""The one composed loader: lora-merge and lora-generate pass revision and trust_remote_code to every part of the
load (tokenizer, config lookup, weights), and take the base's revision from the adapter when none is given."""

from __future__ import annotations

import importlib
import json

import pytest
from typer.testing import CliRunner

import lora_cli.models as models
from lora_cli.adapter import save_adapter
from lora_cli.cli import generate_app, merge_app
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.models import load_base_model


@pytest.fixture
def recorded(monkeypatch):
    """Record the (revision, trust_remote_code) every loader is called with, still loading for real."""
    calls = {"tokenizer": [], "model": [], "config": []}
    real_tokenizer, real_model, real_stored = models.load_tokenizer, models.load_base_model, models.stored_dtype

    def tokenizer(name, revision=None, trust_remote_code=False):
        calls["tokenizer"].append((revision, trust_remote_code))
        return real_tokenizer(name)

    def model(name, dtype, revision=None, trust_remote_code=False, device=None, **options):
        calls["model"].append((revision, trust_remote_code))
        return real_model(name, dtype, device=device, **options)

    def stored(name, revision=None, trust_remote_code=False):
        calls["config"].append((revision, trust_remote_code))
        return real_stored(name)

    from lora_cli.merge import stream as merge_stream

    real_checkpoint = merge_stream._checkpoint

    def checkpoint(source):  # the streamed merge reads the weights' files instead of loading the model
        calls["model"].append((source.revision, source.trust_remote_code))
        return real_checkpoint(source)

    monkeypatch.setattr(models, "load_tokenizer", tokenizer)
    monkeypatch.setattr(importlib.import_module("lora_cli.merge"), "load_tokenizer", tokenizer)
    monkeypatch.setattr(models, "load_base_model", model)
    monkeypatch.setattr(merge_stream, "_checkpoint", checkpoint)
    monkeypatch.setattr(importlib.import_module("lora_cli.merge"), "stored_dtype", stored)
    return calls


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    model = load_base_model(str(base))
    settings = LoraSettings(r=2, alpha=4.0)
    report = apply_lora(model, settings)
    return save_adapter(model, tmp_path / "adapter", settings, report.target_modules, str(base), revision="v1.0")


def test_generate_passes_revision_and_remote_code_everywhere(tiny_model_dir, recorded):
    args = [str(tiny_model_dir("llama")), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "2",
            "--revision", "abc123", "--trust-remote-code"]
    result = CliRunner().invoke(generate_app, args)
    assert result.exit_code == 0, result.output
    assert recorded["tokenizer"] == recorded["model"] == [("abc123", True)]


@pytest.mark.parametrize("path", [[], ["--verify-logits"]], ids=["streamed", "in memory"])
def test_merge_takes_the_adapters_revision_unless_given(adapter_dir, tmp_path, recorded, path):
    result = CliRunner().invoke(merge_app, [str(adapter_dir), str(tmp_path / "merged"), *path])
    assert result.exit_code == 0, result.output
    assert recorded["tokenizer"] == recorded["model"] == recorded["config"] == [("v1.0", False)]
    for calls in recorded.values():
        calls.clear()
    result = CliRunner().invoke(merge_app, [str(adapter_dir), str(tmp_path / "merged2"), "--revision", "main",
                                            "--trust-remote-code", *path])
    assert result.exit_code == 0, result.output
    assert recorded["tokenizer"] == recorded["model"] == recorded["config"] == [("main", True)]
    assert json.loads((tmp_path / "merged2" / "lora_adapter_config.json").read_text())["revision"] == "v1.0"
