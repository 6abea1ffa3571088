"""safetensors files one tensor at a time, in both directions, with no memory map.

``safetensors.torch.load_file`` maps the whole file, and every page it touches stays resident (and counted
in the process's memory) while any tensor of it lives; ``save_file`` needs every tensor of a shard in
memory at once. Conversions of checkpoints larger than memory need neither: :func:`read_tensor` reads one
entry into a fresh tensor, and :func:`write_streamed` writes a file whose tensors are produced one by one,
the header first (it only needs names, shapes and dtypes).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def read_header(path: Path) -> list[Entry] | None:
    """The file's entries in file order, validated against its size; ``None`` when this reader cannot
    read the file (a dtype it does not know, a big-endian machine). Raises ValueError on a corrupt file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"the file has {size} bytes; a safetensors file has at least 8")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise ValueError(f"header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    readable = all(isinstance(e, dict) and e.get("dtype") in DTYPES for e in header.values())
    if sys.byteorder != "little" or not readable:
        return None
    data_start = 8 + header_len
    entries = []
    for name, e in header.items():
        dtype = DTYPES[e["dtype"]]
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(v) for v in e["data_offsets"])
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or end - begin != nbytes or begin < 0 or data_start + end > size:
            raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} do not match its shape or the file")
        entries.append(Entry(name, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda e: e.begin)
    stored = [e for e in entries if e.end > e.begin]  # empty tensors own no bytes
    for before, after in zip(stored, stored[1:], strict=False):
        if after.begin < before.end:  # one storage under two names: a crafted file, not one safetensors writes
            raise ValueError(
                f"tensors {before.name!r} and {after.name!r} overlap in the file (data offsets "
                f"{before.begin - data_start}..{before.end - data_start} and {after.begin - data_start}.."
                f"{after.end - data_start}); expected each tensor its own bytes"
            )
    return entries


def read_tensor(f: BinaryIO, entry: Entry) -> torch.Tensor:
    """``entry``'s tensor, read from the open file ``f`` into freshly allocated memory."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    nbytes = entry.end - entry.begin
    if nbytes:
        f.seek(entry.begin)
        if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != nbytes:
            raise ValueError(f"tensor {entry.name!r} is truncated")
    return tensor


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, shape and dtype now, its values from ``produce()`` when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def write_streamed(path: Path, tensors: list[Planned], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, producing and writing them one at a time."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors:
            tensor = t.produce()
            if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:  # a planning bug, not a user error
                produced = f"{tuple(tensor.shape)} {tensor.dtype}"
                raise RuntimeError(f"{t.name}: produced {produced}, planned {t.shape} {t.dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
