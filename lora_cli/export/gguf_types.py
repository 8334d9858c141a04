"""The GGUF types lora-merge writes, and how one tensor becomes the bytes of its type.

Only the types the `gguf` package computes in numpy: f32, f16, bf16 and the block quants q8_0 (bit-exact with
ggml's own) and q4_0. K-quants (q4_k_m, q5_k_m, q6_k, ...) are dequantize-only in Python; llama.cpp's
`llama-quantize` makes them from the f16 file. The policy per tensor follows llama.cpp's converter: every 1-D
tensor (norms, biases, rope factors) stays F32; a row that is not a whole number of 32-element blocks cannot be
block-quantized and falls back to F16. For q4_0 the output head (or the embedding, when the head is tied to it)
is written as Q8_0, as llama-quantize keeps the head at a higher precision (Q6_K there, which Python cannot make).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

ROWS_PER_CHUNK = 4096  # rows quantized at once: bounds the numpy temporaries to a slice of the tensor


@dataclass(frozen=True)
class GgufType:
    name: str  # as the user writes it, and in the file name
    tensor_type: str  # GGMLQuantizationType member for 2-D weights
    file_type: str  # LlamaFileType member, written as general.file_type


TYPES = {
    "f32": GgufType("f32", "F32", "ALL_F32"),
    "f16": GgufType("f16", "F16", "MOSTLY_F16"),
    "bf16": GgufType("bf16", "BF16", "MOSTLY_BF16"),
    "q8_0": GgufType("q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q4_0": GgufType("q4_0", "Q4_0", "MOSTLY_Q4_0"),
}


def parse_gguf_type(value: str) -> GgufType:
    """`--gguf TYPE` -> GgufType; any other value is a UserError naming the supported ones."""
    key = str(value).strip().lower()
    if key in TYPES:
        return TYPES[key]
    supported = ", ".join(TYPES)
    message = f"--gguf {value!r} is not a type lora-merge can write; choose one of {supported}."
    if "_k" in key or key.startswith(("q2", "q3", "q5", "q6", "iq", "tq")) or key in ("q4_1",):
        message += (
            f" {value} is made by llama.cpp's llama-quantize from an f16 file, which Python cannot do: run "
            f"lora-merge ADAPTER OUTPUT_DIR --gguf f16, then llama-quantize OUTPUT_DIR/NAME-f16.gguf "
            f"OUTPUT_DIR/NAME-{key}.gguf {key.upper()}"
        )
    raise UserError(message)


def ggml_type_for(gtype: GgufType, shape: tuple[int, ...], is_head: bool):
    """The GGMLQuantizationType one tensor is written in."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    wanted = GGMLQuantizationType[gtype.tensor_type]
    if wanted == GGMLQuantizationType.Q4_0 and is_head:
        wanted = GGMLQuantizationType.Q8_0
    block, _ = GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:  # not a whole number of blocks per row: llama.cpp's converter writes F16 too
        return GGMLQuantizationType.F16
    return wanted


def stored_shape(shape: tuple[int, ...], ggml_type) -> tuple[tuple[int, ...], np.dtype]:
    """The numpy shape and dtype of the array handed to the writer for a tensor of `shape` in `ggml_type`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    if ggml_type == GGMLQuantizationType.F32:
        return tuple(shape), np.dtype(np.float32)
    if ggml_type == GGMLQuantizationType.F16:
        return tuple(shape), np.dtype(np.float16)
    return quant_shape_to_byte_shape(shape, ggml_type), np.dtype(np.uint8)


def convert(tensor: torch.Tensor, ggml_type, name: str) -> np.ndarray:
    """`tensor` (any float dtype) as the array the writer stores, converted a slice of rows at a time so that
    the float32 and quantizer temporaries stay a few MB whatever the tensor's size. A value float16 cannot hold
    (|x| > 65504 becomes inf) is a UserError naming the tensor."""
    from gguf.quants import quantize

    shape, dtype = stored_shape(tuple(tensor.shape), ggml_type)
    out = np.empty(shape, dtype=dtype)
    if tensor.dim() < 2:
        out[...] = tensor.float().numpy()
        return out
    rows_in, rows_out = tensor.reshape(-1, tensor.shape[-1]), out.reshape(-1, shape[-1])
    for start in range(0, rows_in.shape[0], ROWS_PER_CHUNK):
        chunk = rows_in[start : start + ROWS_PER_CHUNK].float().numpy()
        with np.errstate(over="ignore"):  # an overflow is reported below, by name
            converted = quantize(chunk, ggml_type)
        if converted.dtype == np.float16 and not np.isfinite(converted).all():
            raise UserError(f"--gguf: {name} has values beyond float16's range (|x| > 65504) that would be written "
                            "as inf; nothing was written. Use --gguf bf16 or f32.")
        rows_out[start : start + ROWS_PER_CHUNK] = converted
    return out
