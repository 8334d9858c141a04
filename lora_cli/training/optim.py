"""The optimizer over the trainable (LoRA) parameters and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config import Config


def make_optimizer(model, cfg: Config, device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: fused where PyTorch has the fused kernel for the training device.

    Fused AdamW updates every LoRA tensor in one kernel and takes a skip flag on the device (`found_inf`, which
    training.step.apply_update and fp16's GradScaler set), so a skipped update costs no host read; it keeps its step
    counts as tensors, where foreach AdamW reads each one back to the host every step. On the CPU it is also the
    faster of the two (docs/BENCHMARKS.md, issue 21). Elsewhere (no fused kernel) foreach. The state_dict has the
    same entries either way, so a checkpoint written by one loads into the other.
    """
    t = cfg.train
    device = torch.device(device or next((p.device for p in model.parameters() if p.requires_grad), "cpu"))
    fused = device.type in FUSED_DEVICES
    return torch.optim.AdamW(
        param_groups(model, t.learning_rate, cfg.lora.loraplus_lr_ratio),
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay,
        **({"fused": True} if fused else {"foreach": True}),
    )


FUSED_DEVICES = ("cuda", "cpu")  # where torch's fused AdamW kernel runs (LoRA weights are fp32 on both)


def param_groups(model, lr: float, loraplus_lr_ratio: float | None) -> list[dict]:
    """The trainable parameters as optimizer groups: one group, or with LoRA+ two, A's at `lr` first (the rate the
    loop logs) and B's at ratio x lr.

    As PEFT's `create_loraplus_optimizer` (which axolotl and LLaMA-Factory use): lora_B weights and every 1-D
    trainable parameter (DoRA's magnitude vectors) go in the fast group. Groups, not a custom optimizer, so
    everything that handles groups handles LoRA+: LambdaLR scales each group's own initial lr by the same factor,
    the optimizer's state_dict carries the groups for a resume, and every process builds the same groups.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    fast = [p for name, p in named if "lora_B" in name or p.ndim == 1]
    fast_ids = {id(p) for p in fast}
    slow = [p for _, p in named if id(p) not in fast_ids]
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * loraplus_lr_ratio}]


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
