"""Dropping the pages of a memory-mapped file that a read touched, so resident memory stays flat.

`torch.load(mmap=True)` maps each rank file whole, and every page a copy touches stays resident (and in
this process's RSS) until the kernel runs short. `mapped_ranges` finds where the files are mapped (from
/proc/self/maps), `releasable` says whether a tensor's bytes lie inside such a mapping, and `release`
drops its whole pages with MADV_DONTNEED. Linux only: elsewhere nothing is found mapped, so nothing is
ever released.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["mapped_ranges", "releasable", "release"]

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_PAGE = mmap.PAGESIZE
_libc: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def mapped_ranges(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Address ranges where `paths` are mapped into this process (Linux; [] elsewhere)."""
    if _libc is None:
        return []
    wanted = {str(path.resolve()) for path in paths}
    ranges = []
    with contextlib.suppress(OSError), open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            # "start-end perms offset dev inode   /path/to/file" (the path may contain spaces)
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and fields[5] in wanted:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + elements * tensor.element_size()


def releasable(tensor: torch.Tensor, mapped: Sequence[tuple[int, int]]) -> bool:
    if tensor.numel() == 0:
        return False
    begin, end = _byte_span(tensor)
    return any(start <= begin and end <= stop for start, stop in mapped)


def release(tensor: torch.Tensor) -> None:
    """Drop the pages a read touched, so resident memory does not grow with every tensor read.

    mmap=True maps each rank file whole (MAP_PRIVATE: serialization.py, `UntypedStorage.from_file`), and
    pages a copy touched stay resident, counted in this process's RSS, until the kernel runs short of
    memory: reading every tensor once would leave the whole checkpoint resident. Nothing writes to the
    mapping, so each page is a clean copy of the file: MADV_DONTNEED drops it, and a later access reads
    the file again. Only called for tensors that `releasable` found inside a rank file's mapping: on
    anonymous memory MADV_DONTNEED would zero the data.
    """
    begin, end = _byte_span(tensor)
    first = -(-begin // _PAGE) * _PAGE  # madvise takes whole pages: leave the two partial edge pages
    last = end // _PAGE * _PAGE
    if last > first:
        _libc.madvise(first, last - first, _MADV_DONTNEED)
