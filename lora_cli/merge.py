"""lora-merge: fold a LoRA adapter into its base model and write a plain transformers model folder.

The merge runs in CPU memory in fp32, so a model that does not fit the GPU still merges. One copy of the weights
is held: the adapter is applied unmerged, a short verify batch records the reference logits (only the logits are
kept), then each LoRA layer folds its update into the base weight in place (`LoraLinear.merge`), the model is cast
once to the output dtype and written atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapter import read_adapter_config
from .errors import UserError
from .fsutil import atomic_dir
from .inject import lora_layers, merge_lora, set_lora_enabled
from .loading import base_source_of_adapter, load_model
from .models import parse_dtype, stored_dtype

# The adapter config travels with the merged model for provenance, but NOT as adapter_config.json: a model folder
# holding adapter_config.json makes transformers (and vLLM, TGI) treat the folder as a PEFT adapter and try to
# load a base model from base_model_name_or_path. Under this name every loader ignores it.
MERGED_ADAPTER_CONFIG_NAME = "lora_adapter_config.json"

# A few fixed sentences of different kinds (prose, code, Q&A, numbers) for the verify batch.
VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer:",
    "def add(a, b):\n    return a + b",
    "0 1 2 3 4 5 6 7 8 9 10",
)
VERIFY_MAX_TOKENS = 32

# Verify tolerances: max |merged - (base + adapter)| over the batch's logits must be <= rel * max|logit| + rel.
# 1. "merge": both sides in fp32 before any cast. Merging is exact algebra (W x + s B A x == (W + s B A) x), so
#    the only difference is fp32 rounding in a different order: 7e-6 of the logit scale measured on SmolLM2-135M
#    (30 layers). 1e-4 leaves ample room for that and still catches any mistake that matters (a layer not merged,
#    a wrong transpose or scaling), even for an adapter that moves the logits by only a few percent.
# 2. after casting the merged weights to the output dtype (the weights are rounded to it and held in fp32, so the
#    check measures what the saved file contains, not the CPU's half-precision arithmetic). Rounding each weight
#    costs up to 2^-11 (fp16) or 2^-8 (bf16) relative. Measured on SmolLM2-135M (30 layers, all-linear DoRA
#    adapter, every weight rounded): max |logit difference| 0.24% (fp16) and 2.6% (bf16) of the logit scale. The
#    tolerances, 2% and 10%, leave a margin of 4-8x for deeper and wider models. What this check is for is a cast
#    that breaks the model: fp16 overflow (|w| > 65504 becomes inf), NaN, or a gross loss of precision.
MERGE_TOLERANCE = 1e-4
CAST_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass
class VerifyCheck:
    label: str  # what is compared
    max_diff: float  # max |logit difference| over the verify batch
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance  # False for NaN too

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return f"{self.label}: max |logit difference| {self.max_diff:.3g} (tolerance {self.tolerance:.3g}) {verdict}"


@dataclass
class MergeResult:
    output_dir: Path
    base: str
    dtype: torch.dtype
    adapter_effect: float | None = None  # max |logit change| the adapter causes on the verify batch
    checks: list[VerifyCheck] = field(default_factory=list)


# --- helpers -------------------------------------------------------------------------------------------------


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'2GB', '500MB', '200KB', '1GiB' or a byte count -> bytes (transformers' units: 1GB = 10^9 bytes)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise UserError(f"--max-shard-size '{size}' is not a size; write it like 2GB, 500MB or 200KB.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise UserError(f"--max-shard-size must be positive, got {size!r}.")
    return value


def _is_within(path: Path, other: Path) -> bool:
    try:
        other.resolve().relative_to(path.resolve())
        return True
    except ValueError:
        return False


def check_output_dir(output_dir: Path, overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse an unusable output path before any expensive work (atomic_dir checks again when writing)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"Output path {output_dir} exists and is not a folder; choose another output path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"Output folder {output_dir} already exists and is not empty; pass --overwrite to replace it.")
    for other in protected:
        if other.exists() and _is_within(output_dir, other):
            raise UserError(
                f"Output folder {output_dir} would replace {other}, which the merge reads from; choose another "
                "output folder."
            )
    ancestor = output_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"Cannot create {output_dir}: {ancestor} is a file, not a folder. Choose another output path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"Cannot create {output_dir}: folder {ancestor} is not writable. Choose a writable path.")


def verify_batch(tokenizer, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a few fixed sentences, right-padded."""
    rows = [tokenizer(text, add_special_tokens=True)["input_ids"][:VERIFY_MAX_TOKENS] for text in VERIFY_TEXTS]
    rows = [row for row in rows if row] or [[0]]
    length = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    if vocab_size:  # a tokenizer with added tokens beyond the embedding must not crash the check
        ids = ids.clamp(max=vocab_size - 1)
    return ids, mask


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fp32 logits at the non-padding positions only (padding rows are meaningless)."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return out[mask.bool()]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    return diff if torch.isfinite(a).all() else float("nan")


def _tolerance(rel: float, reference: torch.Tensor) -> float:
    return rel * reference.abs().max().item() + rel


@torch.no_grad()
def _round_weights_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating-point weight to `dtype` in place, keeping fp32 storage: one parameter at a time.

    Buffers (rotary frequencies and the like) are left alone: they are recomputed on load, not saved.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.copy_(param.to(dtype))


@torch.no_grad()
def _check_finite_weights(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            hint = " float16 holds |x| <= 65504 only; use bfloat16." if param.dtype == torch.float16 else ""
            raise UserError(
                f"The merged weight {name} has non-finite values (inf or NaN) in {str(param.dtype).split('.')[1]}; "
                f"nothing was written.{hint}"
            )


def _untie_if_diverged(model: nn.Module) -> None:
    """A config that says the head is tied to the embedding must not be written for weights that differ.

    Merging never touches a tied head (targeting it is refused), so this only fires for a model someone untied by
    hand: then transformers would re-tie on load and silently replace the head, so say they are untied.
    """
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return
    embedding, head = get_in(), get_out()
    if embedding is None or head is None or head.weight is embedding.weight:
        return
    configs = [model.config]
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not model.config:
        configs.append(text_config)
    if not any(getattr(cfg, "tie_word_embeddings", False) for cfg in configs):
        return
    if head.weight.shape == embedding.weight.shape and torch.equal(head.weight, embedding.weight):
        return
    for cfg in configs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


# --- public API ----------------------------------------------------------------------------------------------


def save_merged(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    adapter_config: dict | None = None,
) -> Path:
    """Write an already merged model as a plain transformers folder, atomically.

    Casts once to `dtype` (if given), then writes sharded safetensors (+ index when sharded), config.json,
    generation_config.json, the tokenizer, and the adapter's config as `lora_adapter_config.json`.
    """
    if lora_layers(model):
        raise UserError("The model still has LoRA layers; merge them (inject.merge_lora) before saving it merged.")
    shard_bytes = parse_size(max_shard_size)
    if dtype is not None:
        model.to(dtype)
    _check_finite_weights(model)
    _untie_if_diverged(model)
    # A merged model is for inference: training with gradient checkpointing sets use_cache=False in the config,
    # which would make every later generate() recompute the whole prefix for each new token.
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        try:
            model.save_pretrained(tmp, max_shard_size=shard_bytes)
            if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if adapter_config is not None:
                # Named lora_adapter_config.json on purpose: see MERGED_ADAPTER_CONFIG_NAME.
                (tmp / MERGED_ADAPTER_CONFIG_NAME).write_text(
                    json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
        except OSError as err:
            raise UserError(f"Writing the merged model to {out_dir} failed: {err}. Check free disk space.") from None
    return out_dir


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> MergeResult:
    """Load base (fp32, CPU) + adapter, verify, merge in place, cast once, write `output_dir`."""
    log = log or (lambda message: None)
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    target_dtype = parse_dtype(dtype)
    parse_size(max_shard_size)
    config = read_adapter_config(adapter_dir)
    if base is not None and config.base_model_name_or_path and config.base_model_name_or_path != base:
        log(f"note: the adapter names {config.base_model_name_or_path} as its base; merging into {base} as asked")
    source = base_source_of_adapter(adapter_dir, base, revision, trust_remote_code)
    base = source.name_or_path
    protected = [adapter_dir] + ([Path(base)] if Path(base).exists() else [])
    check_output_dir(output_dir, overwrite, protected)

    loaded = load_model(source, dtype=torch.float32, adapter_dir=adapter_dir, log=log)
    model, tokenizer = loaded.model, loaded.tokenizer
    if target_dtype is None:
        target_dtype = stored_dtype(base, source.revision, source.trust_remote_code) or torch.float32
    result = MergeResult(output_dir, base, target_dtype)

    reference = None
    if verify:
        ids, mask = verify_batch(tokenizer, getattr(model.config, "vocab_size", None))
        reference = _logits(model, ids, mask)  # base + adapter, unmerged, fp32: the ground truth
        set_lora_enabled(model, False)
        result.adapter_effect = _max_diff(reference, _logits(model, ids, mask))
        set_lora_enabled(model, True)
        log(f"adapter effect on the verify batch: max |logit change| {result.adapter_effect:.3g}")
        if result.adapter_effect == 0:
            log("warning: the adapter does not change the model's output (lora_B is zero: was it trained?)")

    merge_lora(model)  # in place, layer by layer

    if verify:
        checks = [VerifyCheck("merged (float32) vs base + adapter", _max_diff(_logits(model, ids, mask), reference),
                              _tolerance(MERGE_TOLERANCE, reference))]
        if checks[0].ok and target_dtype != torch.float32:
            _round_weights_to(model, target_dtype)
            name = str(target_dtype).split(".")[1]
            checks.append(VerifyCheck(f"merged ({name} weights) vs base + adapter",
                                      _max_diff(_logits(model, ids, mask), reference),
                                      _tolerance(CAST_TOLERANCE[target_dtype], reference)))
        result.checks = checks
        for check in checks:
            log(f"verify: {check.describe()}")
        failed = next((c for c in checks if not c.ok), None)
        if failed is not None:
            if failed.max_diff != failed.max_diff:  # NaN: the cast model computes inf/NaN
                hint = ("The float16 range (|x| <= 65504) is exceeded; use --dtype bfloat16."
                        if target_dtype == torch.float16 else "The adapter or base weights are probably corrupt.")
                raise UserError(f"Verification failed, nothing was written: {failed.describe()}. {hint}")
            raise UserError(
                f"Verification failed, nothing was written: {failed.describe()}. The merged model does not reproduce "
                "base + adapter within the tolerance; pass --no-verify to write it anyway."
            )

    log(f"writing {output_dir} ({str(target_dtype).split('.')[1]})")
    save_merged(model, tokenizer, output_dir, overwrite=overwrite, dtype=target_dtype,
                max_shard_size=max_shard_size, adapter_config=config.raw)
    return result
