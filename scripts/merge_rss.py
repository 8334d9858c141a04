#!/usr/bin/env python
"""Peak RAM of lora-merge on a multi-shard model: build a random ~1B Llama in 500 MB shards, merge, measure.

    python scripts/merge_rss.py --build /tmp/merge-rss        # once: base (bf16, 500 MB shards) + adapter
    python scripts/merge_rss.py --measure /tmp/merge-rss      # lora-merge under /usr/bin/time -v
    python scripts/merge_rss.py --measure /tmp/merge-rss --code /tmp/old   # another checkout's lora_cli (before)
    python scripts/merge_rss.py --measure /tmp/merge-rss -- --gguf q8_0 --gguf-only   # the GGUF export
    rm -rf /tmp/merge-rss

The base has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, SwiGLU 8192, 128,256 vocabulary, tied
embeddings: 1.24B parameters, 2.47 GB in bf16) with random weights; the adapter is r=16 on every linear layer with
random non-zero lora_B. Peak RSS is /usr/bin/time's "Maximum resident set size" of the whole lora-merge process;
the baseline is the same interpreter importing what lora-merge imports, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from synthetic import make_tokenizer  # scripts/synthetic.py, beside this script

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096,
             rope_theta=500000.0)


def build(folder: Path) -> None:
    import torch
    import transformers

    from lora_cli.adapter import save_adapter
    from lora_cli.inject import LoraSettings, apply_lora

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder / "base", max_shard_size="500MB")
    tokenizer.save_pretrained(folder / "base")
    settings = LoraSettings(r=16, alpha=32, target_modules="all-linear")
    report = apply_lora(model, settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    save_adapter(model, folder / "adapter", settings, report.target_modules, str(folder / "base"))
    shards = sorted((folder / "base").glob("*.safetensors"))
    print(f"built {folder}: {sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e9:.2f}B "
          f"parameters, shards: " + ", ".join(f"{p.stat().st_size / 1e6:.0f} MB" for p in shards))


def _wall_seconds(stderr: str) -> float:
    """/usr/bin/time's "Elapsed (wall clock) time": h:mm:ss or m:ss.ss."""
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr).group(1)
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _max_rss_kb(command: list[str], env: dict) -> tuple[int, str, float]:
    # Run from the code's folder: `python -m` puts the working folder first on sys.path, before PYTHONPATH.
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env,
                          cwd=env["PYTHONPATH"])
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return peak_kb, proc.stdout, _wall_seconds(proc.stderr)


def measure(folder: Path, code: Path | None, extra: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = str(code or REPO)
    out = folder / "merged"
    shutil.rmtree(out, ignore_errors=True)
    baseline_kb, _, _ = _max_rss_kb([sys.executable, "-c", "import torch, transformers, safetensors, lora_cli.cli, "
                                  "lora_cli.merge, lora_cli.models; transformers.AutoModelForCausalLM"], env)
    command = [sys.executable, "-m", "lora_cli", "merge", str(folder / "adapter"), str(out), "--max-shard-size",
               "500MB", *extra]
    peak_kb, stdout, seconds = _max_rss_kb(command, env)
    largest_base = max(p.stat().st_size for p in (folder / "base").glob("*.safetensors"))
    largest_out = max((p.stat().st_size for p in out.glob("*.safetensors")), default=0)
    gguf = {p.name: p.stat().st_size / 2**20 for p in out.glob("*.gguf")}
    shutil.rmtree(out)
    check = subprocess.run([sys.executable, "-c", "import lora_cli; print(lora_cli.__file__)"], capture_output=True,
                           text=True, env=env, cwd=env["PYTHONPATH"]).stdout.strip()
    result = {"code": check, "extra": extra, "peak_rss_mb": peak_kb / 1024, "baseline_rss_mb":
              baseline_kb / 1024, "largest_base_shard_mb": largest_base / 2**20,
              "largest_output_shard_mb": largest_out / 2**20, "wall_seconds": seconds, "gguf_mb": gguf}
    result["above_baseline_in_largest_shards"] = (peak_kb * 1024 - baseline_kb * 1024) / largest_base
    print(json.dumps(result, indent=2))
    print(stdout.strip().splitlines()[-1] if stdout.strip() else "")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", type=Path)
    p.add_argument("--measure", type=Path)
    p.add_argument("--code", type=Path, default=None, help="folder holding the lora_cli package to run")
    p.add_argument("extra", nargs="*", help="more lora-merge options, after --")
    args = p.parse_args()
    if args.build:
        build(args.build)
    if args.measure:
        measure(args.measure, args.code, args.extra)


if __name__ == "__main__":
    main()
