"""Already consolidated Hugging Face weights (`model.safetensors` or a sharded index) as a `WeightSource`.

Used to cast a consolidated checkpoint, to average several, and as the regular weights under an EMA overlay.
Reads each tensor by byte range from the header's offsets: no file is ever loaded whole.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from merge.source import SAFETENSORS_TO_TORCH, MergeError, TensorSpec, model_key

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (without `__metadata__`) and the offset where tensor data starts."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            if len(raw) < 8:
                raise MergeError(f"{path.name}: truncated safetensors file")
            (length,) = struct.unpack("<Q", raw)
            # The length is whatever the file's first 8 bytes say: check it against the file before allocating
            # that much (a corrupt or hostile file claiming 10^15 bytes was a MemoryError).
            if length > min(MAX_HEADER, size - 8):
                raise MergeError(f"{path.name}: not a safetensors file (its header claims {length} bytes; the "
                                 f"file has {size})")  # fmt: skip
            header = json.loads(handle.read(length))
    except (OSError, ValueError, RecursionError) as exc:
        raise MergeError(f"{path.name}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path.name}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


class SafetensorsSource:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise MergeError(f"{self.folder}: no model.safetensors or {INDEX}")
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute begin, end)
        self._specs: dict[str, TensorSpec] = {}
        for file in files:
            path = self.folder / file
            header, data_start = read_header(path)
            size = os.path.getsize(path)
            for fqn, info in header.items():
                try:
                    begin, end = (int(offset) for offset in info["data_offsets"])
                    dtype_name, shape = info["dtype"], tuple(int(n) for n in info["shape"])
                except (KeyError, TypeError, ValueError):
                    raise MergeError(f"{file}: tensor {fqn} has a malformed header entry") from None
                if data_start + end > size:
                    raise MergeError(f"{file}: truncated ({size} bytes, header needs {data_start + end})")
                dtype = SAFETENSORS_TO_TORCH.get(dtype_name) if isinstance(dtype_name, str) else None
                if dtype is None:
                    raise MergeError(f"{file}: tensor {fqn} has unsupported dtype {dtype_name}")
                name = model_key(fqn)
                if name in self._specs:
                    raise MergeError(f"{file}: two tensors map to the name {name}")
                self._specs[name] = TensorSpec(dtype, shape)
                if self._specs[name].nbytes != end - begin:
                    raise MergeError(f"{file}: tensor {fqn} has {end - begin} bytes, its shape needs "
                                     f"{self._specs[name].nbytes}")  # fmt: skip
                self._where[name] = (file, data_start + begin, data_start + end)
        self._handles: dict[str, int] = {}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, out: memoryview) -> None:
        file, begin, end = self._where[name]
        fd = self._handles.get(file)
        if fd is None:
            fd = self._handles[file] = os.open(self.folder / file, os.O_RDONLY)
        read_range(fd, begin, out[: end - begin], file)

    def byte_ranges(self, name: str) -> list[tuple[Path, int, int]]:
        """The tensor as one (file, offset, length) run: see WeightSource.byte_ranges."""
        file, begin, end = self._where[name]
        return [(self.folder / file, begin, end - begin)]

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


def read_range(fd: int, offset: int, out: memoryview, label: str) -> None:
    """Fill `out` from the file at `offset` (os.preadv loops until done: reads may be short)."""
    done = 0
    while done < len(out):
        count = os.preadv(fd, [out[done:]], offset + done)
        if count == 0:
            raise MergeError(f"{label}: file ends early (truncated)")
        done += count
