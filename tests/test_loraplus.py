"""LoRA+ (lora.loraplus_lr_ratio): lora_B learns `ratio` times faster than lora_A, through optimizer groups that the
schedule, a resume (optimizer state_dict) and every process respect."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import tiny
from helpers import losses, make_config
from lora_cli.cli import train_app
from lora_cli.config import validate_config
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.training.optim import make_optimizer, make_scheduler

LR, RATIO = 1e-3, 16.0


def config(ratio=RATIO, **train):
    return validate_config({"model": {"name_or_path": "org/model"}, "data": {"path": "x.jsonl"},
                            "lora": {"loraplus_lr_ratio": ratio},
                            "train": {"learning_rate": LR, "weight_decay": 0.0, **train}})


def lora_model(**settings):
    model = tiny.make_model("llama")
    torch.manual_seed(0)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules="all-linear", **settings))
    return model


def names_in(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("dora", [False, True])
def test_groups_put_lora_b_and_1d_params_in_the_fast_group(dora):
    model = lora_model(use_dora=dora)
    optimizer = make_optimizer(model, config())
    slow, fast = optimizer.param_groups
    assert (slow["lr"], fast["lr"]) == (LR, LR * RATIO)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names_in(model, slow) | names_in(model, fast) == trainable
    assert names_in(model, slow) == {n for n in trainable if "lora_A" in n}
    # As PEFT's create_loraplus_optimizer: DoRA's magnitude vectors (1-D) go with B.
    assert names_in(model, fast) == {n for n in trainable if "lora_B" in n or "magnitude" in n}


def test_without_loraplus_one_group():
    model = lora_model()
    optimizer = make_optimizer(model, config(ratio=None))
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == LR


def test_b_moves_ratio_times_as_far_as_a_through_warmup_and_decay_and_a_resume():
    model = lora_model()
    optimizer = make_optimizer(model, config())
    scheduler = make_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=8)
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    b = model.model.layers[0].self_attn.q_proj.lora_B.weight
    for step in range(8):
        if step == 4:  # resume from a state_dict mid-run: the groups and their rates come back
            state = optimizer.state_dict(), scheduler.state_dict()
            optimizer = make_optimizer(model, config())
            scheduler = make_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=8)
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        lr_a, lr_b = scheduler.get_last_lr()
        assert lr_b == pytest.approx(RATIO * lr_a) and 0 < lr_a <= LR
        for group in optimizer.param_groups:  # the same gradient for every element: Adam's step is ~ lr each
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        before_a, before_b = a.detach().clone(), b.detach().clone()
        optimizer.step()
        scheduler.step()
        # Adam with a constant gradient moves every element by lr (up to eps): B by ratio x A's step.
        assert (before_a - a).abs().mean().item() == pytest.approx(lr_a, rel=1e-3)
        assert (before_b - b).abs().mean().item() == pytest.approx(RATIO * lr_a, rel=1e-3)


def test_a_run_with_loraplus_trains(tmp_path, trainable_model_dir):
    path = make_config(tmp_path, trainable_model_dir("llama"), lora={"loraplus_lr_ratio": 16},
                       train={"learning_rate": 2e-3})
    result = CliRunner().invoke(train_app, [str(path)])
    assert result.exit_code == 0, result.output
    curve = losses(tmp_path / "out")
    assert curve[-1] < 0.5 * curve[0], curve
