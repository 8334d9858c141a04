"""The model side of sample packing (data.packing: true); the data side is data/batching.py (pack_rows,
collate_packed).

A packed row holds several examples, each with its own position ids (0, 1, 2, ...) and no attention_mask. Most
decoders in transformers 5 then find the example boundaries from the position ids and attend block-diagonally
(masking_utils.find_packed_sequence_indices; flash-attention uses varlen kernels). `check_packing_supported` checks
that on the real model before training, since some models (OPT takes positions from the attention mask) and
attention backends do not.

With sdpa, a block-diagonal mask still computes attention over the whole row and masks most of it away: for a row
of 512 tokens holding three examples, about two thirds of the attention work is thrown away, and the mask also
rules out sdpa's fast causal kernels and its grouped-query path (k and v get repeated per head). While training,
`packed_attention` switches sdpa models to `lora_cli_packed_sdpa`: each example of a packed row runs its own causal
sdpa call (varlen attention by a loop), the same result for a fraction of the work. Any batch that is not packed,
and any model feature the loop does not handle (sliding windows, soft-capping, attention biases), goes to
transformers' own sdpa unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import data as data_lib
from .errors import UserError
from .losses import MODEL_INPUT_KEYS
from .precision import dtype_name

PACKED_SDPA = "lora_cli_packed_sdpa"


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """[start, stop) of every example in every row, from where position ids restart at 0; None if unpacked."""
    cached_ids, cached = _segments.cache
    if cached_ids is position_ids:  # the same tensor object reaches every layer of one forward pass
        return cached
    starts = position_ids == 0
    starts[:, 0] = True
    if int(starts.sum()) == position_ids.shape[0]:
        result = None  # one sequence per row: plain causal attention is already exact
    else:
        length = position_ids.shape[1]
        rows = [row.nonzero().flatten().tolist() + [length] for row in starts.cpu()]
        result = [list(zip(bounds[:-1], bounds[1:])) for bounds in rows]
    _segments.cache = (position_ids, result)  # holding the tensor keeps its identity from being reused
    return result


_segments.cache = (None, None)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' attention-function signature: query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    segments = None
    plain_causal = (
        is_causal is not False and getattr(module, "is_causal", True)
        and not getattr(module, "sliding_window", None) and not kwargs.get("sliding_window")
        and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions") and query.shape[2] == key.shape[2] > 1
    )
    packed_shape = position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == query.shape[0]
    if plain_causal and packed_shape:
        segments = _segments(position_ids)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    if gqa and not _native_gqa(query):
        repeats = query.shape[1] // key.shape[1]  # query head h reads k/v head h // repeats, as enable_gqa does
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        gqa = False
    rows = []
    for b, row in enumerate(segments):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, start:stop], key[b : b + 1, :, start:stop], value[b : b + 1, :, start:stop],
                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa,
            )
            for start, stop in row
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _native_gqa(query: torch.Tensor) -> bool:
    """Whether sdpa can take grouped-query k/v as they are (enable_gqa) without falling back to its math kernel.

    On CUDA only the flash kernel accepts enable_gqa (PyTorch issue 139586); where flash cannot run (compute
    capability below 8.0, e.g. a T4; fp32; head size above 256; flash disabled) sdpa would take the math kernel,
    which materialises each example's (heads x L x L) scores. Repeating k and v per query head instead keeps the
    memory-efficient kernel available. On CPU enable_gqa is used as it is.
    """
    if query.device.type != "cuda":
        return True
    return (
        torch.backends.cuda.flash_sdp_enabled() and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256 and torch.cuda.get_device_capability(query.device) >= (8, 0)
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # unpacked batches get sdpa's masks


@contextlib.contextmanager
def packed_attention(model, device, enabled: bool = True, call_model=None):
    """Train on packed rows inside: an sdpa model attends per example (other implementations are left as they are),
    and the model is checked to keep packed examples apart, else UserError. Restores the attention on exit.
    `call_model(fn)`: how fn(model) is run (under FSDP through the loss module, which gathers the weights)."""
    if not enabled:
        yield
        return
    original = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = original == "sdpa" and hasattr(model, "set_attn_implementation")
    if switch:
        _register()
        model.set_attn_implementation(PACKED_SDPA)
    try:
        (call_model or (lambda fn: fn(model)))(lambda m: check_packing_supported(m, device))
        yield
    finally:
        if switch:
            model.set_attn_implementation(original)
        _segments.cache = (None, None)


@torch.no_grad()
def check_packing_supported(model, device) -> None:
    """Two examples packed in one row must give what each gives alone, on the real model and attention backend."""
    was_training = model.training
    model.eval()
    try:
        first = data_lib.Example(list(range(5, 17)), [0] * 12)
        second = data_lib.Example(list(range(20, 29)), [0] * 9)
        alone = _decoder_states(model, data_lib.collate([second], 0), device)[0]
        packed = _decoder_states(model, data_lib.collate_packed([[first, second]], 0), device)[0, len(first) :]
        tolerance = 1e-3 if alone.dtype == torch.float32 else 5e-2
        error = (packed.float() - alone.float()).abs().max().item() / (1.0 + alone.float().abs().max().item())
    finally:
        model.train(was_training)
    if not torch.isfinite(alone).all():
        # Not a packing problem: the example alone, unpacked, already gives inf/NaN.
        raise UserError(_non_finite_message(alone.dtype))
    if not error <= tolerance:
        raise UserError(
            f"data.packing is not supported for this model ({getattr(model.config, 'model_type', '?')} with "
            f"{getattr(model.config, '_attn_implementation', '?')} attention): packed examples would attend to each "
            "other. Set data.packing=false; batches then group examples of similar length, which avoids most padding."
        )


def _non_finite_message(dtype: torch.dtype) -> str:
    where = "its hidden states for a short example, unpacked (the packing check before training), hold inf or NaN"
    if dtype == torch.float16:
        return (
            f"The model overflows float16: {where}, because some activations exceed float16's largest value (65504). "
            "This is not a packing problem, and data.packing=false does not avoid it: training runs the same float16 "
            "layers. Use train.precision=bf16 on a GPU that has bf16 (compute capability 8.0 or newer, e.g. A100, "
            "RTX 30xx/40xx), or train.precision=fp32 with model.dtype auto or float32 (slower, and the base weights "
            "take twice the memory); a T4 has no bf16, so there it is fp32."
        )
    return (
        f"The model gives non-finite values in {dtype_name(dtype)}: {where}, so its weights are "
        "probably corrupt or hold inf/NaN. This is not a packing problem; check the model files (training fails the "
        "same way with data.packing=false)."
    )


def _decoder_states(model, batch: dict, device) -> torch.Tensor:
    kwargs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    if hasattr(model, "get_decoder"):
        return model.get_decoder()(**kwargs, use_cache=False).last_hidden_state
    return model(**kwargs, use_cache=False).logits
