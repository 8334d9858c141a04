"""The causal-LM loss, computed from the decoder's hidden states without ever holding full logits.

Full fp32 logits for a whole batch (batch x sequence x 32k-150k vocabulary) are the largest tensors of a LoRA step
and the usual cause of out-of-memory on a 16 GB card (pitfall 11); the plain `model(..., labels=...)` path holds
several of them at once (the logits, their log-softmax, and in backward their gradients).

Here only the positions that have a label are sent through the output head, in chunks of rows, and with a frozen
head (the LoRA case) each chunk's gradient with respect to the hidden states is computed right away in the forward
pass, while the chunk's logits exist anyway: d loss / d hidden = (softmax - onehot) @ W. The backward pass then only
scales that small (tokens x hidden) tensor. So at most one chunk of logits exists at a time, nothing of vocabulary
size is saved for backward, and the head costs 4·V·H flops per trained token, the same as the plain path, where
recomputing each chunk's logits in backward (activation checkpointing) costs 6·V·H: measured on CPU with a 32k
vocabulary, the loss alone is 17% faster than transformers' full-logits loss, and 36% faster than checkpointed
chunks, which would make a whole step of a 35M model ~20% slower (docs/BENCHMARKS.md).

A trainable head (LoRA on an untied lm_head) falls back to per-chunk activation checkpointing, which autograd
differentiates for any module; a small loss (all logits fit in one chunk) is then computed without checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data.examples import IGNORE_INDEX

# What of a batch the decoder takes (packed_layout: packing.PackedLayout, which lora-cli's attention reads).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "packed_layout")
# Rows per chunk: 32 MiB of fp32 logits, but never fewer than 256 rows. Measured (docs/BENCHMARKS.md, CPU fp32):
# with a 32k vocabulary 256 rows are fastest (17% faster than transformers' full logits; 64 rows lose 13%, 1024+
# rows lose 6% to cache misses); with a 128k vocabulary 65 rows are 9% slower than 256 rows, so the floor. At 152k
# (Qwen) that is 148 MiB per chunk: noise next to a full-logits step (~5 GB per fp32 copy at 4 x 2048 tokens).
CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 256
# Models that transform logits after the head (soft-capping, scaling): use their own forward for exactness.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def uses_plain_head(model) -> bool:
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) for attr in _LOGIT_POSTPROCESSING):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of hidden states per head chunk: `chunk_bytes` of fp32 logits."""
    return max(MIN_CHUNK_ROWS, chunk_bytes // (4 * max(vocab_size, 1)))


def loss_positions(labels: torch.Tensor) -> dict:
    """Where a batch is trained, for `causal_lm_loss`, computed from its labels on the CPU by the collate step:
    "loss_index", the flat positions (row x width + column) whose hidden state predicts a trained label, and
    "loss_targets", those labels. On the device the same selection is a boolean mask, which reads its count back."""
    width = labels.shape[1]
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, columns = keep.nonzero(as_tuple=True)
    return {"loss_index": rows * width + columns, "loss_targets": labels[:, 1:][keep]}


def causal_lm_loss(model, batch: dict, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over trained positions, number of trained positions).

    `batch` holds input_ids and labels, and attention_mask and/or position_ids (packed batches carry position ids
    and no attention mask); a training batch also carries its trained positions (`loss_positions`) and, when
    packed, its layout (packing.PackedLayout). `chunk_tokens`: rows per head chunk; by default
    `chunk_rows(vocab size)`.
    """
    if "loss_index" not in batch:
        batch = {**batch, **loss_positions(batch["labels"])}  # (on a GPU this reads the labels back)
    index, targets = batch["loss_index"], batch["loss_targets"]
    model_kwargs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    if not uses_plain_head(model):
        logits = model(**model_kwargs, use_cache=False).logits
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
        return F.cross_entropy(picked.float(), targets, reduction="sum"), index.shape[0]
    hidden = model.get_decoder()(**model_kwargs, use_cache=False).last_hidden_state
    # Only positions with a label need logits: prompt tokens, padding and the last position never reach the head.
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    return head_cross_entropy(model.get_output_embeddings(), picked, targets, chunk_tokens), index.shape[0]


class CausalLMLoss(nn.Module):
    """`causal_lm_loss` as a module: forward(**batch) -> (loss sum, trained tokens).

    This is what the training loop hands to Accelerate. Under DDP (and FSDP, DeepSpeed) gradients are synchronised
    by hooks that the wrapper arms in its own forward, so the whole loss, decoder and chunked head, must run through
    the prepared module's forward; calling the decoder of the unwrapped model would bypass them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dropout_seed: int | None = None, **batch) -> tuple[torch.Tensor, int]:
        if dropout_seed is not None:  # LoRA dropout: this micro batch's masks (training.plan.dropout_seed)
            torch.manual_seed(dropout_seed)
        return causal_lm_loss(self.model, batch)

    def call_model(self, fn, *args, **kwargs):
        """`fn(self.model, ...)`. Under FSDP registered as a forward method of this module (training.fsdp), so what
        runs the model otherwise (generation, the packing check) gets the weights this module's forward gathers."""
        return fn(self.model, *args, **kwargs)


def head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden), targets): hidden (n, H), targets (n,), all trained."""
    weight = getattr(head, "weight", None)
    rows = chunk_tokens or chunk_rows(weight.shape[0] if weight is not None else getattr(head, "out_features", 1))
    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.shape[0] == 0:
        return total + 0.0 * hidden.sum()  # keeps the graph connected when a batch has nothing to train
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, rows)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    use_checkpoint = needs_grad and hidden.shape[0] > rows  # one chunk: checkpointing would only add the recompute
    for start in range(0, hidden.shape[0], rows):
        chunk, chunk_targets = hidden[start : start + rows], targets[start : start + rows]
        if use_checkpoint:
            total = total + checkpoint(_chunk_loss_sum, head, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, chunk, chunk_targets)
    return total


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy through a frozen linear head whose input gradient is computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        want_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The head's matmuls run in the autocast dtype under autocast (as autocast would run them), else in W's.
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        mm_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        weight = weight.to(mm_dtype)
        bias = None if bias is None else bias.to(mm_dtype)
        # One fp32 logits buffer for all chunks, with the softmax computed in it in place: a fresh (rows x vocab)
        # tensor or two per chunk are 32 MiB allocations that the C allocator maps and page-faults anew each time on
        # CPU, and that fragment its heap (docs/BENCHMARKS.md, section 6).
        buffer = torch.empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h, y = hidden[start : start + rows].to(mm_dtype), targets[start : start + rows].unsqueeze(1)
                logits = buffer[: h.shape[0]]
                if mm_dtype != torch.float32:  # a half-precision head: its output upcast, as transformers' loss does
                    logits.copy_(F.linear(h, weight, bias))
                elif bias is None:
                    torch.mm(h, weight.t(), out=logits)
                else:
                    torch.addmm(bias, h, weight.t(), out=logits)
                # log_softmax(z)[y] = (z[y] - max) - log(sum(exp(z - max))), keeping exp(z - max) for the gradient
                logits.sub_(logits.amax(dim=1, keepdim=True))
                picked = logits.gather(1, y)
                logits.exp_()
                sums = logits.sum(dim=1, keepdim=True)
                total -= (picked - sums.log()).sum()
                if want_grad:
                    # d(-log_softmax[y]) / d logits = softmax - onehot(y), then through the head: (.) @ W
                    probs = logits.div_(sums)
                    probs.scatter_add_(1, y, torch.full_like(picked, -1.0))
                    rows_out = grad_hidden[start : start + rows]
                    if mm_dtype == torch.float32 and rows_out.dtype == torch.float32:
                        torch.mm(probs, weight, out=rows_out)
                    else:
                        rows_out.copy_(probs.to(mm_dtype) @ weight)
        ctx.save_for_backward(grad_hidden)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden.dtype == torch.float32:
            return grad_hidden * grad_total, None, None, None, None
        # Under fp16 AMP grad_total is the loss scale over the trained tokens (2^16 / 1 token is already more than
        # fp16's largest value, 65504) while its product with grad_hidden is not: multiply in fp32 and cast the
        # product, a chunk of rows at a time so the fp32 copy stays small.
        grad = torch.empty_like(grad_hidden)
        for start in range(0, grad_hidden.shape[0], ctx.rows):
            grad[start : start + ctx.rows] = grad_hidden[start : start + ctx.rows].float() * grad_total
        return grad, None, None, None, None
