"""The output folder's rules: what is refused before anything loads, what a failing run leaves alone, a full disk,
and the file modes of what is written."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from lora_cli.cli import train_app
from test_train import CHAT_ROWS, make_config

runner = CliRunner()


def invoke(config, *overrides):
    return runner.invoke(train_app, [str(config), *overrides])


def refuse_model_loading(monkeypatch):
    """Make any model load fail loudly, to prove a check runs before it."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("lora_cli.train.load_base_model", boom)


def test_a_legacy_bin_adapter_is_not_overwritten(tmp_path, trainable_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
    (out / "adapter_model.bin").write_bytes(b"old weights")
    result = invoke(make_config(tmp_path, trainable_model_dir("llama")))
    assert result.exit_code == 2
    assert "already holds a trained adapter" in result.output
    assert (out / "adapter_model.bin").read_bytes() == b"old weights"


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_in_the_base_model_folder_is_refused(tmp_path, tiny_model_dir, monkeypatch, where):
    model_dir = tiny_model_dir("llama")
    target = model_dir if where == "same" else model_dir / "adapters" / "mine"
    refuse_model_loading(monkeypatch)
    result = invoke(make_config(tmp_path, model_dir), f"train.output_dir={target}", "train.overwrite_output_dir=true")
    assert result.exit_code == 2, result.output
    assert "base model folder" in result.output and "Traceback" not in result.output
    assert not (model_dir / "adapter_config.json").exists() and not (model_dir / "adapters").exists()


def test_read_only_output_dir_fails_before_the_model_loads(tmp_path, trainable_model_dir, monkeypatch):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(readonly) else real_access(p, mode))
    refuse_model_loading(monkeypatch)
    result = invoke(make_config(tmp_path, trainable_model_dir("llama")), f"train.output_dir={readonly / 'out'}")
    assert result.exit_code == 2, result.output
    assert "not writable" in result.output and str(readonly) in result.output


def test_a_failing_run_leaves_the_finished_folder_alone(tmp_path, trainable_model_dir, monkeypatch):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2})
    assert invoke(config).exit_code == 0
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}

    import lora_cli.losses as losses

    monkeypatch.setattr(losses, "causal_lm_loss", lambda model, batch, **k: (losses.torch.tensor(float("nan")), 1))
    result = invoke(config, "train.overwrite_output_dir=true", "train.max_nonfinite_steps=2")
    assert result.exit_code == 2 and "skipped" in result.output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert after == before  # metrics.jsonl too: the failed run's log went to runs/<run>/ only


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_the_final_save(tmp_path, trainable_model_dir, monkeypatch):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2, "save_steps": 1})
    assert invoke(config).exit_code == 0
    out = tmp_path / "out"
    old = (out / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr("lora_cli.adapter.save_file", _disk_full)
    result = invoke(config, "train.overwrite_output_dir=true", "train.save_steps=null", "lora.alpha=4")
    assert result.exit_code == 2, result.output
    assert "disk is full" in result.output and str(out) in result.output and "MB" in result.output
    assert "Traceback" not in result.output
    assert (out / "adapter_model.safetensors").read_bytes() == old
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_disk_full_during_a_checkpoint(tmp_path, trainable_model_dir, monkeypatch):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 6, "save_steps": 2})
    real_save = __import__("torch").save
    calls = {"n": 0}

    def fill_after_first_checkpoint(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # checkpoint-2 writes optimizer, scheduler and RNG state; checkpoint-4 never gets there
            _disk_full()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("lora_cli.training.checkpoint.torch.save", fill_after_first_checkpoint)
    result = invoke(config)
    assert result.exit_code == 2, result.output
    assert "checkpoint" in result.output and "disk is full" in result.output
    assert "resume_from_checkpoint=auto" in result.output
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_written_files_get_the_umasks_modes(tmp_path, trainable_model_dir):
    old_mask = os.umask(0o022)
    try:
        config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                             train={"max_steps": 2, "save_steps": 1, "merge_at_end": True})
        assert invoke(config).exit_code == 0
    finally:
        os.umask(old_mask)
    out = tmp_path / "out"
    for path in (out, out / "checkpoint-1", out / "merged"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in (out / "adapter_model.safetensors", out / "adapter_config.json", out / "lora_config.yaml",
                 out / "checkpoint-1" / "adapter_model.safetensors", out / "checkpoint-1" / "optimizer.pt",
                 out / "merged" / "config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_two_runs_cannot_share_an_output_dir(tmp_path, trainable_model_dir):
    from lora_cli.training import outdir

    out = tmp_path / "out"
    held = outdir.lock(out)
    try:
        result = invoke(make_config(tmp_path, trainable_model_dir("llama")))
        assert result.exit_code == 2
        assert "in use by another lora-train run" in result.output and f"pid {os.getpid()}" in result.output
    finally:
        held.close()
