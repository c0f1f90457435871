"""Streaming safetensors writer: plan shards from specs alone, write each header up front, then the bytes.

The safetensors library only writes from a complete in-memory dict of tensors (`save_file`), which is exactly
the whole-model-in-RAM behaviour this package exists to avoid; its format is simple and documented (8-byte
little-endian header length, JSON header with dtype/shape/data_offsets, then the raw bytes), so it is written
by hand here, one tensor at a time, from one reusable buffer.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from merge.source import DTYPES, FLOATING, MergeError, TensorSpec, WeightSource

DEFAULT_SHARD_BYTES = 5 * 10**9  # what transformers' save_pretrained uses ("5GB")
INDEX_NAME = "model.safetensors.index.json"

class ByteProgress:
    """A write's progress: `start(total)` once with the bytes the whole write adds up to, then a call with the
    bytes just written, from the copy threads. Hands (bytes done, bytes total) to `report`, at most every
    `interval` seconds and always for the first and the last bytes, so that the last report has done == total.
    Thread-safe."""

    def __init__(self, report: Callable[[int, int], None], interval: float = 0.2):
        self.report, self.interval = report, interval
        self.done = self.total = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        with self._lock:
            self.done, self.total, self._last = 0, total, time.monotonic()
            self.report(0, total)

    def __call__(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if self.done >= self.total or now - self._last >= self.interval:
                self._last = now
                self.report(self.done, self.total)


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


# Kernel copies in flight at once. Fast disks (NVMe) only reach full speed with several, but each copy is CPU
# work in the kernel: measured, 4 threads took an 8B merge from 17.3 to 14.7 s on 16 cores, and made a 2-core
# machine slower (1.43x -> 1.63x cp). So: half the cores, at most 4.
COPY_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def write_weights(
    folder: Path,
    source: WeightSource,
    names: list[str],
    cast: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ByteProgress | None = None,
    threads: int = COPY_THREADS,
) -> dict:
    """Write `names` from `source` as model-0000i-of-0000N.safetensors + index into `folder`; return the index.

    Every tensor's place in its shard is known from the plan, so tensors are written at explicit offsets, and
    those whose bytes lie contiguously on disk are copied in the kernel by several threads at once. The others
    go one at a time through the single shared buffer, so memory stays one tensor plus the buffer.
    """
    source_specs = source.specs()
    specs = {n: TensorSpec(output_dtype(source_specs[n].dtype, cast), source_specs[n].shape) for n in names}
    shards = plan_shards([(n, specs[n].nbytes) for n in names], max_shard_bytes)
    files = [f"model-{number:05d}-of-{len(shards):05d}.safetensors" for number in range(1, len(shards) + 1)]
    buffer, cast_buffer = _Buffer(), _Buffer()
    source_lock = threading.Lock()  # sources and the buffer are not thread-safe; the kernel copies are
    fds: list[int] = []
    tasks = []  # (name, fd, position in the file)
    if progress is not None:
        progress.start(sum(specs[n].nbytes for n in names))
    try:
        for file, shard in zip(files, shards):
            fds.append(os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            position = _write_all(fds[-1], safetensors_header(shard, specs), 0)
            for name in shard:
                tasks.append((name, fds[-1], position))
                position += specs[name].nbytes

        def write_one(task: tuple[str, int, int]) -> None:
            name, fd, position = task
            with source_lock:
                same_dtype = specs[name].dtype == source_specs[name].dtype
                runs = source.byte_ranges(name) if same_dtype else None
                if runs is None:
                    data = buffer.view(source_specs[name].nbytes)
                    if len(data):
                        source.read(name, data)
                    if not same_dtype:
                        data = _cast(data, source_specs[name].dtype, cast_buffer.view(specs[name].nbytes),
                                     specs[name].dtype)  # fmt: skip
                    _write_all(fd, data, position)
            for path, offset, length in runs or ():
                position = _copy_range(path, offset, length, fd, position)
            if progress:
                progress(specs[name].nbytes)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for _ in pool.map(write_one, tasks):  # re-raises the first error
                pass
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs.values())}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return index


_SLICE = 16 << 20  # write big buffers in slices: one multi-GB write() was measured 3-5x slower than 16 MiB ones


def _write_all(fd: int, data: memoryview | bytes, position: int) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _SLICE], position + done)
    return position + done


def _copy_range(path: Path, offset: int, length: int, out_fd: int, position: int) -> int:
    """Copy bytes file-to-file in the kernel (copy_file_range, what `cp` uses): no trip through user space.
    Falls back to a bounded pread/pwrite loop where the kernel or filesystem cannot (EXDEV, ENOSYS, ...)."""
    in_fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        try:
            while done < length:
                count = os.copy_file_range(in_fd, out_fd, min(length - done, 1 << 30), offset + done, position + done)
                if count == 0:
                    raise MergeError(f"{path.name}: file ends early (truncated)")
                done += count
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise MergeError(f"{path.name}: {exc.strerror}") from None
            while done < length:
                chunk = os.pread(in_fd, min(length - done, _SLICE), offset + done)
                if not chunk:
                    raise MergeError(f"{path.name}: file ends early (truncated)")
                _write_all(out_fd, chunk, position + done)
                done += len(chunk)
    finally:
        os.close(in_fd)
    return position + length


def _cast(data: memoryview, source: str, out: memoryview, target: str) -> memoryview:
    """Convert into a reused buffer: a fresh tensor per cast would be kept by malloc's per-thread arenas."""
    import torch  # only when casting: numpy has no bfloat16

    if len(data):
        converted = torch.frombuffer(out, dtype=getattr(torch, target))
        converted.copy_(torch.frombuffer(data, dtype=getattr(torch, source)))
    return out
