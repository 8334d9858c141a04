"""causal_lm_loss: the same loss and gradients as the plain full-logits loss, without ever holding full logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
from helpers import lora_model, padded_batch, plain_loss_sum, trainable
from lora_cli.data import IGNORE_INDEX
from lora_cli.lora import LoraLinear
from lora_cli.losses import CHUNK_BYTES, MIN_CHUNK_ROWS, causal_lm_loss, chunk_rows


def assert_same_loss_and_grads(model, batch, **loss_kwargs):
    params = trainable(model)
    expected = plain_loss_sum(model, batch)
    expected_grads = torch.autograd.grad(expected, params)
    got, n_tokens = causal_lm_loss(model, batch, **loss_kwargs)
    got_grads = torch.autograd.grad(got, params)
    assert n_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", tiny.ARCHS + ["llama_tied"])
@pytest.mark.parametrize("chunk_tokens", [7, None])  # several chunks (one ragged), and the default (one chunk)
def test_same_loss_and_gradients_as_plain_loss(arch, chunk_tokens):
    assert_same_loss_and_grads(lora_model(arch), padded_batch(), chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("chunk_tokens", [5, 10_000])  # checkpointed chunks, and one chunk without checkpointing
def test_trainable_head_falls_back_and_still_matches(chunk_tokens):
    model = lora_model("llama", targets=["q_proj", "lm_head"])
    assert isinstance(model.get_output_embeddings(), LoraLinear)
    assert_same_loss_and_grads(model, padded_batch(), chunk_tokens=chunk_tokens)


def test_logit_postprocessing_uses_the_models_own_forward():
    model = lora_model("llama")
    model.config.logit_scale = 1.0  # a model that transforms its logits: causal_lm_loss must not bypass them
    assert_same_loss_and_grads(model, padded_batch())


def test_no_grad_evaluation_matches():
    model, batch = lora_model("gpt2"), padded_batch()
    with torch.no_grad():
        got, _ = causal_lm_loss(model, batch, chunk_tokens=8)
        torch.testing.assert_close(got, plain_loss_sum(model, batch), rtol=1e-5, atol=1e-4)


def test_batch_without_trained_tokens_gives_zero_and_backpropagates():
    model, batch = lora_model("llama"), padded_batch()
    batch["labels"][:] = IGNORE_INDEX
    loss, n_tokens = causal_lm_loss(model, batch)
    assert n_tokens == 0 and loss.item() == 0.0
    loss.backward()  # no "does not require grad" error: the step can go on
    assert all(p.grad is None or not p.grad.any() for p in trainable(model))


def test_bf16_autocast_close_to_plain():
    model, batch = lora_model("llama"), padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_loss_sum(model, batch)
        got, _ = causal_lm_loss(model, batch, chunk_tokens=8)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_autocast_gradients_close_to_plain(dtype):
    """The GPU paths: fp32 weights under bf16 autocast, and an fp16 base (head included) under fp16 autocast."""
    model, batch = lora_model("llama"), padded_batch()
    if dtype == torch.float16:
        model.half()
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.data = param.data.float()
    params = trainable(model)
    with torch.autocast("cpu", dtype=dtype):
        expected = plain_loss_sum(model, batch)
    expected_grads = torch.autograd.grad(expected, params)
    with torch.autocast("cpu", dtype=dtype):
        got, _ = causal_lm_loss(model, batch, chunk_tokens=8)
    got_grads = torch.autograd.grad(got, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=2e-2, atol=0.0)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == e.dtype == torch.float32
        scale = e.abs().max().item()
        assert scale > 0
        assert (g - e).abs().max().item() <= 5e-2 * scale


def test_chunk_rows_by_vocabulary():
    assert chunk_rows(32000) == CHUNK_BYTES // (4 * 32000)
    assert chunk_rows(152064) < chunk_rows(32000)
    assert chunk_rows(10**9) == MIN_CHUNK_ROWS


# --- no full logits ------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class SavedForBackward:
    """Records the largest tensor autograd saves for the backward pass."""

    def __init__(self):
        self.largest = 0

    def pack(self, t):
        self.largest = max(self.largest, t.numel())
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def test_no_full_logits_tensor_is_created_or_saved():
    vocab, batch_size, length = 4096, 4, 64
    model = lora_model("llama", vocab=vocab)
    ids = torch.randint(4, vocab, (batch_size, length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    full_logits = batch_size * (length - 1) * vocab
    rows = 32

    with LargestTensor() as created, SavedForBackward() as saved:
        loss, _ = causal_lm_loss(model, batch, chunk_tokens=rows)
        loss.backward()
    assert created.largest <= rows * vocab < full_logits / 4  # one chunk of logits at most, never all of them
    assert saved.largest < vocab * 16  # nothing of vocabulary size is kept for backward (the head weight is frozen)

    # The detectors work: the plain path creates and saves full logits.
    with LargestTensor() as created, SavedForBackward() as saved:
        plain_loss_sum(model, batch).backward()
    assert created.largest >= full_logits and saved.largest >= full_logits

