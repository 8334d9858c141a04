"""lora-merge's OUTPUT_DIR: a symbolic link is written through (the Colab Drive case), and an interrupted merge
leaves no hidden temporary folder behind, or the next merge into the same folder removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_close, base_plus_adapter, load, logits, make_our_adapter, merge


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("overwrite", [False, True], ids=["new folder", "--overwrite"])
def test_a_linked_output_dir_is_written_through_and_stays_a_link(tiny_model_dir, tmp_path, overwrite):
    base_dir = tiny_model_dir("llama")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    drive, work = tmp_path / "drive", tmp_path / "work"
    drive.mkdir()
    work.mkdir()
    if overwrite:
        (drive / "merged").mkdir()
        (drive / "merged" / "old.txt").write_text("old")
    link = work / "linkout"
    link.symlink_to(drive / "merged" if overwrite else drive)
    target = (drive / "merged") if overwrite else drive

    result = merge(adapter, link, *(["--overwrite"] if overwrite else []))

    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert not (target / "old.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["linkout"]  # no stray temporary link or folder
    assert hidden(target.parent) == []
    assert_close(logits(load(link)), logits(base_plus_adapter(base_dir, adapter)), 1e-4)


# A real lora-merge process that stops after writing its first shard into the hidden temporary folder, until killed.
SLOW_MERGE = """
import sys, time
from lora_cli.merge import stream as merge_stream
from lora_cli.cli import merge_app

write = merge_stream.write_streaming
def write_then_wait(path, *args, **kwargs):
    write(path, *args, **kwargs)
    print("WROTE", path, flush=True)
    time.sleep(120)
merge_stream.write_streaming = write_then_wait
sys.argv = ["lora-merge", *sys.argv[1:]]
merge_app()
"""


def start_slow_merge(adapter: Path, out: Path) -> subprocess.Popen:
    repo = str(Path(__file__).parents[1])  # this checkout's lora_cli, whatever is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(adapter), str(out), "--max-shard-size", "30KB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("WROTE"):
            return proc
    proc.wait()
    raise AssertionError(f"the merge ended before writing (exit {proc.returncode})")


def test_sigterm_mid_write_removes_the_partial_folder(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    work = tmp_path / "work"
    work.mkdir()
    proc = start_slow_merge(adapter, work / "merged")
    partial = [p for p in work.iterdir() if p.name.startswith(".merged.") and p.name.endswith(".tmp")]
    assert len(partial) == 1 and any(partial[0].iterdir())  # it really was mid-write
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, output
    assert "terminated" in output and "Traceback" not in output
    assert sorted(p.name for p in work.iterdir()) == []  # no partial folder, no lock file, no output


def test_after_sigkill_the_next_merge_removes_the_leftover_but_not_a_running_merges(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    work, out = tmp_path / "work", tmp_path / "work" / "merged"
    work.mkdir()
    (work / ".merged.notours.tmp").mkdir()  # a name atomic_dir never makes for this folder: not ours to remove
    proc = start_slow_merge(adapter, out)
    try:
        running = [p.name for p in work.iterdir() if p.name.startswith(".merged.") and p.name.endswith(".tmp")
                   and p.name != ".merged.notours.tmp"]
        assert len(running) == 1
        # a second merge into the same folder while the first is alive: refused, and the first's folder stays
        result = merge(adapter, out)
        assert result.exit_code == 2 and "being written by another lora-merge" in result.output, result.output
        assert (work / running[0]).is_dir() and any((work / running[0]).iterdir())
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (work / running[0]).is_dir()  # SIGKILL cannot clean up: the leftover is there ...

    result = merge(adapter, out)

    assert result.exit_code == 0, result.output
    assert f"note: removed {work / running[0]}" in result.output
    assert hidden(work) == [".merged.notours.tmp"]  # ... and the next merge removed it (and only it)
    assert_close(logits(load(out)), logits(base_plus_adapter(base_dir, adapter)), 1e-4)


# --- found by reviewing the lock: every merge locks, the lock file goes, takers check what they locked -------------


def test_a_merge_into_a_new_nested_folder_locks_it_and_leaves_nothing_behind(tmp_path):
    """Both merges lock, also when the folders above OUTPUT_DIR do not exist yet: before, the first ran unlocked and
    a second one (which could lock, the parents existing by then) removed the first's live temporary folder."""
    from lora_cli.errors import UserError
    from lora_cli.fsutil import lock_path_of
    from lora_cli.merge.output import output_guarded

    out = tmp_path / "a" / "b" / "out"
    with output_guarded(out, log=print):
        assert lock_path_of(out).is_file()
        with pytest.raises(UserError, match="being written by another lora-merge or lora-train"):
            with output_guarded(out, log=print):
                pass
        out.mkdir()  # what the merge publishes
    assert out.is_dir() and not lock_path_of(out).exists()  # no lock file left beside the result
    failed = tmp_path / "c" / "d" / "out"
    with pytest.raises(RuntimeError):
        with output_guarded(failed, log=print):
            raise RuntimeError("the merge failed")
    assert not (tmp_path / "c").exists()  # the folders it made go with the failed merge, lock file and all


def test_a_lock_taken_on_a_removed_lock_file_is_retaken_on_the_file_in_place(tmp_path, monkeypatch):
    """A holder removes the lock file before releasing it; a process that had opened the file just before must not
    hold a lock on the deleted file (guarding nothing, for lora-train as for lora-merge): it locks the file in place."""
    import builtins

    from lora_cli import fsutil

    out = tmp_path / "out"
    lock_path = fsutil.lock_path_of(out)
    lock_path.write_text("pid 1\n")
    opened_before_removal = open(lock_path, "a+")
    lock_path.unlink()
    real_open, handed = builtins.open, []

    def open_once_stale(path, *args, **kwargs):
        if not handed and Path(path) == lock_path:
            handed.append(True)
            return opened_before_removal
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_once_stale)
    handle = fsutil.take_lock(out, busy=str)
    try:
        assert handed and handle is not opened_before_removal
        assert os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        assert lock_path.read_text() == f"pid {os.getpid()}\n"
    finally:
        handle.close()


def test_a_copy_of_the_head_rounded_differently_from_the_loaded_base_is_the_same_head():
    """PEFT saved the head's copy from a bf16 model; lora-generate loads the fp32-stored base in fp16 (a T4): two
    roundings of the same weights, not a modified head. A head changed by more than rounding is still told apart."""
    import torch

    from lora_cli.adapter import same_values

    torch.manual_seed(0)
    head = torch.randn(300, 64) * 0.02
    head[0, :4] = torch.tensor([1e-9, -3e-7, 0.7, 0.0])  # fp16 subnormals and zeros round differently
    assert same_values(head.half(), head.bfloat16()) and same_values(head.bfloat16(), head.half())
    assert same_values(head, head.bfloat16()) and same_values(head.half(), head)
    modified = head.clone()
    modified[250, 3] *= 1.05
    assert not same_values(head.half(), modified.bfloat16(), rows_per_chunk=7)
    assert not same_values(head, modified) and not same_values(head, head[:10])
