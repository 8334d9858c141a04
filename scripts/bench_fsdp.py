#!/usr/bin/env python
"""Per-process memory of lora-train on two CPU processes (gloo): plain data parallelism (DDP) against FSDP.

    python scripts/bench_fsdp.py                 # a ~330 MB fp32 Llama-shaped model (random weights), 3 steps
    python scripts/bench_fsdp.py --layers 16 --repeats 2
    python scripts/bench_fsdp.py --dtype bfloat16  # the fp32 checkpoint converted while loading

Builds a random Llama-shaped model in a temporary folder, then runs lora-train on it three ways: one process, two
DDP processes (torchrun), two FSDP processes (torchrun, train.fsdp=true), alternating when repeated. Each process
reports, once the model is loaded and when training has ended (before the final save), its peak RSS so far (VmHWM)
and its RSS then (VmRSS), and lora-train's FSDP line gives the parameter bytes each process holds. On CPU the
model's memory is the process's RAM, so RSS is what a GPU's memory would be; process 0 of an FSDP run reads the
whole model from disk (CPU-RAM-efficient loading: the others build theirs without weights and receive their shards
from it), so its peak holds the whole base once while loading.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "BENCH_FSDP_RSS "


def report_when_trained() -> None:
    """In a worker: print this process's peak RSS and its RSS when the model is loaded (LoRA applied, before
    sharding) and when training ends (before the final save)."""
    import importlib

    train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function
    finish, prepare = train_module.finish, train_module.prepare_model_and_data

    def report(when: str) -> None:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        kib = {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}
        print(MARK + json.dumps({"rank": int(os.environ.get("RANK", "0")), "when": when, **kib}), file=sys.stderr,
              flush=True)

    def report_then_finish(run, *args, **kwargs):
        report("trained")
        return finish(run, *args, **kwargs)

    def report_after_loading(*args, **kwargs):
        loaded = prepare(*args, **kwargs)
        report("loaded")
        return loaded

    train_module.finish, train_module.prepare_model_and_data = report_then_finish, report_after_loading


def make_model(folder: Path, layers: int) -> int:
    import torch
    import transformers

    import synthetic  # scripts/synthetic.py, beside this script: the tiny tokenizer the tests use too

    config = transformers.LlamaConfig(vocab_size=synthetic.TINY_VOCAB, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    synthetic.make_tokenizer().save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.parameters())


def write_config(root: Path, model: Path, name: str, fsdp: bool, steps: int, dtype: str) -> Path:
    import yaml

    rows = [{"text": "the lighthouse of quillhaven is painted green and tall " * 6} for _ in range(16)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"name_or_path": str(model), "dtype": dtype},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"path": str(root / "data.jsonl"), "max_length": 128},
        "train": {"output_dir": str(root / name), "max_steps": steps, "micro_batch_size": 1, "logging_steps": 1,
                  "fsdp": fsdp, "overwrite_output_dir": True},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, processes: int) -> dict:
    # Large allocations from mmap, so that what a process frees goes back to the system and RSS shows what is live
    # (glibc otherwise keeps freed tensors in its heap: a broadcast's or all-gather's buffers would stay counted).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
    worker = [str(Path(__file__).resolve()), "--worker", str(config)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *worker]
           if processes > 1 else [sys.executable, *worker])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    reports = [json.loads(found) for found in re.findall(re.escape(MARK) + r"(\{[^}]*\})", done.stderr)]
    ranks = {r["rank"]: {} for r in reports}
    for r in reports:
        ranks[r["rank"]][r["when"]] = r
    held = re.search(r"([\d.]+ [MG]iB) held by each", done.stderr.replace("\n", " "))
    return {"ranks": [ranks[rank] for rank in sorted(ranks)], "held": held.group(1) if held else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="model.dtype (the checkpoint is fp32; auto is fp32 on CPU)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        report_when_trained()
        sys.argv = ["lora-train", "train", str(args.worker)]
        from lora_cli.cli import main as lora_main

        lora_main()
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = make_model(root / "model", args.layers)
        print(f"model: {weights / 2**20:.0f} MiB of fp32 weights ({args.layers} layers, hidden 1024)")
        runs = {"1 process": (False, 1), "2 x DDP": (False, 2), "2 x FSDP": (True, 2)}
        for repeat in range(args.repeats):
            for name, (fsdp, processes) in runs.items():
                config = write_config(root, root / "model", name.replace(" ", ""), fsdp, args.steps, args.dtype)
                result = run(config, processes)
                mib = lambda r, when: f"{r[when]['VmRSS'] / 1024:.0f} MiB (peak {r[when]['VmHWM'] / 1024:.0f})"  # noqa: E731
                cells = ", ".join(f"rank {rank}: loaded {mib(r, 'loaded')}, trained {mib(r, 'trained')}"
                                  for rank, r in enumerate(result["ranks"]))
                held = f"; weights held per process {result['held']}" if result["held"] else ""
                print(f"[{repeat + 1}] {name:10s} {cells}{held}", flush=True)


if __name__ == "__main__":
    main()
