#!/usr/bin/env python
"""lora-cli against PEFT + transformers Trainer on a CUDA GPU: a launch-bound and a compute-bound model, fixed and
variable-length data, the kernels a T4 gets and the GPU's own (issue 21). The Python half of scripts/gpu_bench.sh.

    python scripts/gpu_bench.py --out DIR          # about 4 minutes on an H200; DIR/gpu_bench.md and .json
    python scripts/gpu_bench.py --dry-run --out DIR  # a tiny model on the CPU, one step per run: the plumbing only

Models (random weights, built here offline with the tests' tokenizer): the SmolLM2-135M shape (at micro batch 4
bound by kernel launches and host syncs) and the Llama-3.2-1B shape (bound by arithmetic). Workloads, as
scripts/bench.py runs them: `fixed` (every example --seq-len tokens), `variable` chat data that lora-cli trains
packed and unpacked (length-grouped, padded to a multiple of 64 on a GPU) and PEFT + Trainer with its defaults.
Settings: `t4`, fp16 with flash attention disabled and PyTorch's memory capped at 15 GiB (what a Tesla T4 runs),
and `native`, bf16 with every kernel (fp16 below compute capability 8.0). Every run is one scripts/bench.py child
process; the table gives tokens/s (non-padding), peak torch.cuda.max_memory_allocated and host syncs per optimizer
step (torch.cuda.set_sync_debug_mode("warn") counts them) for both tools, and their ratios. Runs that would not fit
in --budget seconds are listed as owed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import bench  # scripts/ modules, beside this script
from synthetic import LLAMA_32_1B, SMOLLM2_135M, make_tokenizer, random_model, write_workloads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {"smollm2-135m": SMOLLM2_135M, "llama-3.2-1b": LLAMA_32_1B}
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=384, tie_word_embeddings=True)
SETTINGS = {  # name -> (precision, bench.py flags)
    "t4": ("fp16", ["--no-flash", "--memory-cap-gib", "15"]),
    "native": (None, []),  # bf16 where the GPU has it, else fp16
}
# (lora-cli variant, PEFT run it is compared with): the variable workload's PEFT run serves both lora-cli rows.
ROWS = [("fixed", "lora-cli", ""), ("fixed", "peft", ""), ("variable", "lora-cli", "packed"),
        ("variable", "lora-cli", "unpacked"), ("variable", "lora-cli", "unpacked, pad 1"), ("variable", "peft", "")]
PAD_COMPARED = "unpacked, pad 1"  # lora-train's padding to a multiple of 64 on a GPU against none (native only)
COLUMNS = ["model", "setting", "workload", "lora-cli tokens/s", "PEFT tokens/s", "ratio", "lora-cli peak MiB",
           "PEFT peak MiB", "ratio", "lora-cli syncs/step", "PEFT syncs/step"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."), help="where gpu_bench.md and gpu_bench.json go")
    p.add_argument("--cache", type=Path, default=Path("/tmp/gpu_bench"), help="models and data are built here")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of: {', '.join(MODELS)}")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of: {', '.join(SETTINGS)}")
    p.add_argument("--workloads", default="fixed,variable", help="comma list of: fixed, variable")
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="fixed workload: tokens per example")
    p.add_argument("--max-length", type=int, default=512, help="variable workload: data.max_length")
    p.add_argument("--variable-examples", type=int, default=400)
    p.add_argument("--budget", type=float, default=270, help="seconds for all runs; the rest are listed as owed")
    p.add_argument("--dry-run", action="store_true", help="a tiny model on this machine's device, one step a run")
    return p


def plan_runs(args) -> list[tuple[str, str, str, str, str]]:
    """(model, setting, workload, tool, variant) in the order they run: one model and setting at a time."""
    workloads = args.workloads.split(",")
    return [(model, setting, *row) for model in args.models.split(",") for setting in args.settings.split(",")
            for row in ROWS if row[0] in workloads and (row[2] != PAD_COMPARED or setting == "native")]


def native_precision() -> str:
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def prepare(args) -> dict[str, tuple[Path, dict]]:
    """Each model's folder and its data files (built once in --cache)."""
    import torch

    cuda = torch.cuda.is_available()
    tokenizer = make_tokenizer()
    prepared = {}
    for name in args.models.split(","):
        shape = TINY if args.dry_run else MODELS[name]
        folder = random_model(args.cache / (f"{name}-tiny" if args.dry_run else name), shape,
                              "cuda" if cuda else "cpu", "bfloat16" if cuda else "float32")
        n_fixed = max(64, (args.warmup + args.steps + 1) * args.micro_batch * 2)
        data = write_workloads(args.cache / "data", tokenizer, args.seq_len, n_fixed, args.variable_examples,
                               lexicon_size=3000)
        prepared[name] = (folder, data)
    return prepared


def bench_args(args, model: Path, setting: str, variant: str = ""):
    """scripts/bench.py's arguments for one model and setting (its child runs take the same ones)."""
    precision, flags = SETTINGS[setting]
    flags = flags + (["--pad-multiple", "1"] if variant == PAD_COMPARED else [])
    precision = "fp32" if args.dry_run and not _cuda() else precision or native_precision()
    argv = ["--model", str(model), "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch",
            str(args.micro_batch), "--seq-len", str(args.seq_len), "--max-length", str(args.max_length),
            "--precision", precision, "--repeats", "1", *flags]
    return bench.build_parser().parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_all(args, prepared: dict) -> tuple[dict, list]:
    """Every planned run that fits in the budget: {(model, setting, workload, name): result}, and the owed ones."""
    results, owed, started = {}, [], time.monotonic()
    for model, setting, workload, tool, variant in plan_runs(args):
        name = f"{tool} {variant}".strip()
        if time.monotonic() - started > args.budget:
            owed.append((model, setting, workload, name))
            continue
        folder, data = prepared[model]
        print(f"[gpu_bench] {model} {setting} {workload}: {name}", flush=True)
        try:
            results[(model, setting, workload, name)] = bench.run_one(bench_args(args, folder, setting, variant),
                                                                      tool, workload, data[workload], variant)
        except SystemExit as failed:  # bench.run_one prints the child's output; the table says which failed
            print(f"[gpu_bench]   failed: {failed}", flush=True)
            owed.append((model, setting, workload, f"{name} (failed)"))
    return results, owed


def table(results: dict, owed: list, precisions: dict) -> list[str]:
    """The markdown table: one line per lora-cli row, with the PEFT run of the same model, setting and workload."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for (model, setting, workload, name), run in results.items():
        if name.startswith("peft"):
            continue
        peft = results.get((model, setting, workload, "peft"))
        ours = _figures(run)
        theirs = _figures(peft) if peft else None
        label = workload if workload == "fixed" else f"{workload} {name.split(' ', 1)[1]}"
        cells = [model, f"{setting} ({precisions[setting]})", label, f"{ours['tokens_s']:.0f}",
                 _cell(theirs, "tokens_s", "{:.0f}"), _ratio(ours, theirs, "tokens_s"), f"{ours['peak_mib']:.0f}",
                 _cell(theirs, "peak_mib", "{:.0f}"), _ratio(ours, theirs, "peak_mib"), _syncs(ours),
                 _syncs(theirs)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"| {model} | {setting} | {workload} | owed: {name} | | | | | | | |"
              for model, setting, workload, name in owed]
    return lines


def _figures(run: dict) -> dict:
    peak = run["cuda_peak_mb"] if run.get("cuda_peak_mb") is not None else run["peak_rss_mb"]
    return {"tokens_s": run["tokens"] / run["seconds"], "peak_mib": peak, "syncs": run.get("syncs_per_step")}


def _cell(figures: dict | None, key: str, fmt: str) -> str:
    return "-" if figures is None else fmt.format(figures[key])


def _ratio(ours: dict, theirs: dict | None, key: str) -> str:
    return "-" if not theirs or not theirs[key] else f"{ours[key] / theirs[key]:.2f}x"


def _syncs(figures: dict | None) -> str:
    return "-" if figures is None or figures["syncs"] is None else f"{figures['syncs']:.1f}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup, args.seq_len, args.max_length, args.micro_batch = 1, 1, 32, 64, 2
        args.variable_examples = min(args.variable_examples, 48)
    import torch

    began = time.monotonic()
    prepared = prepare(args)
    precisions = {s: bench_args(args, Path("."), s).precision for s in args.settings.split(",")}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"[gpu_bench] models ready in {time.monotonic() - began:.0f}s; device {device}", flush=True)
    results, owed = run_all(args, prepared)
    header = [
        f"# lora-cli vs PEFT + Trainer on {device}",
        "",
        f"command: python {' '.join(sys.argv)}",
        f"micro batch {args.micro_batch}, fixed {args.seq_len} tokens, variable data.max_length {args.max_length}, "
        f"LoRA r=16 all-linear, {args.warmup} warmup + {args.steps} measured steps per run, one run each; "
        f"t4 = fp16, no flash attention, 15 GiB cap; total {time.monotonic() - began:.0f}s",
        "",
    ]
    text = "\n".join(header + table(results, owed, precisions)) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.md").write_text(text, encoding="utf-8")
    (args.out / "gpu_bench.json").write_text(json.dumps(
        {"device": device, "runs": [{"model": m, "setting": s, "workload": w, "tool": n, **r}
                                    for (m, s, w, n), r in results.items()], "owed": owed}, indent=1))


if __name__ == "__main__":
    main()
