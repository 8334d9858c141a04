"""The output folder's rules: what is refused before anything loads, what a failing run leaves alone, a full disk,
and the file modes of what is written."""

from __future__ import annotations

import errno
import importlib
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from helpers import CHAT_ROWS, make_config
from lora_cli.cli import train_app

runner = CliRunner()


def invoke(config, *overrides):
    return runner.invoke(train_app, [str(config), *overrides])


def refuse_model_loading(monkeypatch):
    """Make any model load fail loudly, to prove a check runs before it."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(importlib.import_module("lora_cli.train"), "load_base_model", boom)


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
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".out.")]
    assert leftovers == [".out.lock"]  # no temporary folder left; the lock file stays beside output_dir


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
    release = outdir.lock(out)
    try:
        result = invoke(make_config(tmp_path, trainable_model_dir("llama")))
        assert result.exit_code == 2
        assert "in use by another lora-train run or lora-merge" in result.output
        assert f"pid {os.getpid()}" in result.output
    finally:
        release()


# --- found by an adversarial pass: what a run must leave alone, and where it must look ---------------------------


def test_a_second_run_leaves_a_running_jobs_temporary_folders_alone(tmp_path, trainable_model_dir):
    """A refused second run (the folder is locked) removes nothing; and a run never touches the temporary names of
    a neighbour whose name starts the same (out vs out.v2), nor a lora-merge output's."""
    from lora_cli.training import outdir

    out = tmp_path / "out"
    out.mkdir()
    running = [out / ".checkpoint-5.abcd1234.tmp", tmp_path / ".out.publish-abcd1234.tmp",
               tmp_path / ".out.v2.publish-efgh5678.tmp", tmp_path / ".out.merged.ijkl9012.tmp"]
    for folder in running:
        folder.mkdir()
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 1})
    release = outdir.lock(out)
    try:
        assert invoke(config).exit_code == 2
        assert all(folder.is_dir() for folder in running)
    finally:
        release()
    # The job that owned out is gone: the next run of out removes its leftovers, and only those.
    assert invoke(config).exit_code == 0
    assert not running[0].exists() and not running[1].exists()
    assert running[2].is_dir() and running[3].is_dir()  # out.v2's and a lora-merge output's are not out's


def test_a_run_keeps_the_users_own_files_and_the_folders_permissions(tmp_path, trainable_model_dir):
    out = tmp_path / "own"
    out.mkdir()
    os.chmod(out, 0o2750)
    mine = [out / ".env.old", out / "notes.tmp", out / "README.md", tmp_path / ".own.backup.old"]
    for path in mine:
        path.write_text("mine")
    (out / ".venv.old").mkdir()
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 1, "output_dir": str(out)})
    assert invoke(config).exit_code == 0
    assert all(path.read_text() == "mine" for path in mine) and (out / ".venv.old").is_dir()
    assert (out / "adapter_model.safetensors").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o2750  # the swapped-in folder keeps the old one's mode


def test_a_symlinked_output_dir_receives_the_result_and_stays_a_link(tmp_path, trainable_model_dir):
    """Colab: outputs/x linked to a Drive folder. The result goes to the link's target; the link stays."""
    target = tmp_path / "drive" / "lora"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 1, "output_dir": str(link)})
    assert invoke(config).exit_code == 0
    assert link.is_symlink() and (target / "adapter_model.safetensors").is_file()
    result = invoke(config, "train.overwrite_output_dir=true")  # and again, replacing it
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and (target / "adapter_model.safetensors").is_file()


def test_output_dir_inside_the_data_folder_or_the_working_folder_is_refused(tmp_path, trainable_model_dir, monkeypatch):
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "train.jsonl").write_text(json.dumps({"text": "some text to train on"}) + "\n")
    config = make_config(tmp_path, trainable_model_dir("llama"))
    result = invoke(config, f"data.path={data_folder}", f"train.output_dir={data_folder / 'out'}")
    assert result.exit_code == 2 and "inside the data folder" in result.output
    monkeypatch.chdir(tmp_path)
    for where in (".", str(tmp_path.parent)):
        result = invoke(config, f"train.output_dir={where}")
        assert result.exit_code == 2 and "the folder lora-train runs in" in result.output, result.output


def test_disk_full_in_another_library_s_words_is_exit_2(tmp_path, trainable_model_dir, monkeypatch):
    """safetensors and tokenizers report a full disk with their own exception types, in the system's words."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr("lora_cli.adapter.save_file", full)
    result = invoke(make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 4, "save_steps": 2}))
    assert result.exit_code == 2, result.output
    assert "disk is full" in result.output and "Traceback" not in result.output


def test_a_full_disk_for_the_live_log_does_not_end_the_run(tmp_path, trainable_model_dir, monkeypatch):
    import builtins

    import lora_cli.training.metrics as metrics_module

    def failing_open(path, mode="r", *args, **kwargs):
        if "a" in mode and str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", failing_open, raising=False)
    result = invoke(make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 3}))
    assert result.exit_code == 0, result.output
    assert result.output.count("could not append") == 1  # said once
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # the result's log is whole


def test_a_failed_merge_at_end_keeps_the_adapter_and_says_how_to_merge(tmp_path, trainable_model_dir, monkeypatch):
    from lora_cli.errors import UserError

    def no_room(*args, **kwargs):
        raise UserError("Not enough disk space for the merged model.")

    monkeypatch.setattr(importlib.import_module("lora_cli.merge"), "merge_adapter", no_room)
    result = invoke(make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2, "merge_at_end": True}))
    assert result.exit_code == 2, result.output
    out = tmp_path / "out"
    text = " ".join(result.output.split())
    assert f"The adapter is saved in {out}" in text and f"lora-merge {out} {out / 'merged'}" in text
    assert (out / "adapter_model.safetensors").is_file() and not (out / "merged").exists()


def test_a_checkpoint_cut_between_its_two_renames_gets_its_old_copy_back(tmp_path):
    """Without renameat2 a checkpoint is replaced by two renames; a kill between them leaves the old copy under a
    temporary name, which the next run puts back (and it removes the unfinished new one)."""
    from lora_cli.training import outdir

    out = tmp_path / "out"
    (out / ".checkpoint-10.replaced.old").mkdir(parents=True)
    (out / ".checkpoint-10.replaced.old" / "trainer_state.json").write_text("{}")
    (out / ".checkpoint-10.abcd1234.tmp").mkdir()
    outdir.recover(out, log=lambda message: None)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10"]
    assert (out / "checkpoint-10" / "trainer_state.json").read_text() == "{}"
