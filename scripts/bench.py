#!/usr/bin/env python
"""Benchmark lora-cli against PEFT + transformers Trainer on the same model, data and hyperparameters.

    python scripts/bench.py                      # default ~35M Llama (random weights, 32k BPE vocab), both workloads
    python scripts/bench.py --model models/SmolLM2-135M-Instruct --steps 4
    python scripts/bench.py --gradient-checkpointing
    python scripts/bench.py --workloads variable --also-unpacked --repeats 3
    python scripts/bench.py --load-in-4bit       # QLoRA: both tools on an NF4 base (bitsandbytes)

Each run is its own subprocess (so peak memory is the run's own), runs alternate between the two tools
(A B A B ...), and the table shows the median over repeats. Both tools train the same tokenized examples with the
same LoRA rank, alpha, targets, micro batch, sequence length, steps, learning-rate schedule, clipping and
precision (fp32 on CPU). Measured are the steps after `--warmup` steps, from the end of one optimizer step to the end
of another (Accelerate's optimizer step, which both tools call, whether fp16's loss scaler applies or skips it):

* examples/s and tokens/s counting only non-padding tokens (every non-padding token is trained in both tools:
  lora-cli runs with data.train_on_inputs=true to match DataCollatorForLanguageModeling, which trains everything);
* peak memory: peak RSS of the run's process on CPU, torch.cuda.max_memory_allocated on GPU;
* the FLOP ceiling: measured fp32 matmul GFLOP/s / (4 x matmul parameters) tokens/s (forward 2N plus the
  input-gradient backward 2N; LoRA's own small matmuls and attention scores are not counted), and the fraction of
  it each run reaches.

Workloads:
  fixed     every example exactly --seq-len tokens (text format, truncated): raw speed, no padding anywhere.
  variable  chat-format instruction data, lengths spread like real chat data (log-normal, 20..512 tokens).
            lora-cli packs (data.packing=true); PEFT+Trainer uses its defaults (random order, pad to the longest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_child import run_child  # scripts/ modules: this folder is on sys.path when a script runs
from bench_loss import bench_loss
from synthetic import build_default_model, write_workloads

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "runs" / "bench"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# --------------------------------------------------------------------------------------------------------------
# Machine and model figures


def matmul_gflops(device: str = "cpu", seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of large square matmuls: the machine's practical peak for the ceiling."""
    import torch

    best = 0.0
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def matmul_params(model_dir: Path) -> tuple[int, int]:
    """(parameters in the matmuls of one token's forward pass: every Linear/Conv1D incl. the output head, total)."""
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    head = model.get_output_embeddings()
    if head is not None and not isinstance(head, (torch.nn.Linear, Conv1D)):
        n += head.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()
    return n, total


# --------------------------------------------------------------------------------------------------------------
# Parent: alternate runs and print the table


def child_command(args, tool: str, workload: str, data: Path, result: Path, variant: str = "") -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--workload", workload, "--data", str(data),
           "--result", str(result), "--model", str(args.model), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--max-length",
           str(args.max_length), "--r", str(args.r), "--alpha", str(args.alpha), "--targets", args.targets,
           "--precision", args.precision, "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.no_flash:
        cmd.append("--no-flash")
    if args.memory_cap_gib:
        cmd += ["--memory-cap-gib", str(args.memory_cap_gib)]
    if args.pad_multiple:
        cmd += ["--pad-multiple", str(args.pad_multiple)]
    if args.load_in_4bit and "unquantized" not in variant:
        cmd.append("--load-in-4bit")
    if "unpacked" in variant:
        cmd.append("--unpacked")
    if "masked" in variant:
        cmd.append("--prompt-masked")
    return cmd


def run_one(args, tool, workload, data, variant="") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = child_command(args, tool, workload, data, result, variant)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"[bench] {tool} on {workload} failed (exit {proc.returncode}): {' '.join(cmd)}")
        run = json.loads(result.read_text())
        if run.get("skipped_steps"):
            print(f"[bench]   {run['skipped_steps']} of the {args.steps} measured steps were skipped by the fp16 loss "
                  "scaler (their time and batches are counted)", flush=True)
        return run


def summarise(runs: list[dict]) -> dict:
    def med(key):
        return statistics.median(key(r) for r in runs)

    mem = (lambda r: r["cuda_peak_mb"]) if runs[0]["cuda_peak_mb"] is not None else (lambda r: r["peak_rss_mb"])
    return {
        "examples_s": med(lambda r: r["examples"] / r["seconds"]),
        "tokens_s": med(lambda r: r["tokens"] / r["seconds"]),
        "tokens_s_runs": [r["tokens"] / r["seconds"] for r in runs],
        "padding": med(lambda r: 1 - r["tokens"] / r["padded_tokens"]),
        "peak_mb": med(mem),
        "peak_above_start_mb": med(lambda r: r["peak_rss_mb"] - r["rss_start_mb"]),
        "live_step_peak_mb": med(lambda r: r["live_step_peak_mb"] or 0.0),
        "syncs_per_step": (med(lambda r: r["syncs_per_step"]) if runs[0].get("syncs_per_step") is not None
                           else None),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: build a ~35M Llama offline)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="default model only: widen its embedding and head to this vocabulary (tokenizer stays 32k)")
    p.add_argument("--workloads", default="fixed,variable", help="comma list of: fixed, variable")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    p.add_argument("--repeats", type=int, default=2, help="runs per tool and workload, alternating A B A B")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="fixed workload: tokens per example")
    p.add_argument("--max-length", type=int, default=512, help="variable workload: data.max_length (packed row size)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="all-linear", help="all-linear, or a comma list such as q_proj,v_proj")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="both tools, non-reentrant")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="both tools on an NF4 4-bit base (QLoRA; PEFT with prepare_model_for_kbit_training), "
                        "and lora-cli on the unquantized base as well")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in every run (default: torch's choice)")
    p.add_argument("--no-flash", action="store_true",
                   help="both tools without flash attention (what a T4, compute capability 7.5, runs)")
    p.add_argument("--pad-multiple", type=int, default=0,
                   help="lora-cli unpacked: pad batches to a multiple of this (default: lora-train's own choice)")
    p.add_argument("--memory-cap-gib", type=float, default=0,
                   help="both tools: cap PyTorch's CUDA memory at this many GiB (a T4: 15)")
    p.add_argument("--also-unpacked", action="store_true", help="variable workload: also lora-cli without packing")
    p.add_argument("--also-masked", action="store_true",
                   help="variable workload: also both tools with lora-cli's default prompt masking (loss on replies "
                        "only; PEFT+Trainer gets the same labels through DataCollatorForSeq2Seq)")
    p.add_argument("--loss-only", action="store_true", help="only time the output head + loss, several ways")
    p.add_argument("--loss-tokens", type=int, default=2048, help="--loss-only: tokens in the batch")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the default model and data are built")
    # internal: one measured run
    p.add_argument("--child", choices=["lora-cli", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--unpacked", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-masked", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.child:
        run_child(args)
        return
    if args.loss_only:
        args.model = (args.model or build_default_model(args.cache / "llama-35m-v32k")).resolve()
        bench_loss(args)
        return
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step is timed from the end of a warmup step)")

    import torch
    import transformers

    if args.model is None:
        name = "llama-35m-v32k" if args.vocab_size == 32000 else f"llama-v{args.vocab_size}"
        args.model = build_default_model(args.cache / name, args.vocab_size)
    args.model = args.model.resolve()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    n_fixed = max(64, (args.warmup + args.steps) * args.micro_batch * 2)
    data = write_workloads(args.cache / "data" / args.model.name, tokenizer, args.seq_len, n_fixed, 1000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    gflops = matmul_gflops(device)
    n_matmul, n_total = matmul_params(args.model)
    ceiling = gflops * 1e9 / (4 * n_matmul)
    print("command: python " + " ".join(sys.argv))
    print(f"model {args.model.name}: {n_total / 1e6:.1f}M parameters, {n_matmul / 1e6:.1f}M in matmuls; "
          f"device {device}, {torch.get_num_threads()} threads")
    print(f"LoRA r={args.r} alpha={args.alpha:g} targets={args.targets}; micro batch {args.micro_batch}; "
          f"{args.warmup} warmup + {args.steps} measured steps; {args.repeats} alternating repeats; "
          f"precision {args.precision}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
          f"{'; 4-bit NF4 base' if args.load_in_4bit else ''}")

    results: dict = {"gflops": gflops, "matmul_params": n_matmul, "ceiling_tokens_s": ceiling, "workloads": {}}
    for workload in args.workloads.split(","):
        tools = [("lora-cli", "packed" if workload == "variable" else ""), ("peft", "")]
        if args.load_in_4bit:  # lora-cli on the unquantized base too: what 4 bits cost and save, same invocation
            tools.insert(1, ("lora-cli", "unquantized base"))
        if workload == "variable" and args.also_unpacked:
            tools.insert(1, ("lora-cli", "unpacked"))
        if workload == "variable" and args.also_masked:
            tools.insert(1, ("lora-cli", "packed, prompt masked"))
            tools.append(("peft", "prompt masked"))
        runs: dict[str, list] = {}
        for rep in range(args.repeats):
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool, variant in order:
                name = f"{tool} {variant}".strip()
                print(f"[bench] {workload}: {name} (repeat {rep + 1}/{args.repeats})", flush=True)
                runs.setdefault(name, []).append(run_one(args, tool, workload, data[workload], variant))
        results["workloads"][workload] = {name: {"summary": summarise(r), "runs": r} for name, r in runs.items()}

    gflops2 = matmul_gflops(device)  # again after the runs: the machine is shared, take the better figure
    results["gflops"] = gflops = max(gflops, gflops2)
    results["ceiling_tokens_s"] = ceiling = gflops * 1e9 / (4 * n_matmul)
    print_table(results, ceiling, gflops, n_matmul, device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: dict, ceiling: float, gflops: float, n_matmul: int, device: str) -> None:
    cpu = device == "cpu"
    mem_name = "peak RSS MB" if cpu else "peak CUDA MB"
    print()
    print(f"FLOP ceiling: {gflops:.1f} GFLOP/s fp32 matmul / (4 x {n_matmul / 1e6:.1f}M) = {ceiling:.0f} tokens/s")
    print()
    columns = ["workload", "tool", "examples/s", "tokens/s (non-pad)", "padding", mem_name, "peak above start MB"]
    columns += ["live step peak MB"] if cpu else ["host syncs per step"]
    columns += ["of FLOP ceiling", "tokens/s per run"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for workload, tools in results["workloads"].items():
        for name, entry in tools.items():
            s = entry["summary"]
            cells = [workload, name, f"{s['examples_s']:.2f}", f"{s['tokens_s']:.0f}", f"{s['padding']:.0%}",
                     f"{s['peak_mb']:.0f}", f"{s['peak_above_start_mb']:.0f}"]
            cells += [f"{s['live_step_peak_mb']:.0f}"] if cpu else [
                "-" if s["syncs_per_step"] is None else f"{s['syncs_per_step']:.1f}"]
            cells += [f"{s['tokens_s'] / ceiling:.0%}", ", ".join(f"{x:.0f}" for x in s["tokens_s_runs"])]
            print("| " + " | ".join(cells) + " |")
    print()
    columns = ["workload", "lora-cli / PEFT+Trainer", "examples/s", "tokens/s", "peak memory", "peak above start"]
    columns += ["live step peak"] if cpu else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for workload, tools in results["workloads"].items():
        for name, entry in tools.items():
            if name.startswith("peft"):
                continue
            # Every lora-cli row against PEFT+Trainer's defaults; a prompt-masked row also against PEFT+Trainer
            # trained on the same masked labels (the same objective).
            same_labels = "masked" in name and "peft prompt masked" in tools
            baselines = ["peft"] + (["peft prompt masked"] if same_labels else [])
            for baseline in baselines:
                base, s = tools[baseline]["summary"], entry["summary"]
                keys = ["examples_s", "tokens_s", "peak_mb", "peak_above_start_mb"]
                keys += ["live_step_peak_mb"] if cpu else []
                ratios = [f"{s[k] / base[k]:.2f}x" if base[k] else "-" for k in keys]
                label = name if baseline == "peft" else f"{name} (vs {baseline})"
                print("| " + " | ".join([workload, label] + ratios) + " |")


if __name__ == "__main__":
    main()
