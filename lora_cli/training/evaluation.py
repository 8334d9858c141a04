"""Validation loss (and perplexity) over the held-out examples, split over the processes."""

from __future__ import annotations

import math

import torch

from .. import data as data_lib
from ..losses import causal_lm_loss
from .step import sum_over_processes


@torch.no_grad()
def evaluate(model, examples, pad_token_id: int, batch_size: int, accelerator) -> dict:
    """Mean loss per trained token over `examples`, and its perplexity.

    With several processes each evaluates every N-th example (of the length-sorted order, so all get similar
    lengths) and the sums are added up: the same result as one process, in 1/N of the time.
    """
    was_training = model.training
    model.eval()
    try:  # an error (out of memory, Ctrl-C) must not leave the model in eval mode: dropout would stay off
        total_loss, total_tokens = _sums(model, examples, pad_token_id, batch_size, accelerator)
    finally:
        model.train(was_training)
    total_loss = sum_over_processes(accelerator, total_loss)
    total_tokens = round(sum_over_processes(accelerator, float(total_tokens)))
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}


def _sums(model, examples, pad_token_id: int, batch_size: int, accelerator) -> tuple[float, int]:
    """This process's share: (sum of token losses, trained tokens)."""
    total_loss, total_tokens = 0.0, 0
    lengths = data_lib.lengths_of(examples)
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    order = order[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(order), batch_size):
        batch = data_lib.collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss_sum, n_tokens = causal_lm_loss(model, batch)
        total_loss += loss_sum.item()
        total_tokens += n_tokens
    return total_loss, total_tokens
