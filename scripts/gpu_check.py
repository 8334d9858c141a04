#!/usr/bin/env python
"""The Python half of scripts/gpu_check.sh: each subcommand measures one stage and writes a markdown section.

    python scripts/gpu_check.py context --md env.md
    python scripts/gpu_check.py smollm2 --out DIR         # a random SmolLM2-135M-shaped model (offline fallback)
    python scripts/gpu_check.py train-capped --cap-gib 15 --md q.md -- configs/quickstart.yaml key=value ...
    python scripts/gpu_check.py estimate-check --workdir DIR --md e.md [--smoke]

`train-capped` runs lora-train in this process after capping PyTorch's CUDA allocator at --cap-gib (a T4's
15 GiB), so lora-cli itself needs no test hook. `estimate-check` builds three random models from config.json-style
shapes, runs `--estimate` and a few real training steps for each, and compares the estimate with
torch.cuda.max_memory_allocated. `--smoke` runs the same flow with tiny shapes in fp32 on a CPU (the test suite
does, so the GPU run does not fail on a typo).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

from synthetic import SMOLLM2_135M, make_tokenizer, random_model  # scripts/synthetic.py, beside this script

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GiB = 2**30

# Three public shapes (values from their config.json files), trained as lora-train would on a T4 (fp16).
ESTIMATE_CASES = [
    ("Llama-3.2-1B shape, all-linear r=16, 4 x 512, no checkpointing",
     dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
     dict(lora={"r": 16, "alpha": 32, "target_modules": "all-linear"}, micro_batch_size=4, max_length=512)),
    ("Qwen2.5-0.5B shape, q/v r=8, 8 x 1024, checkpointing",
     dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
          intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
     dict(lora={"r": 8, "alpha": 16}, micro_batch_size=8, max_length=1024, gradient_checkpointing=True)),
    ("Llama-3.2-1B shape in 4-bit (QLoRA), all-linear r=16, 4 x 512, checkpointing",
     dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
     dict(lora={"r": 16, "alpha": 32, "target_modules": "all-linear"}, micro_batch_size=4, max_length=512,
          gradient_checkpointing=True, load_in_4bit=True)),
    ("SmolLM2-360M shape, all-linear r=16, 4 x 1024 packed",
     dict(model_type="llama", hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
          intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True),
     dict(lora={"r": 16, "alpha": 32, "target_modules": "all-linear"}, micro_batch_size=4, max_length=1024,
          packing=True)),
]
SMOKE_CASES = [
    ("tiny llama", dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, vocab_size=384, tie_word_embeddings=True),
     dict(lora={"r": 4, "alpha": 8}, micro_batch_size=2, max_length=64)),
    ("tiny llama packed", dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=384),
     dict(lora={"r": 4, "alpha": 8, "target_modules": "all-linear"}, micro_batch_size=2, max_length=64,
          packing=True, gradient_checkpointing=True)),
    ("tiny llama 4-bit", dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, vocab_size=384),
     dict(lora={"r": 4, "alpha": 8, "target_modules": "all-linear"}, micro_batch_size=2, max_length=64,
          load_in_4bit=True)),
]


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


# --- context -------------------------------------------------------------------------------------------------


def context(args) -> str:
    import torch
    import transformers

    torch.zeros(1, device="cuda")
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()  # cuBLAS initialised too
    free, total = torch.cuda.mem_get_info()
    used = total - free - torch.cuda.memory_reserved()
    props = torch.cuda.get_device_properties(0)
    cap = torch.cuda.get_device_capability(0)
    return "\n".join([
        f"- GPU: {props.name}, compute capability {cap[0]}.{cap[1]}, {total / GiB:.1f} GiB",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"python {sys.version.split()[0]}",
        f"- CUDA context + cuBLAS workspace after the first fp16 matmul: {_mib(used)} "
        f"(memory_model.CUDA_CONTEXT_BYTES assumes 500 MiB)",
        f"- bf16 supported by capability (>= 8.0): {cap >= (8, 0)}",
    ])


# --- a random SmolLM2 -----------------------------------------------------------------------------------------


def smollm2(args) -> str:
    random_model(Path(args.out), SMOLLM2_135M, _device(), "float16" if _device() == "cuda" else "float32")
    return (f"- no models/SmolLM2-135M-Instruct here: built a random SmolLM2-135M-shaped model (the loss stays near "
            f"ln(vocabulary)) ({args.out})")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- lora-train in this process, under a memory cap -------------------------------------------------------------


def run_lora_train(argv: list[str], cap_gib: float | None) -> dict:
    """lora-train ARGV in this process; its exit code, time and (on CUDA) peak allocated/reserved memory."""
    import torch

    from lora_cli.cli import main_app

    cuda = torch.cuda.is_available()
    before = 0
    if cuda:
        if cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), 0)
        gc.collect()  # whatever an earlier run in this process left must not count against this one
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        code = main_app(["train", *argv], prog_name="lora-train", standalone_mode=False) or 0
    except SystemExit as err:
        code = err.code or 0
    result = {"exit_code": int(code), "seconds": time.perf_counter() - start,
              "max_allocated": torch.cuda.max_memory_allocated() - before if cuda else None,
              "allocated_before": before if cuda else None,
              "max_reserved": torch.cuda.max_memory_reserved() if cuda else None}
    if cuda:
        torch.cuda.empty_cache()
    return result


def train_capped(args) -> str:
    result = run_lora_train(args.argv, args.cap_gib)
    out = next((a.split("=", 1)[1] for a in args.argv if a.startswith("train.output_dir=")), None)
    lines = [f"- `lora-train {' '.join(args.argv)}` with the CUDA allocator capped at {args.cap_gib:g} GiB",
             f"- exit code {result['exit_code']}, {result['seconds']:.1f} s, peak allocated "
             f"{_mib(result['max_allocated'])}, peak reserved {_mib(result['max_reserved'])}"]
    if out and (Path(out) / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
        losses = [r["loss"] for r in records if "loss" in r]
        if losses:
            lines.append(f"- loss: first logged {losses[0]:.4f}, last {losses[-1]:.4f} ({len(losses)} records)")
    if out and (Path(out) / "trainer_state.json").is_file():
        state = json.loads((Path(out) / "trainer_state.json").read_text())
        lines.append(f"- optimizer steps {state.get('global_step')}, skipped (fp16 overflow or non-finite) "
                     f"{state.get('skipped_steps')}")
    if result["exit_code"] != 0:
        raise SystemExit("\n".join(lines) + "\nlora-train failed")
    return "\n".join(lines)


# --- estimate vs measurement ------------------------------------------------------------------------------------


def _words(n: int, rng: random.Random) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                    for _ in range(n))


def _tokens_per_word() -> float:
    return len(make_tokenizer()(_words(2000, random.Random(1)))["input_ids"]) / 2000


def _write_data(path: Path, rows: int, words: int, seed: int = 0) -> None:
    """`rows` text examples of `words` random words each."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": _words(words, rng)}) + "\n" for _ in range(rows)), encoding="utf-8")


def _config_yaml(model: Path, data: Path, out: Path, settings: dict, precision: str, steps: int) -> dict:
    train = {"output_dir": str(out), "overwrite_output_dir": True, "max_steps": steps, "logging_steps": 1,
             "precision": precision, "micro_batch_size": settings["micro_batch_size"],
             "gradient_checkpointing": settings.get("gradient_checkpointing", False)}
    data_section = {"path": str(data), "format": "text", "max_length": settings["max_length"],
                    "packing": settings.get("packing", False)}
    model_section = {"name_or_path": str(model), "load_in_4bit": settings.get("load_in_4bit", False)}
    return {"model": model_section, "lora": settings["lora"], "data": data_section, "train": train}


def estimate_check(args) -> str:
    import torch
    import yaml

    from lora_cli.config import load_config
    from lora_cli.estimate import estimate_for_config

    cuda = torch.cuda.is_available()
    cases = SMOKE_CASES if args.smoke else ESTIMATE_CASES
    precision = "fp16" if cuda else "fp32"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = ["| configuration | estimated allocated | measured max_memory_allocated | error | estimate total (with "
            "CUDA context + allocator) | measured max reserved | allocated before the run |",
            "|---|---|---|---|---|---|---|"]
    for i, (name, shape, settings) in enumerate(cases):
        # One folder per shape: the 4-bit case loads the same fp16 checkpoint as its 16-bit twin.
        shape_id = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
        model = random_model(work / f"model-{shape_id}", shape, "cuda" if cuda else "cpu",
                             "float16" if cuda else "float32")
        data = work / f"data{i}.jsonl"
        # Unpacked: every example longer than max_length (truncated), so each batch is full and unpadded. Packed:
        # examples of ~24% of max_length, so a row holds four and is ~96% full.
        per_word = _tokens_per_word()
        words = int(0.24 * settings["max_length"] / per_word) if settings.get("packing") else settings["max_length"]
        _write_data(data, rows=settings["micro_batch_size"] * 8, words=words)
        config = work / f"config{i}.yaml"
        config.write_text(yaml.safe_dump(_config_yaml(model, data, work / f"out{i}", settings, precision, 3)))
        estimate = estimate_for_config(load_config(config), "t4")
        allocated = estimate.total_bytes - estimate.parts.get("CUDA context + allocator", 0)
        measured = run_lora_train([str(config)], args.cap_gib)
        if measured["exit_code"] != 0:
            raise SystemExit(f"lora-train failed on {name} (exit {measured['exit_code']})")
        peak = measured["max_allocated"]
        error = f"{allocated / peak - 1:+.1%}" if peak else "n/a"
        rows.append(f"| {name} | {_mib(allocated)} | {_mib(peak)} | {error} | {_mib(estimate.total_bytes)} | "
                    f"{_mib(measured['max_reserved'])} | {_mib(measured['allocated_before'])} |")
        print(rows[-1], flush=True)
        print("\n".join("    " + line for line in _part_lines(estimate)), flush=True)
    return "\n".join(rows)


def _part_lines(estimate) -> list[str]:
    return [f"{name}: {_mib(size)}" for name, size in estimate.parts.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("context", "smollm2", "train-capped", "estimate-check"):
        s = sub.add_parser(name)
        s.add_argument("--md", type=Path, default=None, help="write the markdown section here too")
        if name == "smollm2":
            s.add_argument("--out", required=True)
        if name in ("train-capped", "estimate-check"):
            s.add_argument("--cap-gib", type=float, default=15.0)
        if name == "estimate-check":
            s.add_argument("--workdir", required=True)
            s.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU allowed")
        if name == "train-capped":
            s.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    handler = {"context": context, "smollm2": smollm2, "train-capped": train_capped,
               "estimate-check": estimate_check}[args.command]
    text = handler(args)
    print(text, flush=True)
    if args.md:
        args.md.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
