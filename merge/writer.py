"""Streaming safetensors writer: plan shards from specs alone, write each header up front, then the bytes.

The safetensors library only writes from a complete in-memory dict of tensors (`save_file`), which is exactly
the whole-model-in-RAM behaviour this package exists to avoid; its format is simple and documented (8-byte
little-endian header length, JSON header with dtype/shape/data_offsets, then the raw bytes), so it is written
by hand here, one tensor at a time, from one reusable buffer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from merge.source import DTYPES, FLOATING, TensorSpec, WeightSource

DEFAULT_SHARD_BYTES = 5 * 10**9  # what transformers' save_pretrained uses ("5GB")
INDEX_NAME = "model.safetensors.index.json"

Progress = Callable[[int], None]  # called with the number of bytes just written


def output_dtype(source_dtype: str, cast: str | None) -> str:
    """Casting applies to floating-point tensors only: integer buffers (position ids, counters) keep their type."""
    return cast if cast and source_dtype in FLOATING else source_dtype


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards if shards[0] else []


def safetensors_header(names: list[str], specs: dict[str, TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        spec = specs[name]
        header[name] = {"dtype": DTYPES[spec.dtype][1], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return len(text).to_bytes(8, "little") + text


class _Buffer:
    """One growing scratch buffer, reused for every tensor so memory is the largest tensor, not their sum."""

    def __init__(self) -> None:
        self._data = bytearray()

    def view(self, size: int) -> memoryview:
        if len(self._data) < size:
            self._data = bytearray(size)
        return memoryview(self._data)[:size]


def write_weights(
    folder: Path,
    source: WeightSource,
    names: list[str],
    cast: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> dict:
    """Write `names` from `source` as model-0000i-of-0000N.safetensors + index into `folder`; return the index."""
    source_specs = source.specs()
    specs = {n: TensorSpec(output_dtype(source_specs[n].dtype, cast), source_specs[n].shape) for n in names}
    shards = plan_shards([(n, specs[n].nbytes) for n in names], max_shard_bytes)
    buffer = _Buffer()
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / file, "wb") as handle:
            handle.write(safetensors_header(shard, specs))
            for name in shard:
                data = buffer.view(source_specs[name].nbytes)
                if len(data):
                    source.read(name, data)
                if specs[name].dtype != source_specs[name].dtype:
                    data = _cast(data, source_specs[name].dtype, specs[name].dtype)
                handle.write(data)
                if progress:
                    progress(len(data))
                weight_map[name] = file
            handle.flush()
            os.fsync(handle.fileno())
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs.values())}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return index


def _cast(data: memoryview, source: str, target: str) -> memoryview:
    import torch  # only when casting: numpy has no bfloat16

    if len(data) == 0:
        return data
    tensor = torch.frombuffer(data, dtype=getattr(torch, source)).to(getattr(torch, target))
    return memoryview(tensor.view(torch.uint8).numpy())
