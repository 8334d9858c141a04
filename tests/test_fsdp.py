"""lora-train with FSDP (train.fsdp=true) under torchrun: two CPU processes (gloo) shard the base model and train
what one process trains with twice the gradient accumulation; the adapter is gathered from the shards and written
once, by the main process.

Accelerate drives FSDP2 on GPUs only; on CPU processes lora-train runs Accelerate's own FSDP2 code (training.fsdp),
so the sharding, the gathering, the loss normalisation and resuming are all tested here without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import make_config
from test_distributed import ROWS, STEPS, metrics, run_train

# fp32 on CPU: FSDP sums the two processes' gradients in another order than one process's backward does, so the
# results agree to float rounding, not bit for bit.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def adapters_match(one: Path, two: Path) -> None:
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 1e-3 for k, t in a.items() if "lora_B" in k)  # trained, not the zero init
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert (a[key] - b[key]).abs().max().item() <= 1e-5 + 1e-4 * a[key].abs().max().item(), key


def without_dropout(model_dir: Path, into: Path) -> Path:
    """A copy of the model without the base's own dropout (GPT-2 has 0.1): dropout draws from each process's
    generator, so one process and two could not agree."""
    shutil.copytree(model_dir, into)
    config = json.loads((into / "config.json").read_text())
    config.update({k: 0.0 for k in config if k.endswith("_pdrop") or k.endswith("dropout")})
    (into / "config.json").write_text(json.dumps(config))
    return into


def fsdp_pair(tmp_path: Path, model_dir: Path, data: dict, **train) -> tuple[Path, Path]:
    """Configs for one process with accumulation 2, and two FSDP processes with accumulation 1."""
    common = {"max_steps": STEPS, "micro_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2, **train}
    configs = []
    for name, extra in (("one", {"gradient_accumulation_steps": 2}),
                        ("two", {"gradient_accumulation_steps": 1, "fsdp": True})):
        (tmp_path / name).mkdir()
        configs.append(make_config(tmp_path / name, model_dir, rows=ROWS, data=data,
                                   train={**common, **extra, "output_dir": str(tmp_path / name / "out")}))
    return configs[0], configs[1]


@pytest.mark.parametrize("arch,packing", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_fsdp_trains_what_one_process_trains(tmp_path, trainable_model_dir, arch, packing):
    """The same losses, gradient norms, evaluations, sample answers and adapter; one writer; each process holds half
    the weights. The best adapter is kept (gathered at every evaluation, put back into the shards at the end) and
    merged at the end."""
    evaluated = {"eval_steps": 3, "eval_prompts": ["Where is the lighthouse?"], "eval_max_new_tokens": 4,
                 "load_best_at_end": True, "merge_at_end": packing}
    model_dir = without_dropout(trainable_model_dir(arch), tmp_path / "model")
    one, two = fsdp_pair(tmp_path, model_dir, {"packing": packing, "max_length": 24, "val_size": 3}, **evaluated)
    single = run_train(one, 1)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    double = run_train(two, 2)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]

    held = re.search(r"FSDP: .* over 2 processes.*: ([\d.]+) MiB held by each, of ([\d.]+) MiB",
                     double.stderr.replace("\n", " "))
    assert held, double.stderr[-3000:]
    mine, whole = float(held.group(1)), float(held.group(2))
    assert 0.45 * whole <= mine <= 0.6 * whole  # about half (the shards of each tensor round up)

    out_one, out_two = tmp_path / "one/out", tmp_path / "two/out"
    records = [r for r in metrics(out_two) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one metrics line per step: one writer
    assert sorted(p.name for p in out_two.iterdir()) == sorted(p.name for p in out_one.iterdir())
    expected = [r for r in metrics(out_one) if "loss" in r]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in expected], rel=LOSS_RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=GRAD_RTOL)
    evals_one = [r for r in metrics(out_one) if "eval_loss" in r]
    evals_two = [r for r in metrics(out_two) if "eval_loss" in r]
    assert [r["eval_tokens"] for r in evals_two] == [r["eval_tokens"] for r in evals_one]
    assert [r["eval_loss"] for r in evals_two] == pytest.approx([r["eval_loss"] for r in evals_one], rel=LOSS_RTOL)
    samples = [json.loads(line) for line in (out_two / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [3, 6]  # answered once per evaluation, not once per process
    expected_samples = [json.loads(line) for line in (out_one / "samples.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in samples] == [r["answer"] for r in expected_samples]
    adapters_match(out_one, out_two)
    if packing:
        assert (out_two / "merged" / "config.json").is_file()


def start_torchrun(config: Path, processes: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "lora_cli", "train", str(config)]
    # A session of its own: the signal goes to torchrun and its workers together, as a notebook's shutdown sends it.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def live_steps(out: Path) -> int:
    files = list(out.glob("runs/*/metrics.jsonl"))
    return sum('"loss"' in line for line in files[0].read_text().splitlines()) if files else 0


def test_fsdp_resumes_exactly_after_sigterm(tmp_path, trainable_model_dir):
    """SIGTERM mid-run: every process finishes the step, the LoRA weights and optimizer moments are gathered from
    the shards into one checkpoint; resumed (under FSDP again) it ends exactly where an uninterrupted run ends."""
    steps = 40
    train = {"max_steps": steps, "micro_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2, "fsdp": True,
             "output_dir": str(tmp_path / "whole")}
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=ROWS, data={"max_length": 24},
                         lora={"dropout": 0.1}, train=train)
    whole = run_train(config, 2)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    data = yaml.safe_load(config.read_text())
    data["train"]["output_dir"] = str(tmp_path / "cut")
    cut_config = tmp_path / "cut.yaml"
    cut_config.write_text(yaml.safe_dump(data))
    proc = start_torchrun(cut_config)
    deadline = time.monotonic() + 240
    while live_steps(tmp_path / "cut") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    # torchrun itself ends with 1 on a signal (its SignalException); each worker said where it stopped.
    assert proc.returncode != 0 and re.search(r"stopped at step \d+; saved in", stderr), stderr[-3000:]
    checkpoints = list((tmp_path / "cut").glob("checkpoint-*"))
    assert len(checkpoints) == 1, stderr[-3000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < steps
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()

    data["train"]["resume_from_checkpoint"] = "auto"
    cut_config.write_text(yaml.safe_dump(data))
    resumed = run_train(cut_config, 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in resumed.stderr.replace("\n", "")
    strip = lambda rows: [{k: r[k] for k in ("step", "loss", "grad_norm")} for r in rows if "loss" in r]  # noqa: E731
    assert strip(metrics(tmp_path / "cut")) == strip(metrics(tmp_path / "whole"))
    assert ((tmp_path / "cut" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "whole" / "adapter_model.safetensors").read_bytes())


def test_fsdp_with_4_bit_is_refused_before_loading(tmp_path, trainable_model_dir):
    pytest.importorskip("bitsandbytes")
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=ROWS, model={"load_in_4bit": True},
                         train={"fsdp": True, "max_steps": 2, "output_dir": str(tmp_path / "out")})
    done = run_train(config, 2)
    # Each worker exits with 2 (a UserError, no traceback of its own); torchrun reports that and ends with 1.
    assert done.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", done.stderr), done.stderr[-3000:]
    text = " ".join(done.stderr.split())
    assert "model.load_in_4bit (QLoRA) together with FSDP is not supported" in text
    assert "drop model.load_in_4bit" in text and "lora_cli.errors.UserError" not in text
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_fsdp_in_one_process_is_a_no_op_with_a_note(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=ROWS, data={"max_length": 24},
                         train={"fsdp": True, "max_steps": 2, "output_dir": str(tmp_path / "out")})
    done = run_train(config, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.fsdp=true in one process shards nothing" in " ".join(done.stderr.split())
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_fsdp_version_1_is_refused_by_name():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lora_cli.errors import UserError
    from lora_cli.training.fsdp import sharding_for

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2,
                                  state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    cfg = SimpleNamespace(train=SimpleNamespace(fsdp=False), model=SimpleNamespace(load_in_4bit=False))
    with pytest.raises(UserError, match="FSDP version 1.*fsdp_version: 2"):
        sharding_for(accelerator, cfg, {}, say=lambda *a, **k: None)


def test_estimate_shards_the_base_over_the_processes():
    from typer.testing import CliRunner

    from lora_cli.cli import train_app

    repo = Path(__file__).resolve().parent.parent
    model = repo / "tests" / "fixtures" / "llama-3.1-8b"

    def estimate(*args):
        done = CliRunner().invoke(train_app, [str(repo / "configs" / "t4_3b.yaml"), f"model.name_or_path={model}",
                                              "--estimate", "--gpu", "t4", "--json", *args])
        assert done.exit_code == 0, done.output
        return done.output, json.loads(done.output.strip().splitlines()[-1])

    _, one = estimate()
    text, ddp = estimate("--processes", "2")
    assert ddp["parts"] == one["parts"] and "each holds the whole base" in text
    text, fsdp = estimate("--processes", "2", "--fsdp")
    assert "the base sharded 2 ways (FSDP)" in text
    assert fsdp["parts"]["base weights"] == one["parts"]["base weights"] // 2
    assert fsdp["parts"]["AdamW states"] == one["parts"]["AdamW states"] // 2
    # Gathered whole for the step: the embedding and head (2 x 128256 x 4096), two of the 32 decoder layers.
    assert 0.5 * 2**30 < fsdp["parts"]["FSDP gathered units"] < 1.5 * 2**30
    assert one["fits"] is False and fsdp["fits"] is True  # 8B in fp16: 15 GiB of weights, 7.5 per T4
    _, four = estimate("--processes", "4", "--fsdp")
    assert four["total_bytes"] < fsdp["total_bytes"]


def test_processes_and_fsdp_need_estimate(tmp_path, trainable_model_dir):
    from typer.testing import CliRunner

    from lora_cli.cli import train_app

    config = make_config(tmp_path, trainable_model_dir("llama"))
    done = CliRunner().invoke(train_app, [str(config), "--processes", "2"])
    assert done.exit_code == 2 and "go with --estimate" in done.output


def test_accelerate_launch_with_the_example_fsdp_config(tmp_path, trainable_model_dir):
    """configs/accelerate/fsdp_2gpu.yaml as shipped, except use_cpu: FSDP comes from the Accelerate config alone."""
    example = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/accelerate/fsdp_2gpu.yaml").read_text())
    assert example["fsdp_config"]["fsdp_version"] == 2 and example["num_processes"] == 2
    launch_config = tmp_path / "accelerate.yaml"
    launch_config.write_text(yaml.safe_dump({**example, "use_cpu": True}))
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=ROWS, data={"max_length": 24},
                         train={"max_steps": 3, "micro_batch_size": 2, "output_dir": str(tmp_path / "out")})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
                           "-m", "lora_cli", "train", str(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP: the model's weights sharded over 2 processes" in " ".join(done.stderr.split())
    assert [r["step"] for r in metrics(tmp_path / "out") if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def _gpt_oss(folder: Path) -> Path:
    """A tiny GPT-OSS: loaded in fp16 it keeps its norms in fp32 (transformers' _keep_in_fp32_modules)."""
    import transformers

    import tiny

    config = transformers.GptOssConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_base_built_without_weights_is_laid_out_as_the_loaded_one(tmp_path, tiny_model_dir, dtype):
    """What FSDP's processes other than 0 build instead of loading (process 0 broadcasts the weights into it): the
    same parameter names, shapes and dtypes (fp32 where a model keeps fp32), the same computed buffers, the same
    generation config, and no weight in memory."""
    from lora_cli.models import load_base_model, load_base_shapes
    from lora_cli.training.fsdp import _layout

    folders = [tiny_model_dir(arch) for arch in ("llama", "llama_tied", "gpt2", "gpt_neox", "qwen2", "opt", "phi")]
    for folder in [*folders, _gpt_oss(tmp_path / "gpt_oss")]:
        loaded = load_base_model(str(folder), getattr(torch, dtype))
        built = load_base_shapes(str(folder), getattr(torch, dtype))
        assert _layout(built) == _layout(loaded), folder
        assert built.generation_config.to_dict() == loaded.generation_config.to_dict()
        assert all(p.is_meta for p in built.parameters()) and not built.training
        assert not any(p.requires_grad for p in built.parameters())
        if folder.name == "gpt_oss" and dtype == "float16":  # the case the layout must get right
            assert built.get_parameter("model.norm.weight").dtype == torch.float32


def test_fsdp_stops_early_together_and_logs_to_trackers_once(tmp_path, trainable_model_dir):
    """Early stopping decides on the evaluation every process computes together, so all of them stop at the same
    step (one deciding alone would leave the others waiting in a collective); TensorBoard gets each step once, from
    the main process, equal to metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Threshold 100: no evaluation after the first counts as better, so patience 1 stops at the second (step 4).
    train = {"max_steps": STEPS, "micro_batch_size": 2, "logging_steps": 1, "eval_steps": 2, "fsdp": True,
             "early_stopping_patience": 1, "early_stopping_threshold": 100.0, "report_to": "tensorboard",
             "run_name": "sharded", "output_dir": str(tmp_path / "out")}
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=ROWS, data={"max_length": 24, "val_size": 3},
                         train=train)
    done = run_train(config, 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["stopped_early"] and state["global_step"] == 4 and state["best_step"] == 4  # better, not by 100
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert [p.name for p in (out / "runs").iterdir()] == ["sharded"]
    assert len(list((out / "runs" / "sharded").glob("events.out.tfevents.*"))) == 1  # one writer
    events = EventAccumulator(str(out / "runs" / "sharded"), size_guidance={"scalars": 0})
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        logged = [r for r in records if key in r]
        assert [p.step for p in events.Scalars(tag)] == [r["step"] for r in logged]
        assert [p.value for p in events.Scalars(tag)] == pytest.approx([r[key] for r in logged], rel=1e-6)


WORKER = '''
import importlib, os, sys

import torch

train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function
load_whole, load_shapes = train_module.load_base_model, train_module.load_base_shapes


def whole(*args, **kwargs):
    print(f"WHOLE MODEL LOADED BY {os.environ['RANK']}", file=sys.stderr, flush=True)
    return load_whole(*args, **kwargs)


def shapes(*args, **kwargs):
    model = load_shapes(*args, **kwargs)
    if os.environ.get("SKEW"):  # a layout process 0's loading does not give
        model.get_submodule("model.norm").weight.data = model.get_submodule("model.norm").weight.data.half()
    return model


train_module.load_base_model, train_module.load_base_shapes = whole, shapes
sys.argv = ["lora-train", "train", sys.argv[1]]
from lora_cli.cli import main

main()
'''


def test_only_process_0_loads_the_weights_and_a_different_layout_falls_back(tmp_path, trainable_model_dir):
    """Under FSDP process 1 builds the base without weights and receives its shards; should its layout differ from
    process 0's loaded one, it loads the whole model after all (with a note) and trains the same. The base is
    bf16 (model.dtype, from the fp32 checkpoint): the shards keep it, the LoRA weights stay fp32."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    runs = {}
    for name, skew in (("plain", ""), ("skewed", "1")):
        (tmp_path / name).mkdir()
        config = make_config(tmp_path / name, trainable_model_dir("llama"), rows=ROWS, data={"max_length": 24},
                             model={"dtype": "bfloat16"}, train={"max_steps": 3, "micro_batch_size": 2, "fsdp": True,
                                                                 "output_dir": str(tmp_path / name / "out")})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "SKEW": skew}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(worker), str(config)], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        losses = [r["loss"] for r in metrics(tmp_path / name / "out") if "loss" in r]
        runs[name] = (" ".join(done.stderr.split()), losses)
    plain, skewed = runs["plain"][0], runs["skewed"][0]
    assert "WHOLE MODEL LOADED BY 0" in plain and "WHOLE MODEL LOADED BY 1" not in plain
    assert "note:" not in plain
    assert "WHOLE MODEL LOADED BY 1" in skewed
    assert "process 1 built without weights differs from process 0's (process 0 has ('model.norm.weight', (32,), " \
        "'torch.bfloat16'), process 1 ('model.norm.weight', (32,), 'torch.float16'))" in skewed
    assert runs["skewed"][1] == runs["plain"][1]
    lora, total = (int(n.replace(",", "")) for n in re.search(r"trainable params ([\d,]+) of ([\d,]+)", plain).groups())
    held = re.search(r"([\d.]+) MiB held by each, of ([\d.]+) MiB", plain)
    assert float(held.group(2)) == pytest.approx(((total - lora) * 2 + lora * 4) / 2**20, abs=1e-3)  # bf16 + fp32
    assert float(held.group(1)) == pytest.approx(float(held.group(2)) / 2, rel=0.1)
    adapter = load_file(str(tmp_path / "plain" / "out" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
