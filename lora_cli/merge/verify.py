"""lora-merge --verify-logits: the merged model must reproduce base + adapter on a few fixed sentences.

Reference logits are taken from the model with the adapter applied unmerged (fp32), then compared with the merged
model's, first in fp32 and then with every weight rounded to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..inject import set_lora_enabled
from ..precision import dtype_name

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


class LogitsCheck:
    """The reference logits of base + adapter (unmerged), and the checks of the merged model against them."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, adapter_effect: float):
        self.ids, self.mask, self.reference, self.adapter_effect = ids, mask, reference, adapter_effect

    @classmethod
    def before_merge(cls, model: nn.Module, tokenizer, log: Callable[[str], None]) -> "LogitsCheck":
        ids, mask = verify_batch(tokenizer, getattr(model.config, "vocab_size", None))
        reference = _logits(model, ids, mask)  # base + adapter, unmerged, fp32: the ground truth
        set_lora_enabled(model, False)
        effect = _max_diff(reference, _logits(model, ids, mask))
        set_lora_enabled(model, True)
        log(f"adapter effect on the verify batch: max |logit change| {effect:.3g}")
        if effect == 0:
            log("warning: the adapter does not change the model's output (lora_B is zero: was it trained?)")
        return cls(ids, mask, reference, effect)

    def after_merge(self, model: nn.Module, target_dtype: torch.dtype, log: Callable[[str], None]) -> list[VerifyCheck]:
        """The checks of the merged model; UserError (nothing written) if one fails. Rounds the weights to
        `target_dtype` in place (fp32 storage), as the saved file will hold them."""
        ids, mask, reference = self.ids, self.mask, self.reference
        checks = [VerifyCheck("merged (float32) vs base + adapter", _max_diff(_logits(model, ids, mask), reference),
                              _tolerance(MERGE_TOLERANCE, reference))]
        if checks[0].ok and target_dtype != torch.float32:
            _round_weights_to(model, target_dtype)
            name = dtype_name(target_dtype)
            checks.append(VerifyCheck(f"merged ({name} weights) vs base + adapter",
                                      _max_diff(_logits(model, ids, mask), reference),
                                      _tolerance(CAST_TOLERANCE[target_dtype], reference)))
        for check in checks:
            log(f"verify: {check.describe()}")
        failed = next((c for c in checks if not c.ok), None)
        if failed is None:
            return checks
        if failed.max_diff != failed.max_diff:  # NaN: the cast model computes inf/NaN
            hint = ("The float16 range (|x| <= 65504) is exceeded; use --dtype bfloat16."
                    if target_dtype == torch.float16 else "The adapter or base weights are probably corrupt.")
            raise UserError(f"Verification failed, nothing was written: {failed.describe()}. {hint}")
        raise UserError(
            f"Verification failed, nothing was written: {failed.describe()}. The merged model does not reproduce "
            "base + adapter within the tolerance; run without --verify-logits to write it anyway (each merged "
            "weight is still checked on its own)."
        )
