"""The optimizer over the trainable (LoRA) parameters and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config import Config


def make_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    return torch.optim.AdamW(
        params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
    )


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine / linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
