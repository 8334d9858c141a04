"""safetensors files one tensor at a time: read a tensor without mapping the file, write a file tensor by tensor.

`safetensors.safe_open` memory-maps the file, and every page it touches counts in the process's resident memory
until the file is closed; `save_file` converts every tensor of a shard to bytes before writing. Streaming a
model through both holds about two shards in RAM. Here a tensor is read with plain file reads into a tensor of its
own, and a file is written from its header (all shapes are known in advance) then each tensor's bytes in turn, so
at most the tensor being written is in memory. The bytes written are those `safetensors.torch.save_file` writes
(same header, same tensor order; tests compare the files).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch

HEADER_DTYPES = {  # the dtype codes of a safetensors header
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
HEADER_NAMES = {dtype: name for name, dtype in HEADER_DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


class SafetensorsFile:
    """The header of a safetensors file and reads of single tensors from it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{self.path} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > _HEADER_LIMIT:
                raise ValueError(f"{self.path} has a header of {length} bytes; not a safetensors file")
            header = json.loads(f.read(length))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return HEADER_DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name]["data_offsets"]
        return end - start

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in a fresh CPU tensor (no memory map stays behind)."""
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(raw.numpy())) != end - start:
                raise ValueError(f"{self.path} ends before the data of {name}")
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def _save_order(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The order in which safetensors lays out these tensors (by dtype, then name, in its own ranking), asked of
    safetensors itself with one-element stand-ins, so the files match whatever version is installed."""
    from safetensors.torch import save

    probe = save({name: torch.zeros(1, dtype=dtype) for name, (dtype, _) in entries.items()})
    (length,) = struct.unpack("<Q", probe[:8])
    header = json.loads(probe[8 : 8 + length])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def write_streaming(
    path: str | Path,
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors (name -> (dtype, shape)) are made one at a time by `produce(name)`,
    in file order. Returns the bytes written. A produced tensor of another dtype or shape is a bug: ValueError."""
    order = _save_order(entries)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": HEADER_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to a multiple of 8
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            tensor = produce(name)
            dtype, shape = entries[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor
    return 8 + len(text) + offset
