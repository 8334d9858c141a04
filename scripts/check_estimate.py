#!/usr/bin/env python
"""Check `lora-train --estimate` against measurement: one training step of small random Llama models on CPU.

    python scripts/check_estimate.py            # the full table (about a minute on 2 CPU cores)
    python scripts/check_estimate.py --rows 1,4 # some rows only
    python scripts/check_estimate.py --json out.json

For each configuration the estimate's step-dependent parts (activations + output head and loss + LoRA gradients:
what exists only during a step) are compared with PyTorch's allocated-bytes peak during one forward + backward
of lora-cli's own loss module (`CausalLMLoss`, the chunked loss, the fused LoRA node, packing's per-example
attention, non-reentrant checkpointing as lora-train enables it), above what was allocated before the step
(scripts/memprofile.py). "fp32" rows are lora-cli's CPU setting; "bf16" rows hold the base weights in bf16 under
bf16 autocast, the layout of a GPU step in fp16/bf16 mixed precision (same element sizes). The weights, LoRA
parameters and AdamW states are exact counts and need no measurement.

Exit status 1 if any row is off by more than --tolerance (default 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass
class Row:
    name: str
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    vocab: int = 32000
    micro_batch: int = 4
    seq_len: int = 512
    packing: bool = False
    checkpointing: bool = False
    mode: str = "fp32"  # fp32 | bf16
    targets: str = "q_proj,v_proj"
    attn: str = "sdpa"
    r: int = 8


ROWS = [
    Row("h256 32k fp32", micro_batch=4, seq_len=512),
    Row("h512 32k fp32 all-linear", hidden=512, intermediate=1376, targets="all-linear"),
    Row("h512 32k fp32 ckpt", hidden=512, intermediate=1376, checkpointing=True),
    Row("h256 128k fp32 packed", vocab=128000, layers=2, packing=True),
    Row("h512 128k bf16", hidden=512, intermediate=1376, vocab=128000, mode="bf16", targets="all-linear"),
    Row("h512 32k bf16 packed", hidden=512, intermediate=1376, mode="bf16", packing=True),
    Row("h512 32k bf16 ckpt packed", hidden=512, intermediate=1376, mode="bf16", packing=True, checkpointing=True,
        micro_batch=8),
    Row("h384 32k fp32 eager", hidden=384, heads=6, kv_heads=2, intermediate=1024, attn="eager", seq_len=256),
    Row("h256 32k bf16 ckpt 2 layers", layers=2, mode="bf16", checkpointing=True, targets="all-linear",
        micro_batch=8),
]


def hf_config(row: Row):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=row.vocab, hidden_size=row.hidden, intermediate_size=row.intermediate,
        num_hidden_layers=row.layers, num_attention_heads=row.heads, num_key_value_heads=row.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation=row.attn,
    )


def lora_settings(row: Row):
    from lora_cli.inject import LoraSettings

    targets = row.targets if row.targets == "all-linear" else row.targets.split(",")
    return LoraSettings(r=row.r, alpha=2.0 * row.r, target_modules=targets)


def estimated(row: Row) -> dict[str, int]:
    from lora_cli.memory_model import StepShape, model_facts, step_parts
    from lora_cli.models import build_meta_model

    facts = model_facts(build_meta_model(hf_config(row)), lora_settings(row))
    size = 4 if row.mode == "fp32" else 2
    shape = StepShape(row.micro_batch, row.seq_len, row.packing, row.checkpointing, weight_bytes=size,
                      compute_bytes=size, cuda=False)
    return step_parts(facts, shape)


def step_bytes(parts: dict[str, int]) -> int:
    """The parts that exist only during a step (what the measured peak above the step's start holds)."""
    return parts["activations"] + parts["output head + loss"] + parts["LoRA gradients"]


def _batch(row: Row, seed: int = 0) -> dict:
    """The longest batch: micro_batch rows of seq_len tokens, every position trained. Unpacked, the last row is a
    quarter shorter (padding, so the attention mask exists, as in real batches); packed, each row holds 3 examples."""
    import torch

    from lora_cli import data as data_lib

    g = torch.Generator().manual_seed(seed)

    def example(length):
        ids = torch.randint(4, min(row.vocab, 32000), (length,), generator=g).tolist()
        return data_lib.Example(ids, list(ids))

    if row.packing:
        third = row.seq_len // 3
        rows = [[example(third), example(third), example(row.seq_len - 2 * third)] for _ in range(row.micro_batch)]
        return data_lib.collate_packed(rows, 0)
    lengths = [row.seq_len] * (row.micro_batch - 1) + [row.seq_len - row.seq_len // 4]
    return data_lib.collate([example(n) for n in lengths], 0)


def measured(row: Row) -> int:
    """Allocated-bytes peak of one forward + backward of lora-cli's loss, above what was allocated before it."""
    import torch
    import transformers

    from lora_cli import packing as packing_lib
    from lora_cli.inject import apply_lora
    from lora_cli.losses import CausalLMLoss
    from memprofile import allocated_peak

    torch.manual_seed(0)
    dtype = torch.float32 if row.mode == "fp32" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_config(hf_config(row)).to(dtype)
    apply_lora(model, lora_settings(row))
    if row.checkpointing:  # as lora-train enables it (train.enable_gradient_checkpointing)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    model.train()
    loss_model = CausalLMLoss(model)
    batch = _batch(row)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=row.mode == "bf16"):
            loss_sum, _ = loss_model(**batch)
        loss_sum.backward()

    with packing_lib.packed_attention(model, "cpu", row.packing):
        step()  # the first step allocates once-only things (rotary caches, kernels' workspaces)
        model.zero_grad(set_to_none=True)
        with allocated_peak() as peak:
            step()
    return peak.bytes


def run(rows: list[Row], tolerance: float) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # the machine is shared; memory does not depend on it
    results = []
    for row in rows:
        start = time.perf_counter()
        parts = estimated(row)
        actual = measured(row)
        predicted = step_bytes(parts)
        error = predicted / actual - 1
        results.append({**asdict(row), "estimated": predicted, "measured": actual, "error": error,
                        "ok": abs(error) <= tolerance, "parts": parts, "seconds": time.perf_counter() - start})
        print(f"[check] {row.name}: estimated {predicted / 2**20:.1f} MiB, measured {actual / 2**20:.1f} MiB "
              f"({error:+.1%}) in {time.perf_counter() - start:.0f}s", flush=True)
    return results


def print_table(results: list[dict], tolerance: float) -> None:
    print()
    print("| # | configuration | layers x hidden / inter, heads/kv | vocab | batch x seq | packing | checkpointing | "
          "precision | LoRA | attention | estimated MiB (act + head + grads) | measured MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        parts = r["parts"]
        detail = (f"{(r['estimated']) / 2**20:.1f} ({parts['activations'] / 2**20:.1f} + "
                  f"{parts['output head + loss'] / 2**20:.1f} + {parts['LoRA gradients'] / 2**20:.1f})")
        shape = f"{r['layers']} x {r['hidden']} / {r['intermediate']}, {r['heads']}/{r['kv_heads']}"
        print(f"| {i} | {r['name']} | {shape} "
              f"| {r['vocab'] // 1000}k | {r['micro_batch']} x {r['seq_len']} | {'on' if r['packing'] else 'off'} | "
              f"{'on' if r['checkpointing'] else 'off'} | {r['mode']} | r={r['r']} {r['targets']} | {r['attn']} | "
              f"{detail} | {r['measured'] / 2**20:.1f} | {r['error']:+.1%} |")
    worst = max(abs(r["error"]) for r in results)
    print(f"\nlargest error {worst:.1%} (tolerance {tolerance:.0%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="", help="comma list of row numbers (1-based); default all")
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    rows = [ROWS[int(i) - 1] for i in args.rows.split(",")] if args.rows else ROWS
    print("command: python " + " ".join(sys.argv))
    results = run(rows, args.tolerance)
    print_table(results, args.tolerance)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
