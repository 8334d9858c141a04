"""make_optimizer: fused AdamW where PyTorch has the kernel (CPU and CUDA), the same updates as foreach AdamW, and a
state_dict either one loads (a checkpoint written by one resumes in the other)."""

from __future__ import annotations

import torch

import tiny
from lora_cli.config import validate_config
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.training.optim import make_optimizer


def _model():
    model = tiny.make_model("llama")
    model.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear"))
    return model


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _step(model, optimizer, grads):
    for p, g in zip(_trainable(model), grads):
        p.grad = g.clone()
    optimizer.step()


def test_fused_adamw_updates_as_foreach_does_and_their_states_load_into_each_other():
    cfg = validate_config({"model": {"name_or_path": "x"}, "data": {"path": "x"},
                           "train": {"learning_rate": 1e-2, "weight_decay": 0.01}})
    fused_model, foreach_model = _model(), _model()
    fused = make_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    foreach = torch.optim.AdamW(_trainable(foreach_model), lr=1e-2, weight_decay=0.01, foreach=True)
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in _trainable(fused_model)] for _ in range(3)]
    for g in grads[:2]:
        _step(fused_model, fused, g)
        _step(foreach_model, foreach, g)
    for a, b in zip(_trainable(fused_model), _trainable(foreach_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Swap: each model continues with an optimizer of the other kind, loaded from the other's state_dict.
    fused_from_foreach = make_optimizer(foreach_model, cfg)
    fused_from_foreach.load_state_dict(foreach.state_dict())
    foreach_from_fused = torch.optim.AdamW(_trainable(fused_model), lr=1e-2, weight_decay=0.01, foreach=True)
    foreach_from_fused.load_state_dict(fused.state_dict())
    _step(foreach_model, fused_from_foreach, grads[2])
    _step(fused_model, foreach_from_fused, grads[2])
    for a, b in zip(_trainable(fused_model), _trainable(foreach_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(int(s["step"]) == 3 for s in fused_from_foreach.state.values())
