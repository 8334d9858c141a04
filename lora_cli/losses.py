"""The causal-LM loss, computed from the decoder's hidden states in chunks of the sequence.

Full fp32 logits for a whole batch (batch x sequence x 32k-150k vocabulary) are the largest tensor of a LoRA step
and the usual cause of out-of-memory on a 16 GB card. Each chunk's logits are recomputed in the backward pass
(activation checkpointing), so at most one chunk of logits exists at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024
# Models that transform logits after the head (soft-capping, scaling): use their own forward for exactness.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _uses_plain_head(model) -> bool:
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) for attr in _LOGIT_POSTPROCESSING):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def _chunk_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def causal_lm_loss(model, batch: dict, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over trained positions, number of trained positions)."""
    labels = batch["labels"][:, 1:]
    n_tokens = int((labels != IGNORE_INDEX).sum())
    if not _uses_plain_head(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return _chunk_loss_sum(torch.nn.Identity(), logits, labels), n_tokens
    decoder_kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = model.get_decoder()(**decoder_kwargs, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    batch_size, seq_len = labels.shape
    step = max(1, chunk_tokens // max(batch_size, 1))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, seq_len, step):
        chunk_labels = labels[:, start : start + step]
        if not (chunk_labels != IGNORE_INDEX).any():
            continue  # prompt-only or padding chunk: no logits needed at all
        chunk_hidden = hidden[:, start : start + step]
        if torch.is_grad_enabled() and chunk_hidden.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, head, chunk_hidden, chunk_labels, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, chunk_hidden, chunk_labels)
    return total, n_tokens
