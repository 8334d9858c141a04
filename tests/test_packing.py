"""Sample packing: rows, collation, and per-example losses and gradients identical to unpacked batches."""

from __future__ import annotations

import random

import pytest
import torch

import tiny
from helpers import examples, lora_model, loss_and_grads, losses, make_config
from lora_cli import data, packing
from lora_cli.config import load_config
from lora_cli.data import IGNORE_INDEX, Example
from lora_cli.errors import UserError
from lora_cli.losses import causal_lm_loss
from lora_cli.packing import check_packing_supported, packed_attention
from lora_cli.train import train

# Packing works where the attention honours per-example position ids; OPT takes positions from the attention mask.
PACKABLE = [a for a in tiny.ARCHS if a != "opt"]


# --- rows and collation --------------------------------------------------------------------------------------


def test_pack_rows_fills_rows_and_uses_every_example_once():
    rng = random.Random(0)
    lengths = [min(512, max(20, int(rng.lognormvariate(5.1, 0.75)))) for _ in range(3000)]
    rows = data.pack_rows(lengths, 512, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(3000))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert max(loads) <= 512
    assert sum(lengths) / (512 * len(rows)) > 0.97  # nearly no padding left
    assert data.pack_rows(lengths, 512, seed=0) == rows
    assert data.pack_rows(lengths, 512, seed=0, epoch=1) != rows
    assert data.pack_rows([], 512, seed=0) == []


def test_packed_batches_group_rows():
    batches = data.packed_batches([10, 20, 30, 40, 50, 60], max_length=64, rows_per_batch=2, seed=0)
    assert all(len(b) <= 2 for b in batches)
    assert sorted(i for b in batches for row in b for i in row) == list(range(6))
    assert all(sum([10, 20, 30, 40, 50, 60][i] for i in row) <= 64 for b in batches for row in b)


def test_collate_packed_positions_labels_and_padding():
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8, 9], [8, 9])
    c = Example([10, 11, 12, 13], [10, 11, 12, 13])
    batch = data.collate_packed([[a, b], [c]], pad_token_id=3)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see collate_packed
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # Each example's first label is masked: the last token of `a` must not learn to predict `b`'s first token.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())


# --- the same loss and gradients as unpacked ------------------------------------------------------------------


def only_example(batch: dict, row: int, start: int, stop: int) -> dict:
    """The batch with every label outside [start, stop) of `row` masked: the loss of that one example."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[row, start:stop] = batch["labels"][row, start:stop]
    return {**batch, "labels": labels}


@pytest.mark.parametrize("arch", PACKABLE)
def test_packed_per_example_loss_and_gradients_equal_unpacked(arch):
    model = lora_model(arch)
    exs = examples([9, 5, 12, 7])
    rows = [[exs[0], exs[1]], [exs[2], exs[3]]]
    packed = data.collate_packed(rows, pad_token_id=3)
    for row, row_examples in enumerate(rows):
        start = 0
        for example in row_examples:
            alone = data.collate([example], pad_token_id=3)
            expected, expected_n, expected_grads = loss_and_grads(model, alone)
            got, got_n, got_grads = loss_and_grads(model, only_example(packed, row, start, start + len(example)))
            assert got_n == expected_n == example.num_trained - (example.labels[0] != IGNORE_INDEX)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            for g, e in zip(got_grads, expected_grads):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
            start += len(example)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gradient_equals_padded_batch_gradient(attn):
    model = lora_model("llama")
    model.set_attn_implementation(attn)
    exs = examples([11, 4, 8, 6, 13])
    padded = data.collate(exs, pad_token_id=3)
    packed = data.collate_packed([[exs[0], exs[1], exs[2]], [exs[3], exs[4]]], pad_token_id=3)
    expected, expected_n, expected_grads = loss_and_grads(model, padded)
    got, got_n, got_grads = loss_and_grads(model, packed)
    assert got_n == expected_n
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_transformers_ignores_packing_when_given_an_attention_mask():
    """Why packed batches carry no attention_mask: with one, transformers attends across examples."""
    model = lora_model("llama")
    exs = examples([9, 7])
    packed = data.collate_packed([exs], pad_token_id=3)
    with_mask = {**packed, "attention_mask": torch.ones_like(packed["input_ids"])}
    second = only_example(packed, 0, 9, 16)
    alone, _ = causal_lm_loss(model, data.collate([exs[1]], pad_token_id=3))
    torch.testing.assert_close(causal_lm_loss(model, second)[0], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal_lm_loss(model, {**with_mask, "labels": second["labels"]})[0], alone, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # GQA; learned positions; positions from the mask
def test_per_example_attention_equals_unpacked(arch):
    """packed_attention's sdpa loop (one causal call per example) gives the unpacked losses and gradients too,
    also for OPT, whose own mask ignores packing."""
    model = lora_model(arch)
    exs = examples([9, 5, 12, 7, 3])
    padded = data.collate(exs, pad_token_id=3)
    packed = data.collate_packed([[exs[0], exs[1], exs[2]], [exs[3], exs[4]]], pad_token_id=3)
    expected, expected_n, expected_grads = loss_and_grads(model, padded)
    with packed_attention(model, "cpu"):
        assert model.config._attn_implementation == packing.TRAIN_SDPA  # every layer of these is plain causal
        got, got_n, got_grads = loss_and_grads(model, packed)
        unpacked_inside, _, _ = loss_and_grads(model, padded)  # unpacked batches (evaluation) are unchanged
    assert model.config._attn_implementation == "sdpa"
    assert got_n == expected_n
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpacked_inside, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_packing_support_is_checked_on_the_model():
    check_packing_supported(lora_model("llama"), "cpu")
    with pytest.raises(UserError, match="data.packing=false"):
        check_packing_supported(lora_model("opt"), "cpu")


# --- in the training loop ------------------------------------------------------------------------------------


def test_training_with_packing(tmp_path, trainable_model_dir):
    # 8 examples of 27-28 tokens pack into 2 rows of 128; micro batch 2 -> 1 batch an epoch -> 3 epochs = 3 steps.
    config = make_config(tmp_path, trainable_model_dir("llama"), data={"packing": True, "max_length": 128},
                         train={"max_steps": None, "epochs": 3, "micro_batch_size": 2})
    result = train(load_config(config), quiet=True)
    assert result.state.global_step == 3
    assert result.state.tokens_seen == 3 * (219 - 8)  # every token but each example's first, every epoch
    # and it learns: the same run for longer
    (tmp_path / "long").mkdir()
    config = make_config(tmp_path / "long", trainable_model_dir("llama"), data={"packing": True},
                         train={"max_steps": 30, "micro_batch_size": 1})
    train(load_config(config), quiet=True)
    curve = losses(tmp_path / "long" / "out")
    assert curve[-1] < 0.5 * curve[0], curve


def test_packing_with_gradient_checkpointing(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), data={"packing": True},
                         train={"max_steps": 15, "micro_batch_size": 1, "gradient_checkpointing": True})
    train(load_config(config), quiet=True)
    curve = losses(tmp_path / "out")
    assert curve[-1] < 0.8 * curve[0], curve


def test_packing_refused_where_examples_would_mix(tmp_path, trainable_model_dir, monkeypatch):
    import lora_cli.packing

    # Without the per-example attention, OPT's sdpa attends across examples (see PACKABLE): the check must stop it.
    monkeypatch.setattr(lora_cli.packing, "_segments", lambda position_ids: None)
    monkeypatch.setattr(lora_cli.packing, "plain_causal", lambda model: False)  # no layout-based attention either
    config = make_config(tmp_path, trainable_model_dir("opt"), data={"packing": True}, train={"max_steps": 1})
    with pytest.raises(UserError, match="packing is not supported"):
        train(load_config(config), quiet=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_to_a_multiple_keeps_the_loss_and_gradients(arch):
    """On a GPU unpacked batches are padded to a multiple of 64 tokens (shapes repeat); under lora-train's attention
    (causal, no mask: padding is at the end of each row) the loss and gradients are those of the shortest padding,
    and the trained tokens the same."""
    from lora_cli.training.plan import collate as training_collate

    model = lora_model(arch)
    exs = examples([9, 5, 12, 7])
    plan = [[0], [1], [2], [3]]
    with packed_attention(model, "cpu", enabled=False):
        assert model.config._attn_implementation == packing.TRAIN_SDPA
        tight = training_collate(exs, plan, 3, packing=False)
        rounded = training_collate(exs, plan, 3, packing=False, pad_multiple=64)
        assert tight["input_ids"].shape[1] == 12 and rounded["input_ids"].shape[1] == 64
        expected, expected_n, expected_grads = loss_and_grads(model, tight)
        got, got_n, got_grads = loss_and_grads(model, rounded)
    assert got_n == expected_n
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)  # (summation order: float rounding only)
