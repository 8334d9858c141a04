"""Signals in the middle of a save: at many points of the final save and of a checkpoint save, a real SIGKILL,
SIGTERM or a double Ctrl-C leaves output_dir holding the complete old result or the complete new one (weights,
config and resolved config from the same run), never a mix, and nothing that blocks the next run.

Each case forks the test process after training (so the save runs with the real run state) and the child delivers
a real signal to itself at the N-th Python function call of the save (a profile hook counts them); the parent
then inspects the folder the dead child left.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from helpers import make_config
from lora_cli.config import load_config
from lora_cli.train import train
from lora_cli.training import outdir
from lora_cli.training.checkpoint import save_checkpoint
from lora_cli.training.signals import StopRequests

train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
RESULT_FILES = ("adapter_model.safetensors", "adapter_config.json", "lora_config.yaml")


def signature(folder: Path) -> tuple | None:
    """What identifies one run's adapter: its weights, adapter config and resolved config (None if absent)."""
    if not all((folder / name).is_file() for name in RESULT_FILES):
        return None if not any((folder / name).exists() for name in RESULT_FILES) else ("PARTIAL",)
    return tuple(hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in RESULT_FILES)


def captured_run(tmp_path, model_dir, monkeypatch, **train_section):
    """Train for real but stop before the final save; return (run, finish's other arguments: loop state, losses)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = make_config(tmp_path, model_dir, lora={"alpha": 8}, train={"max_steps": 3, **train_section})
    captured = {}
    monkeypatch.setattr(train_module, "finish", lambda run, *args: captured.update(run=run, args=args))
    monkeypatch.setattr(train_module, "_release", lambda run, loop: None)  # keep the model: the save runs later
    train(load_config(config), quiet=True)
    monkeypatch.undo()
    return captured["run"], captured["args"]


def in_child(action, kill_at: int, how: str) -> int:
    """Run `action` in a forked child that signals itself at the `kill_at`-th function call; its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        calls = 0

        def hook(frame, event, arg):
            nonlocal calls
            if event == "call":
                calls += 1
                if calls == kill_at:
                    sys.setprofile(None)
                    if how == "SIGKILL":
                        os.kill(os.getpid(), signal.SIGKILL)
                    elif how == "SIGTERM":
                        os.kill(os.getpid(), signal.SIGTERM)
                    else:  # a double Ctrl-C: the first asks for a clean stop, the second stops at once
                        os.kill(os.getpid(), signal.SIGINT)
                        os.kill(os.getpid(), signal.SIGINT)

        code = 0
        try:
            with StopRequests(lambda message: None):
                sys.setprofile(hook)
                action()
                sys.setprofile(None)
        except BaseException:  # KeyboardInterrupt from the second Ctrl-C
            code = 3
        os._exit(code if calls >= kill_at else 9)  # 9: the save ended before the kill point
    _, status = os.waitpid(pid, 0)
    return status


def count_calls(action) -> int:
    calls = 0

    def hook(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(hook)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def restore(template: Path, out: Path) -> None:
    for leftover in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    shutil.rmtree(out, ignore_errors=True)
    if template.exists():
        shutil.copytree(template, out)


def assert_clean_after_recovery(out: Path) -> None:
    outdir.recover(out, log=lambda m: None)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.suffix != ".lock"]
    leftovers += [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))] if out.is_dir() else []
    assert not leftovers, leftovers


@pytest.mark.parametrize("replacing,exchange", [(True, True), (False, True), (True, False)],
                         ids=["replacing-an-adapter", "first-save", "replacing-without-renameat2"])
def test_kill_during_the_final_save_leaves_old_or_new(tmp_path, trainable_model_dir, monkeypatch, replacing, exchange):
    """Without RENAME_EXCHANGE (some filesystems), a kill between the two renames leaves output_dir missing for a
    moment; the next run's recovery then puts the complete new result in place."""
    model_dir = trainable_model_dir("llama")
    run, args = captured_run(tmp_path / "new", model_dir, monkeypatch, save_steps=2, overwrite_output_dir=True)
    if not exchange:
        monkeypatch.setattr("lora_cli.fsutil.exchange", lambda a, b: False)
    out = run.out
    template = tmp_path / "template"
    if replacing:  # an older finished run with another lora.alpha, in the same output_dir
        (tmp_path / "old").mkdir()
        old_cfg = load_config(make_config(tmp_path / "old", model_dir, lora={"alpha": 16}, train={"max_steps": 2}))
        train(old_cfg, quiet=True)
        shutil.copytree(old_cfg.train.output_dir, template)
        shutil.copytree(out / "checkpoint-2", template / "checkpoint-2")  # this run's checkpoint lives beside it
    else:
        shutil.copytree(out, template)  # only this run's checkpoint and live log
    old = signature(template)
    assert (old is not None) == replacing

    restore(template, out)

    def publish() -> None:
        train_module.finish(run, *args)

    total = count_calls(publish)
    new = signature(out)
    assert new is not None and new != old

    points = sorted({max(1, total * i // 24) for i in range(1, 24)})
    seen = set()
    for how in ("SIGKILL", "SIGINT", "SIGTERM"):
        for point in points[:: 1 if how == "SIGKILL" else 4]:
            restore(template, out)
            in_child(publish, point, how)
            got = signature(out)
            assert got in ((old, new) if exchange else (old, new, None)), (how, point, got)
            assert_clean_after_recovery(out)
            got = signature(out)
            assert got in (old, new), (how, point, got)
            seen.add(got)
            assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()  # this run's checkpoint survives
    assert seen == {old, new}  # the kill points cover before and after the swap


def test_kill_during_a_checkpoint_save_leaves_complete_checkpoints(tmp_path, trainable_model_dir, monkeypatch):
    run, (loop, *_) = captured_run(tmp_path, trainable_model_dir("llama"), monkeypatch, save_steps=1)
    out = run.out
    template = tmp_path / "template"
    shutil.copytree(out, template)
    loop.state.global_step = 7  # write a new checkpoint-7 beside checkpoint-1 and -2

    def save() -> None:
        save_checkpoint(run, loop)

    restore(template, out)
    total = count_calls(save)
    complete = signature(out / "checkpoint-7")
    for how in ("SIGKILL", "SIGINT"):
        for point in sorted({max(1, total * i // 16) for i in range(1, 16)})[:: 1 if how == "SIGKILL" else 3]:
            restore(template, out)
            in_child(save, point, how)
            assert signature(out / "checkpoint-7") in (None, complete), (how, point)
            for step in (1, 2):
                assert signature(out / f"checkpoint-{step}") == signature(template / f"checkpoint-{step}")
            assert_clean_after_recovery(out)
