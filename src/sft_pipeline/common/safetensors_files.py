"""Safetensors files read and written without loading a model: one home for the format.

    file   = u64 little-endian header length N | N bytes of JSON header | tensor data
    header = {"__metadata__": {...},
              "name": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}}
             offsets count from the start of the data (8 + N); the last end is the file's end

    a model folder:  model.safetensors                         one file
                 or  model.safetensors.index.json              weight map: tensor -> shard file
                     model-00001-of-0000K.safetensors ...      the shards it names

Used by the shard-wise merge (reads a checkpoint tensor by tensor, writes the merged shards and
their index), the GGUF writer (reads the merged folder tensor by tensor), the export check (sizes
a model from its headers) and the resume protocol (a checkpoint's weights are whole only when
every header's offsets reach exactly its file's end: a kill mid-save leaves them short).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_pipeline.common.paths import UnsafePathError, read_shard_index

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names (the header field "dtype") -> torch dtype names.
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class UnsupportedDtype(ValueError):
    """A tensor dtype this project cannot read or write as safetensors."""


def torch_dtype(name: str):
    """The torch dtype of the safetensors dtype `name` ("BF16" -> torch.bfloat16)."""
    import torch

    if name not in DTYPES:
        raise UnsupportedDtype(f"safetensors dtype {name} is not supported; known: {list(DTYPES)}")
    return getattr(torch, DTYPES[name])


def safetensors_dtype(dtype) -> str:
    """The safetensors spelling of a torch dtype (torch.bfloat16 -> "BF16")."""
    spelled = str(dtype).removeprefix("torch.")
    for name, torch_name in DTYPES.items():
        if torch_name == spelled:
            return name
    raise UnsupportedDtype(f"{dtype} has no safetensors dtype; known: {list(DTYPES.values())}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors spelling, "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """A safetensors file's tensor table, by tensor name."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {
        name: TensorEntry(
            meta["dtype"],
            tuple(meta["shape"]),
            base + meta["data_offsets"][0],
            base + meta["data_offsets"][1],
        )
        for name, meta in header.items()
        if name != "__metadata__"
    }


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single `model.safetensors`."""
    if (folder / INDEX).is_file():
        # Shard names are data: each is checked to stay inside `folder` (read and written there).
        return read_shard_index(folder / INDEX)
    if not (folder / SINGLE).is_file():
        raise FileNotFoundError(f"{folder}: neither {INDEX} nor {SINGLE}")
    return dict.fromkeys(read_header(folder / SINGLE), SINGLE)


class ShardReader:
    """Tensors by name, each read with `pread` into its own buffer: nothing is memory-mapped.

    A memory-mapped shard keeps every page it touched resident (counted in the process's RSS)
    until it is unmapped, so reading a 10 GB shard through a mapping ends up holding 10 GB. A
    pread copy is freed with the tensor, and the file's pages are dropped from the page cache
    once read (POSIX_FADV_DONTNEED), so reading a checkpoint does not push everything else out.
    """

    def __init__(self, folder: Path, mapping: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.mapping = weight_map(self.folder) if mapping is None else mapping
        self._headers: dict[str, dict[str, TensorEntry]] = {}

    @property
    def shards(self) -> list[str]:
        """The folder's shard files, in name order."""
        return sorted(set(self.mapping.values()))

    def header(self, shard: str) -> dict[str, TensorEntry]:
        """The tensors of one shard file, by name (its header, read once)."""
        if shard not in self._headers:
            self._headers[shard] = read_header(self.folder / shard)
        return self._headers[shard]

    def entry(self, name: str) -> TensorEntry:
        return self.header(self.mapping[name])[name]

    def meta(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype such as "BF16", shape) without reading the tensor."""
        entry = self.entry(name)
        return entry.dtype, list(entry.shape)

    def get(self, name: str):
        import torch

        entry = self.entry(name)
        size = entry.end - entry.begin
        buffer = bytearray(size)
        fd = os.open(self.folder / self.mapping[name], os.O_RDONLY)
        try:
            view, done = memoryview(buffer), 0
            while done < size:
                n = os.preadv(fd, [view[done:]], entry.begin + done)
                if n <= 0:
                    raise OSError(f"{self.mapping[name]}: file ends inside tensor {name}")
                done += n
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, entry.begin, size, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        dtype = torch_dtype(entry.dtype)
        if size == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)

    def close(self) -> None:
        self._headers.clear()


def write_shard(
    target: Path, plan: dict[str, tuple[str, tuple[int, ...]]], compute: Callable[[str], Any]
) -> int:
    """Stream one safetensors file: the header from the plan, then each tensor's bytes in turn.

        plan {name: (dtype, shape)} ──> header: u64 length | {"name": {dtype, shape,
                                                 data_offsets: [begin, end]}, ...} (8-aligned)
        for name in plan:  compute(name) -> check dtype/shape -> write bytes -> drop it

    Only one computed tensor is alive at a time. Returns the bytes of tensor data written.
    """
    import torch

    offsets, position = {}, 0
    for name, (dtype, shape) in plan.items():
        size = math.prod(shape) * torch_dtype(dtype).itemsize
        offsets[name] = (position, position + size)
        position += size
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, (dtype, shape) in plan.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets[name])}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with target.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, (dtype, shape) in plan.items():
            tensor = compute(name)
            if safetensors_dtype(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
                raise RuntimeError(
                    f"{target.name}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"planned {dtype} {shape}"
                )
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return position


def write_index(folder: Path, mapping: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json` of a sharded folder (`total_size`: tensor data bytes)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": mapping}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def weights_problem(path: Path) -> str | None:
    """Why the weights at `path` (a safetensors file, or an index and every shard it names) are
    not whole, or None when they are."""
    files = [path]
    if path.name.endswith(".index.json"):
        try:
            shards = set(read_shard_index(path).values())
        except UnsafePathError as exc:
            return f"{path.name} is unusable ({exc})"
        files = [path.parent / shard for shard in sorted(shards)]
    for file in files:
        problem = _file_problem(file)
        if problem:
            return problem
    return None


def _file_problem(path: Path) -> str | None:
    # The header's largest end offset must land exactly on the end of the file.
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return f"{path.name} is truncated (header past the end)"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError, struct.error) as exc:
        return f"{path.name} is unreadable ({exc})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{path.name} is truncated ({size} bytes, its header expects {expected})"
    return None
