"""lora-train under torchrun / `accelerate launch`: two CPU processes (gloo) train exactly what one process trains
with twice the gradient accumulation, and only one of them writes.

`accelerate launch` on GPUs starts its processes through the same torch.distributed launcher; Accelerate then
wraps the loss module in DDP. On CPU Accelerate picks the gloo backend, so the data split, the loss normalisation
over processes, the padding of an uneven last window and the single writer are all tested here without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import make_config

# Thirteen examples of different lengths, three held out for validation (split over the processes unevenly): the
# ten left make 5 micro batches of 2 an epoch, so windows of 2 micro batches leave a last window of 1, which the
# second process must pad with a zero-weight batch.
ROWS = [{"text": "the lighthouse of quillhaven is painted green " + "and tall " * (i % 4)} for i in range(13)]
STEPS = 6  # two epochs of three optimizer steps


def run_train(config: Path, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if processes == 1:
        cmd = [sys.executable, "-m", "lora_cli", "train", str(config)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "lora_cli", "train", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# qlora: a 4-bit base (each process loads its own) and LoRA+'s two optimizer groups, both under DDP.
QLORA = {"model": {"load_in_4bit": True}, "lora": {"loraplus_lr_ratio": 4}}


# dropout: each micro batch's masks come from a seed of its own, so they do not depend on the process that draws them.
DROPOUT = {"lora": {"dropout": 0.1}}


@pytest.mark.parametrize("packing,extra", [(False, {}), (True, {}), (False, QLORA), (False, DROPOUT)],
                         ids=["plain", "packing", "qlora", "dropout"])
def test_two_processes_train_what_one_process_trains(tmp_path, trainable_model_dir, packing, extra):
    if extra is QLORA:
        pytest.importorskip("bitsandbytes")
    model_dir = trainable_model_dir("llama")
    # With sample answers: only the main process generates (the other waits), and training is not disturbed.
    common = {"max_steps": STEPS, "micro_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2, "eval_steps": 2,
              "eval_prompts": ["Where is the lighthouse?"], "eval_max_new_tokens": 4}
    data = {"packing": packing, "max_length": 24, "val_size": 3}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = make_config(tmp_path / "one", model_dir, rows=ROWS, data=data, **extra,
                      train={**common, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "one/out")})
    two = make_config(tmp_path / "two", model_dir, rows=ROWS, data=data, **extra,
                      train={**common, "gradient_accumulation_steps": 1, "output_dir": str(tmp_path / "two/out")})

    single = run_train(one, 1)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    double = run_train(two, 2)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    assert "2 processes" in double.stderr

    out_one, out_two = tmp_path / "one/out", tmp_path / "two/out"
    # One writer: one metrics line per step (not one per process), one adapter, no temporary folders left behind.
    records = [r for r in metrics(out_two) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in out_two.iterdir()) == sorted(p.name for p in out_one.iterdir())
    samples = [json.loads(line) for line in (out_two / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [2, 4, 6]  # answered once per evaluation, not once per process

    # The same losses and the same adapter as one process with twice the accumulation.
    expected = [r["loss"] for r in metrics(out_one) if "loss" in r]
    assert [r["loss"] for r in records] == pytest.approx(expected, rel=1e-5)
    # The gradient itself, not only its direction (AdamW would hide a uniformly scaled gradient): same norm.
    expected_norms = [r["grad_norm"] for r in metrics(out_one) if "loss" in r]
    assert [r["grad_norm"] for r in records] == pytest.approx(expected_norms, rel=1e-4)
    assert records[-1]["loss"] < records[0]["loss"]  # it did learn
    # Validation split over the processes and summed: the same loss over the same tokens as one process.
    evals_one = [r for r in metrics(out_one) if "eval_loss" in r]
    evals_two = [r for r in metrics(out_two) if "eval_loss" in r]
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == [2, 4, 6]
    assert [r["eval_tokens"] for r in evals_two] == [r["eval_tokens"] for r in evals_one]
    assert [r["eval_loss"] for r in evals_two] == pytest.approx([r["eval_loss"] for r in evals_one], rel=1e-5)
    a = load_file(str(out_one / "adapter_model.safetensors"))
    b = load_file(str(out_two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 1e-3 for k, t in a.items() if "lora_B" in k)  # trained, not the zero init
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-5 + 1e-4 * a[key].abs().max().item(), key


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_deepspeed_is_refused_with_fsdp_as_the_fix(kind):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lora_cli.errors import UserError
    from lora_cli.training.step import check_distributed_type as _check_distributed_type

    with pytest.raises(UserError, match=f"set up for {kind}.*use FSDP.*fsdp_2gpu.yaml.*train.fsdp=true"):
        _check_distributed_type(SimpleNamespace(distributed_type=DistributedType[kind]))
    for fine in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP"):
        _check_distributed_type(SimpleNamespace(distributed_type=DistributedType[fine]))


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM"])
def test_a_deepspeed_launch_is_refused_before_accelerate_starts(tmp_path, trainable_model_dir, monkeypatch, variable):
    """What `accelerate launch` with a DeepSpeed config sets: refused by lora-train's message, not Accelerate's
    ImportError traceback (DeepSpeed is not installed here), and before anything loads."""
    from typer.testing import CliRunner

    from lora_cli.cli import train_app

    monkeypatch.setenv(variable, "true")
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2})
    done = CliRunner().invoke(train_app, [str(config)])
    text = " ".join(done.output.split())
    assert done.exit_code == 2 and "lora-train does not support" in text and "train.fsdp=true" in text, done.output
    assert not (tmp_path / "out").exists()


def test_two_processes_resume_exactly(tmp_path, trainable_model_dir):
    """A 2-process run stopped after checkpoint-2 and resumed (under torchrun again) equals the uninterrupted one:
    the checkpoint holds both processes' RNG states and the window position over all processes."""
    model_dir = trainable_model_dir("llama")
    train = {"max_steps": STEPS, "micro_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2, "save_steps": 2,
             "output_dir": str(tmp_path / "out")}
    config = make_config(tmp_path, model_dir, rows=ROWS, data={"max_length": 24}, lora={"dropout": 0.1}, train=train)
    whole = run_train(config, 2)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    out = tmp_path / "out"
    import torch

    assert len(torch.load(out / "checkpoint-2" / "rng_state.pth", weights_only=True)) == 2
    cut = tmp_path / "cut"
    cut.mkdir()
    import shutil

    shutil.copytree(out / "checkpoint-2", cut / "checkpoint-2")
    resumed_config = tmp_path / "resumed.yaml"
    import yaml

    data = yaml.safe_load(config.read_text())
    data["train"].update(output_dir=str(cut), resume_from_checkpoint="auto")
    resumed_config.write_text(yaml.safe_dump(data))
    resumed = run_train(resumed_config, 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    strip = lambda rows: [{k: r[k] for k in ("step", "loss", "grad_norm")} for r in rows if "loss" in r]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(out))
    assert (cut / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_ctrl_c_under_torchrun_says_once_how_to_continue_with_the_launcher(tmp_path, trainable_model_dir):
    """Ctrl-C reaches torchrun and both workers: each finishes its step and they write one checkpoint; only the main
    process prints how to continue, and its command is the launcher's (a plain one would start 1 process, which
    the 2-process checkpoint refuses)."""
    import shlex
    import signal
    import time

    train = {"max_steps": 100_000, "micro_batch_size": 2, "logging_steps": 1, "output_dir": str(tmp_path / "out")}
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=ROWS, data={"max_length": 24}, train=train)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lora_cli",
           "train", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size for p in (tmp_path / "out").glob("runs/*/metrics.jsonl")):
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the launcher and its workers get it
    output = proc.communicate(timeout=240)[0]
    assert output.count("To continue, run:") == 1, output[-3000:]
    lines = output.splitlines()
    command = shlex.split(lines[next(i for i, line in enumerate(lines) if "To continue, run:" in line) + 1])
    assert command == [*cmd, "train.resume_from_checkpoint=auto"], command
    step = int(output.split("stopped at step ")[1].split(";")[0])
    resumed = subprocess.run([*command, f"train.max_steps={step + 2}"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
