"""Ctrl-C, SIGTERM and kill -9 on a real `lora-train` process: the first Ctrl-C/SIGTERM finishes the step, writes a
checkpoint, prints the command that resumes and exits 130/143; kill -9 at any moment leaves a folder that
resume_from_checkpoint=auto continues; and the continued run ends with the same adapter bytes as a run never
interrupted (the newcomer's sequence: start, Ctrl-C halfway, rerun the printed command)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CHAT_ROWS, make_config
from lora_cli.config import load_config
from lora_cli.train import train

STEPS = 200
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}


def start(config: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lora_cli", "train", str(config), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_steps(out: Path, process: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    """Until the run's live metrics.jsonl shows `steps` logged steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for live in out.glob("runs/*/metrics.jsonl"):
            if len(live.read_text().splitlines()) >= steps:
                return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not reach the step in time")


def weights(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trainable_model_dir):
    """The config and the adapter bytes of the uninterrupted run (in this process, one thread like the children)."""
    folder = tmp_path_factory.mktemp("reference")
    config = make_config(folder, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": STEPS, "save_steps": 50, "learning_rate": 1e-2})
    cfg = load_config(config)
    train(cfg, quiet=True)
    return config, weights(Path(cfg.train.output_dir))


def fresh_out(tmp_path: Path) -> Path:
    return tmp_path / "run-out"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_checkpoints_and_prints_the_resume_command(tmp_path, reference, sig, code):
    config, expected = reference
    out = fresh_out(tmp_path)
    process = start(config, f"train.output_dir={out}")
    wait_for_steps(out, process, 8)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "finishing this optimizer step" in stderr
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped at step ")]
    assert stopped, stderr
    step = int(stopped[0].split()[3].rstrip(";"))
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # an unfinished run publishes no result
    command = next(line.strip() for line in stderr.splitlines() if "resume_from_checkpoint=auto" in line)
    resumed = subprocess.run(shlex.split(command), capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint}" in resumed.stderr
    assert weights(out) == expected
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # nothing logged twice, nothing lost


def test_second_ctrl_c_stops_at_once_and_damages_no_checkpoint(tmp_path, reference):
    config, expected = reference
    out = fresh_out(tmp_path)
    process = start(config, f"train.output_dir={out}", "train.save_steps=1")
    wait_for_steps(out, process, 8)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    for checkpoint in out.glob("checkpoint-*"):  # every folder under its final name is complete
        assert (checkpoint / "rng_state.pth").is_file(), checkpoint
    resumed = start(config, f"train.output_dir={out}", "train.resume_from_checkpoint=auto")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert weights(out) == expected


def test_kill_9_at_any_moment_leaves_a_resumable_folder(tmp_path, reference):
    config, expected = reference
    out = fresh_out(tmp_path)
    for steps in (3, 12, 27):  # three kills at different moments of one run, each resumed blindly
        process = start(config, f"train.output_dir={out}", "train.resume_from_checkpoint=auto", "train.save_steps=2")
        wait_for_steps(out, process, steps)
        process.kill()
        process.communicate(timeout=60)
    resumed = start(config, f"train.output_dir={out}", "train.resume_from_checkpoint=auto")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert weights(out) == expected
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]
    assert not leftovers
