"""One GGUF file written tensor by tensor with the `gguf` package's writer, atomically.

All tensor infos (names, shapes, types) are known before any data is read, so the header, key-values and tensor
infos go first and then each tensor is read from its source (the merged shards, or the streaming merge itself),
transformed (llama's q/k permutation), converted to its type a slice of rows at a time and written: RAM holds about
one tensor of the source plus its converted copy. The file is written under a temporary name beside its final one
and renamed only when complete (fsutil.atomic_file), so a killed export never leaves a `.gguf` that looks whole.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..fsutil import atomic_file
from ..safetensors_io import SafetensorsFile
from . import gguf_arch, gguf_types
from .gguf_tokenizer import TokenizerMeta

SINGLE_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


@dataclass
class TensorSource:
    """The merged model's tensors by their transformers names: shapes, and a reader of one tensor at a time."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]


@dataclass
class GgufWritten:
    path: Path
    tensors: int
    bytes: int
    seconds: float
    types: dict[str, int]  # GGML type name -> how many tensors have it


def folder_source(folder: Path) -> TensorSource:
    """The tensors of a merged model folder's safetensors files (single file or shards listed by the index)."""
    if (folder / SINGLE_NAME).is_file():
        files = [SafetensorsFile(folder / SINGLE_NAME)]
    elif (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        files = [SafetensorsFile(folder / name) for name in sorted(set(index["weight_map"].values()))]
    else:
        raise UserError(f"--gguf: {folder} has no safetensors weights to export.")
    holder = {key: file for file in files for key in file.keys()}
    return TensorSource({key: file.shape(key) for key, file in holder.items()}, lambda key: holder[key].read(key))


def _order(gguf_name: str) -> tuple:
    """llama.cpp's converter order: embedding, rope factors, blocks by number, final norm, head."""
    found = re.match(r"blk\.(\d+)\.", gguf_name)
    if found:
        return (1, int(found.group(1)), gguf_name)
    return (0 if gguf_name in ("token_embd.weight", gguf_arch.ROPE_FREQS) else 2, 0, gguf_name)


@dataclass
class _Planned:
    hf_name: str | None  # None: made here (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    ggml_type: object


def _plan(source: TensorSource, config, spec: gguf_arch.ArchSpec, gtype: gguf_types.GgufType) -> list[_Planned]:
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in source.shapes
    head = "token_embd.weight" if tied else "output.weight"
    planned = []
    for hf_name, shape in source.shapes.items():
        if hf_name == "lm_head.weight" and tied:  # a tied head is the embedding: llama.cpp falls back to it
            continue
        name = gguf_arch.gguf_name(hf_name)
        planned.append(_Planned(hf_name, name, tuple(shape), gguf_types.ggml_type_for(gtype, shape, name == head)))
    factors = gguf_arch.rope_factors(config)
    if factors is not None:
        planned.append(_Planned(None, gguf_arch.ROPE_FREQS, tuple(factors.shape),
                                gguf_types.ggml_type_for(gtype, factors.shape, False)))
    return sorted(planned, key=lambda p: _order(p.gguf_name))


def write_gguf(path: Path, source: TensorSource, config, tokenizer: TokenizerMeta, gtype: gguf_types.GgufType,
               name: str, log: Callable[[str], None]) -> GgufWritten:
    """Write the GGUF file `path` from `source`; the architecture and tokenizer were checked before."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    start = time.perf_counter()
    spec = gguf_arch.architecture_of(config)
    planned = _plan(source, config, spec, gtype)
    writer = GGUFWriter(None, spec.gguf_arch)
    writer.add_type("model")
    writer.add_name(name)
    gguf_arch.write_hparams(writer, config, spec)
    writer.add_file_type(LlamaFileType[gtype.file_type])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    tokenizer.write(writer)
    types: dict[str, int] = {}
    for item in planned:
        shape, dtype = gguf_types.stored_shape(item.shape, item.ggml_type)
        quantized = dtype == np.uint8
        writer.add_tensor_info(item.gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                               raw_dtype=item.ggml_type if quantized else None)
        types[item.ggml_type.name] = types.get(item.ggml_type.name, 0) + 1
    log(f"writing {path.name} ({gtype.name}): {len(planned)} tensors, "
        + ", ".join(f"{count} {kind}" for kind, count in sorted(types.items())))
    with atomic_file(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in planned:
                writer.write_tensor_data(_tensor_data(item, source, spec, config))
        finally:
            writer.close()
    return GgufWritten(path, len(planned), path.stat().st_size, time.perf_counter() - start, types)


def _tensor_data(item: _Planned, source: TensorSource, spec, config) -> np.ndarray:
    if item.hf_name is None:
        tensor = gguf_arch.rope_factors(config)
    else:
        tensor = gguf_arch.transform(item.hf_name, source.read(item.hf_name), spec, config)
    return gguf_types.convert(tensor, item.ggml_type, item.hf_name or item.gguf_name)
