#!/usr/bin/env python
"""Where a training step's time goes: lora-train on the bench's variable-length chat data, a few steps under
torch.profiler, top operators by self CPU time and by device time. Offline; builds what it needs.

    python scripts/gpu_profile.py --model DIR [--packing] [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from synthetic import write_workloads  # scripts/synthetic.py, beside this script

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()

    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from lora_cli.config import validate_config
    from lora_cli.train import train

    work = Path(tempfile.mkdtemp())
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    data = write_workloads(work / "data", tokenizer, 256, 64, 200)["variable"]
    cuda = torch.cuda.is_available()
    cfg = validate_config({
        "model": {"name_or_path": str(args.model)},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"path": str(data), "max_length": 512, "train_on_inputs": True, "packing": args.packing},
        "train": {"output_dir": str(work / "out"), "max_steps": args.steps, "micro_batch_size": 4,
                  "precision": "fp16" if cuda else "fp32", "logging_steps": args.steps, "warmup_ratio": 0.0},
    })
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train(cfg, quiet=True)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
