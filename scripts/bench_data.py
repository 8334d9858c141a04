#!/usr/bin/env python
"""Benchmark of the tokenized-data cache (issue 18) on a synthetic chat JSONL: first start (tokenize and write the
cache), second start (open it), the in-memory pipeline, and `datasets.map` on the same rows as the time reference.

Each measurement runs in a child process of its own, so its peak RSS (ru_maxrss) is its own.

    python scripts/bench_data.py --rows 1000000 --tokenizer models/SmolLM2-135M-Instruct --work /tmp/bench_data

The data file (about 0.8 kB a row) is generated once into --work and reused; it is not committed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the lighthouse keeper of quillhaven painted the tower green every spring while gulls argued about bread "
         "and the harbour master counted boats that never came home before the tide turned cold and grey").split()


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    """Chat rows like OpenHermes/SlimOrca: a system prompt on some, one to three user/assistant turns."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for i in range(rows):
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))})
                messages.append({"role": "assistant",
                                 "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 90)))})
            out.write(json.dumps({"messages": messages}) + "\n")
    tmp.rename(path)


def config(data: Path, tokenizer: str, work: Path, max_length: int, num_proc: int | str = 1):
    from lora_cli.config import validate_config

    return validate_config({
        "model": {"name_or_path": tokenizer},
        "data": {"path": str(data), "max_length": max_length, "val_size": 0.01, "cache_dir": str(work / "cache"),
                 "num_proc": num_proc},
        "train": {"output_dir": str(work / "out")},
    })


def child(mode: str, data: Path, tokenizer_path: str, work: Path, max_length: int, num_proc: int) -> dict:
    """One measurement, in this (child) process."""
    from lora_cli import data as data_lib
    from lora_cli.models import load_tokenizer
    from lora_cli.training.plan import make_batches

    cfg = config(data, tokenizer_path, work, max_length, num_proc)
    tokenizer = load_tokenizer(tokenizer_path, None, False)
    started = time.perf_counter()
    if mode in ("cache-first", "cache-second"):
        bundle = data_lib.load_data(cfg, tokenizer, Path(cfg.train.output_dir), say=lambda m: None)
        loaded = time.perf_counter() - started
        make_batches(bundle.train, cfg, 0)  # the first epoch's plan, from the lengths
        packed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"packing": True})})
        plan_started = time.perf_counter()
        make_batches(bundle.train, packed, 0)
        result = {"examples": len(bundle.train), "load_s": loaded,
                  "plan_s": plan_started - started - loaded, "pack_plan_s": time.perf_counter() - plan_started}
    elif mode == "in-memory":
        bundle = data_lib.build_in_memory(data_lib.options_from(cfg), tokenizer)
        result = {"examples": len(bundle.train), "load_s": time.perf_counter() - started}
    elif mode == "datasets-map":
        result = _datasets_map(data, tokenizer, max_length, work)
    else:
        raise SystemExit(f"unknown mode {mode}")
    result["total_s"] = time.perf_counter() - started
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["peak_rss_gb"] = own.ru_maxrss / 2**20
    # CPU seconds, this process's and its tokenizing workers' (data.num_proc): on shared cores the wall time
    # depends on the neighbours, the CPU time much less.
    result["cpu_s"] = own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
    return result


def _datasets_map(data: Path, tokenizer, max_length: int, work: Path) -> dict:
    """The reference: `datasets` reads the JSONL into Arrow and maps chat template + tokenizer over it in batches
    (no masking: it is the lower bound of what the same tokenization costs through `datasets`)."""
    import datasets

    cache = work / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))

    def tokenize(batch):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return tokenizer(texts, truncation=True, max_length=max_length)

    mapped = dataset.map(tokenize, batched=True, batch_size=1000, remove_columns=["messages"])
    return {"examples": len(mapped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokenizer", required=True, help="a model folder with tokenizer.json and a chat template")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_data"))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--modes", default="cache-first,cache-second,datasets-map")
    parser.add_argument("--num-proc", default="1", help="data.num_proc: processes that tokenize, or auto")
    parser.add_argument("--tokenizers-parallelism", choices=("true", "false"), default="false",
                        help="TOKENIZERS_PARALLELISM for the children: the Rust tokenizer's own threads in a batch "
                             "(lora-train sets false)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.work / f"chat_{args.rows}.jsonl"
    if args.child:
        print(json.dumps(child(args.child, data, args.tokenizer, args.work, args.max_length, args.num_proc)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        make_data(data, args.rows)
    print(f"data: {data} ({data.stat().st_size / 1e6:.0f} MB, {args.rows} rows)", flush=True)
    for mode in args.modes.split(","):
        if mode == "cache-first":
            shutil.rmtree(args.work / "cache", ignore_errors=True)
        cmd = [sys.executable, __file__, "--rows", str(args.rows), "--tokenizer", args.tokenizer, "--work",
               str(args.work), "--max-length", str(args.max_length), "--num-proc", str(args.num_proc), "--child", mode]
        env = dict(os.environ, TOKENIZERS_PARALLELISM=args.tokenizers_parallelism)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"{mode}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if mode.startswith("cache"):
            result["cache_gb"] = sum(f.stat().st_size for f in (args.work / "cache").rglob("*") if f.is_file()) / 1e9
        print(mode, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}),
              flush=True)


if __name__ == "__main__":
    main()
