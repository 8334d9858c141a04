"""The model side of sample packing (data.packing: true) and of lora-cli's training attention; the data side is in
data/batching.py (pack_rows, collate_packed).

A packed row holds several examples, each with its own position ids (0, 1, 2, ...) and no attention_mask. Most
decoders in transformers 5 then find the example boundaries from the position ids and attend block-diagonally
(masking_utils.find_packed_sequence_indices), which reads the position ids back from the device on every forward,
and build a (rows x L x L) mask that rules out sdpa's fast causal kernels. `check_packing_supported` checks that
packed examples stay apart on the real model before training, since some models (OPT takes positions from the
attention mask) and attention backends do not.

While training, `packed_attention` switches an sdpa model whose layers are all plain causal attention (no sliding
windows, soft-capping or attention biases) to `lora_cli_sdpa`, which builds no mask at all:
* unpacked rows are right-padded, so plain causal attention is exact for every real token (a real token never
  sees the padding after it): one causal sdpa call per layer, with no mask and no read of the attention mask;
* packed rows come with a `PackedLayout`, made by the collate step on the CPU from the example lengths and moved
  with the batch: on CUDA one varlen flash-attention call per layer where flash runs (compute capability >= 8.0,
  fp16/bf16), else one memory-efficient sdpa call with a block-diagonal causal mask built on the device; on the
  CPU one sdpa call per example (the least work there; docs/BENCHMARKS.md, issue 21).
Any other sdpa model is switched, only while packing, to `lora_cli_packed_sdpa`: transformers' masks, and attention
per example found from the position ids, for the layers that are plain causal. Evaluation and generation switch
back to the model's own attention where they need masks (training.samples).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data as data_lib
from .errors import UserError
from .losses import MODEL_INPUT_KEYS
from .precision import dtype_name

PACKED_SDPA = "lora_cli_packed_sdpa"
TRAIN_SDPA = "lora_cli_sdpa"
# Config attributes that make attention more than plain causal sdpa: such models keep transformers' masks.
_NOT_PLAIN = ("attn_logit_softcapping", "alibi", "position_bias", "use_alibi", "attention_chunk_size")


@dataclass
class PackedLayout:
    """Where every example (and the trailing padding) of a batch of packed rows starts and stops.

    Made by the collate step on the CPU from the example lengths, so no step reads the position ids back from the
    device: `segments` (host ints) per row, `cu_seqlens` (int32, the offsets of every segment in the flattened
    rows x width token stream, as varlen kernels take them) and `segment_ids` (rows x width) travel with the batch.
    """

    segments: tuple
    cu_seqlens: torch.Tensor
    segment_ids: torch.Tensor
    max_seqlen: int
    packed: bool  # whether any row holds more than one example (else plain causal attention is already exact)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], width: int) -> "PackedLayout":
        segments, bounds, ids = [], [0], torch.empty((len(lengths), width), dtype=torch.int32)
        for r, row in enumerate(lengths):
            cuts, at = [], 0
            for n in [*row, width - sum(row)]:
                if n > 0:
                    ids[r, at : at + n] = len(bounds) - 1
                    cuts.append((at, at + n))
                    bounds.append(r * width + at + n)
                    at += n
            segments.append(tuple(cuts))
        longest = max(stop - start for row in segments for start, stop in row)
        packed = any(len(row) > 1 for row in lengths)
        return cls(tuple(segments), torch.tensor(bounds, dtype=torch.int32), ids, longest, packed)

    def to(self, device) -> "PackedLayout":
        if not self.packed:  # plain causal attention needs none of it on the device
            return self
        cuda = torch.device(device).type == "cuda"

        def move(t):
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)

        return PackedLayout(self.segments, move(self.cu_seqlens), move(self.segment_ids), self.max_seqlen, self.packed)

    def block_causal_mask(self) -> torch.Tensor:
        """(rows, 1, width, width) bool: a token sees the earlier tokens of its own segment. Built on the device once
        per forward (every layer shares the layout object) from segment_ids, without a read."""
        if self._mask is None:
            ids = self.segment_ids
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril_()
            self._mask = ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
        return self._mask


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
    return _attend_per_example(query, key, value, segments, dropout, scaling)


def train_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """lora-cli's training attention (TRAIN_SDPA, registered without a mask function, so transformers builds no
    mask): causal attention over each row, or over each example of a packed row.

    A training batch says which by its `packed_layout`; a batch without one (a caller outside the training step)
    is taken apart by its position ids, read back from the device as `packed_sdpa_attention` does."""
    if query.shape[2] != key.shape[2]:  # a KV cache: generation switches back to sdpa, so this is only a guard
        raise RuntimeError("lora-cli's training attention got a KV cache; generation must use the model's own")
    layout = kwargs.get("packed_layout")
    if layout is None:
        position_ids = kwargs.get("position_ids")
        rows_given = position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == query.shape[0]
        segments = _segments(position_ids) if rows_given and query.shape[2] > 1 else None
        if segments is not None:
            return _attend_per_example(query, key, value, segments, dropout, scaling)
    if layout is None or not layout.packed:
        # Unpacked rows are right-padded: every real token attends only to the real tokens before it.
        return _sdpa(query, key, value, dropout, scaling).transpose(1, 2).contiguous(), None
    if query.device.type == "cuda" and _flash_runs(query) and dropout == 0.0:
        return _attend_varlen(query, key, value, layout, scaling), None
    if query.device.type == "cuda" or CPU_PACKED_KERNEL == "mask":
        out = _sdpa(query, key, value, dropout, scaling, layout.block_causal_mask())
        return out.transpose(1, 2).contiguous(), None
    return _attend_per_example(query, key, value, layout.segments, dropout, scaling)


# The CPU's packed kernel: "loop" (one causal sdpa call per example: the least arithmetic) or "mask" (one sdpa call
# per layer with a block-diagonal mask: the fewest operations). Measured in docs/BENCHMARKS.md (issue 21).
CPU_PACKED_KERNEL = "loop"


def _sdpa(query, key, value, dropout: float, scaling, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal sdpa, or sdpa under `mask`; grouped-query k/v repeated per query head where sdpa would otherwise fall
    back to its math kernel (see _native_gqa: on CUDA only flash takes them as they are, and flash takes no mask)."""
    gqa = query.shape[1] != key.shape[1]
    if gqa and not (_native_gqa(query) and (mask is None or query.device.type != "cuda")):
        repeats = query.shape[1] // key.shape[1]  # query head h reads k/v head h // repeats, as enable_gqa does
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                          is_causal=mask is None, scale=scaling, enable_gqa=gqa)


def _attend_varlen(query, key, value, layout: PackedLayout, scaling):
    """One flash varlen call over every example of every row: (B, H, L, D) in, (B, L, H, D) out."""
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, width, dim = query.shape

    def flat(t):  # (B, H, L, D) -> (B * L, H, D), the token stream the cu_seqlens offsets index
        return t.transpose(1, 2).reshape(rows * width, t.shape[1], dim)

    out = varlen_attn(flat(query), flat(key), flat(value), layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                      layout.max_seqlen, scale=scaling, window_size=(-1, 0),
                      enable_gqa=query.shape[1] != key.shape[1])
    return out.reshape(rows, width, heads, dim)


def _flash_runs(query: torch.Tensor) -> bool:
    """Whether PyTorch's flash attention kernels run for this query on CUDA (varlen flash needs the same)."""
    return (
        torch.backends.cuda.flash_sdp_enabled() and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256 and torch.cuda.get_device_capability(query.device) >= (8, 0)
    )


def _attend_per_example(query, key, value, segments, dropout, scaling):
    """One causal sdpa call per example (segment) of every row: (B, H, L, D) in, (B, L, H, D) out."""
    gqa = query.shape[1] != key.shape[1]
    if gqa and not _native_gqa(query):
        repeats = query.shape[1] // key.shape[1]  # query head h reads k/v head h // repeats, as enable_gqa does
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        gqa = False
    rows = []
    for b, row in enumerate(segments):
        sizes = [stop - start for start, stop in row]  # one split per tensor and row: fewer ops than a slice each
        parts = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(*(t[b : b + 1].split(sizes, dim=2) for t in (query, key, value)))
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
    return query.device.type != "cuda" or _flash_runs(query)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # unpacked batches get sdpa's masks
    AttentionInterface.register(TRAIN_SDPA, train_sdpa_attention)  # no mask function: transformers builds none


def plain_causal(model) -> bool:
    """Whether every attention layer of the model is plain causal attention, which TRAIN_SDPA computes exactly."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) for name in _NOT_PLAIN):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    return not any(getattr(module, "sliding_window", None) for module in model.modules())


@contextlib.contextmanager
def packed_attention(model, device, enabled: bool = True, call_model=None):
    """Train inside: an sdpa model gets lora-cli's training attention (TRAIN_SDPA where its layers are plain causal,
    else, when packing, PACKED_SDPA; see the module docstring; other implementations are left as they are), and with
    packing (`enabled`) the model is checked to keep packed examples apart, else UserError. Restores the attention
    on exit. `call_model(fn)`: how fn(model) is run (under FSDP through the loss module, which gathers the weights)."""
    original = getattr(getattr(model, "config", None), "_attn_implementation", None)
    target = None
    if original == "sdpa" and hasattr(model, "set_attn_implementation"):
        target = TRAIN_SDPA if plain_causal(model) else PACKED_SDPA if enabled else None
    if target:
        _register()
        model.set_attn_implementation(target)
    try:
        if enabled:
            (call_model or (lambda fn: fn(model)))(lambda m: check_packing_supported(m, device))
        yield
    finally:
        if target:
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
        rows = [[first, second]]
        batch = {**data_lib.collate_packed(rows, 0),
                 "packed_layout": PackedLayout.from_lengths([[len(first), len(second)]], len(first) + len(second))}
        packed = _decoder_states(model, batch, device)[0, len(first) :]
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
    kwargs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS}  # (PackedLayout moves too)
    if hasattr(model, "get_decoder"):
        return model.get_decoder()(**kwargs, use_cache=False).last_hidden_state
    return model(**kwargs, use_cache=False).logits
