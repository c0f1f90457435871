"""`WeightSource` over a torch.distributed.checkpoint (DCP) directory: `.metadata` + `*.distcp` files.

No torch, no `torch.load`, and no `.distcp` file is ever read whole. The byte path of one chunk:

* `.metadata` (merge/dcp_metadata.py) gives each tensor's chunks and each chunk's [offset, offset + length)
  in a `.distcp` file; `model_entries` picks the model tensors and `check_coverage` (merge/coverage.py)
  proves that the chunks tile every tensor and that every range exists before any data is read.
* torch/distributed/checkpoint/filesystem.py `_write_item` writes every chunk as one complete `torch.save`
  stream at its range (`SerializationFormat.TORCH_SAVE`, the default). merge/torch_save_stream.py parses
  that zip stream (end-of-central-directory, central directory, then the tiny `data.pkl` through a
  restricted unpickler, so nothing of the pickle's choosing ever runs) into a `StoredChunk`: where the
  storage bytes start in the file, and the dtype, storage offset, size and stride that lay them out.
* With `SerializationFormat.SAFETENSORS` (the same writer, used by torch's Hugging Face storage writer)
  the tensors of a file are instead one safetensors blob starting at the recorded offset; its JSON header
  gives each fqn's byte range (`SafetensorsHeaders`, same module), and the data is read the same way.
* The storage record's bytes are then read with `os.preadv` straight into the caller's `out` buffer when
  the chunk is one contiguous block of the full row-major tensor (a `Shard(0)` chunk), and otherwise
  (a `Shard(1)` column block, or a chunk saved with permuted strides) in pieces of at most
  `read_buffer_bytes` (64 MiB) into one reused buffer and scattered into `out` with numpy views.
  Copies are bitwise (numpy sees unsigned integers of the element's width), so bf16/fp8 need no support.

Memory: `out` plus one read buffer of at most `read_buffer_bytes`, plus per-chunk headers of a few KiB.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from merge.coverage import check_coverage
from merge.dcp_metadata import (
    DTYPE_ITEMSIZE,
    DcpMetadata,
    DcpMetadataError,
    StorageRef,
    TensorInfo,
    UnsafeCheckpointError,
    read_dcp_metadata,
)
from merge.source import DTYPES, MergeError, TensorSpec, model_key
from merge.torch_save_stream import (
    ChunkFormatError,
    SafetensorsHeaders,
    StoredChunk,
    locate_torch_save,
    row_major,
)

__all__ = ["NON_MODEL_KEYS", "READ_BUFFER_BYTES", "DcpSource", "check_coverage", "model_entries"]

READ_BUFFER_BYTES = 64 << 20
# torchtitan's CheckpointManager saves these next to the flat model keys (torchtitan/components/checkpoint.py).
NON_MODEL_KEYS = frozenset({"optimizer", "lr_scheduler", "dataloader", "train_state"})
# accelerate (FSDP SHARDED_STATE_DICT) and the HF Trainer save `{"model": state_dict}`.
MODEL_CONTAINER = "model"

_MAX_SYSCALL = 1 << 30  # Linux transfers at most ~2 GiB per read; stay well below
_MAX_OPEN_FILES = 128


# ---------------------------------------------------------------------------------------------------
# Which entries are model weights, under which name


def _nested_path(meta: DcpMetadata, fqn: str) -> tuple[str | int, ...]:
    """The nested path of a flattened fqn (default planner's planner_data), else the dotted parts."""
    return meta.planner_data.get(fqn) or tuple(fqn.split("."))


def model_entries(meta: DcpMetadata, where: str = "checkpoint") -> dict[str, str]:
    """HF model key -> DCP fqn for every model tensor of the checkpoint."""
    paths = {fqn: _nested_path(meta, fqn) for fqn in meta.tensors}
    nested = any(len(p) >= 2 and p[0] == MODEL_CONTAINER for fqn, p in paths.items() if fqn in meta.planner_data)
    names: dict[str, str] = {}
    for fqn, path in paths.items():
        if nested:  # {"model": sd}: exactly the tensors under the container, container dropped
            if len(path) < 2 or path[0] != MODEL_CONTAINER:
                continue
            name = ".".join(str(p) for p in path[1:])
        else:  # torchtitan: flat model keys beside the trainer's own state
            if str(path[0]) in NON_MODEL_KEYS:
                continue
            name = fqn
        name = model_key(name)
        if name in names:
            raise MergeError(f"{where}: {names[name]} and {fqn} both map to the model key {name}")
        names[name] = fqn
    if not names:
        raise MergeError(f"{where}: no model tensors (only {_describe_top_keys(paths)})")
    return names


def _describe_top_keys(paths: dict[str, tuple[str | int, ...]]) -> str:
    tops = sorted({str(p[0]) for p in paths.values()})
    return ", ".join(tops[:6]) + (", ..." if len(tops) > 6 else "") if tops else "no tensors at all"


def _one_line(err: BaseException) -> str:
    """MergeError messages are one line; parser messages (pickle, json) may quote newlines."""
    return " ".join(str(err).split())


# ---------------------------------------------------------------------------------------------------
# Copying a chunk into its box of the full tensor


def _element_view(itemsize: int) -> np.dtype:
    """Bitwise copies: unsigned ints of the element's width (numpy has no bf16/fp8), raw bytes otherwise."""
    return np.dtype({1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}.get(itemsize, f"V{itemsize}"))


def _dense_order(size: tuple[int, ...], stride: tuple[int, ...]) -> list[int] | None:
    """A permutation of the dims in which the strides are row-major (outermost first), or None if the
    chunk is not dense. DCP only saves dense chunks: filesystem.py `_SerialCpuLoader` clones any tensor
    whose storage is larger than its data, keeping the memory format (hence possibly permuted strides)."""
    order = sorted(range(len(size)), key=lambda d: (size[d] > 1, -stride[d], d))  # size-1 dims: any place
    expected = 1
    for d in reversed(order):
        if size[d] > 1:
            if stride[d] != expected:
                return None
            expected *= size[d]
    return order


def _is_row_major(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    return all(n == 1 or s == r for n, s, r in zip(size, stride, row_major(size)))


def _contiguous_box(shape: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """True if the box is one contiguous run of the row-major tensor: leading dims of size 1, then one
    partial dim, then only full dims (a Shard(0) chunk)."""
    first = next((d for d in range(len(shape)) if sizes[d] != 1), len(shape))
    return all(sizes[d] == shape[d] for d in range(first + 1, len(shape)))


def _linear(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def _check_crc(got: int, expected: int | None) -> None:
    if got != expected:
        raise ChunkFormatError(f"CRC-32 of the tensor data is {got:08x}, the zip says {expected:08x}: corrupt data")


def _read_into(fd: int, offset: int, dest: memoryview) -> None:
    done = 0
    while done < len(dest):
        got = os.preadv(fd, [dest[done : done + _MAX_SYSCALL]], offset + done)
        if got <= 0:
            raise ChunkFormatError(f"file ends at byte {offset + done}")
        done += got


# ---------------------------------------------------------------------------------------------------


class DcpSource:
    """The model weights of one DCP checkpoint directory, read one full tensor at a time."""

    def __init__(self, directory: Path, read_buffer_bytes: int = READ_BUFFER_BYTES, verify_crc: bool = False) -> None:
        """`verify_crc`: check each storage record's CRC-32 from the zip (what torch.load does), catching
        bit rot in the tensor data itself. Off by default: zlib's crc32 runs at ~2 GB/s on one core, slower
        than a fast disk, and everything else (headers, pickle, sizes, coverage) is always checked."""
        self.directory = Path(directory)
        self._buffer_cap = max(int(read_buffer_bytes), 1)
        self._verify_crc = verify_crc
        try:
            self._meta = read_dcp_metadata(self.directory)
        except (DcpMetadataError, UnsafeCheckpointError) as err:
            raise MergeError(f"{self.directory / '.metadata'}: {_one_line(err)}") from None
        except OSError as err:
            raise MergeError(f"{self.directory / '.metadata'}: cannot read ({err.strerror or err})") from None
        self._names = model_entries(self._meta, str(self.directory))
        for fqn in self._names.values():
            if self._meta.tensors[fqn].dtype not in DTYPES:
                raise MergeError(f"{fqn}: dtype {self._meta.tensors[fqn].dtype} cannot be written to safetensors")
        check_coverage(self._meta, self.directory, set(self._names.values()))
        self._refs = {(r.fqn, r.offset_in_tensor): r for r in self._meta.storage}
        self._fds: dict[str, int] = {}  # insertion order = least recently opened first
        self._buffer: np.ndarray | None = None
        self._safetensors = SafetensorsHeaders()

    def specs(self) -> dict[str, TensorSpec]:
        return {
            name: TensorSpec(self._meta.tensors[fqn].dtype, self._meta.tensors[fqn].shape)
            for name, fqn in self._names.items()
        }

    def read(self, name: str, out: memoryview) -> None:
        fqn = self._names.get(name)
        if fqn is None:
            raise KeyError(name)
        info = self._meta.tensors[fqn]
        itemsize = DTYPE_ITEMSIZE[info.dtype]
        dest = memoryview(out)
        if dest.readonly or not dest.c_contiguous:
            raise ValueError("out must be a writable C-contiguous buffer")
        dest = dest.cast("B") if dest.format != "B" or dest.ndim != 1 else dest
        if dest.nbytes != math.prod(info.shape) * itemsize:
            raise ValueError(f"out has {dest.nbytes} bytes, {name} needs {math.prod(info.shape) * itemsize}")
        # Locate and check every chunk before copying any: a bad chunk never yields a half-written tensor.
        located = [(chunk, self._locate(info, chunk)) for chunk in info.chunks if math.prod(chunk.sizes)]
        located.sort(key=lambda item: (item[1][0].relative_path, item[1][0].offset))  # file order: sequential I/O
        full = np.frombuffer(dest, dtype=_element_view(itemsize)).reshape(info.shape)
        for chunk, (ref, stored) in located:
            try:
                self._copy(full, dest, info, chunk.offsets, chunk.sizes, stored, itemsize, ref.relative_path)
            except ChunkFormatError as err:
                raise MergeError(f"{self.directory / ref.relative_path}: {fqn}: {_one_line(err)}") from None
            except OSError as err:
                raise MergeError(f"{self.directory / ref.relative_path}: {fqn}: {err.strerror or err}") from None

    def byte_ranges(self, name: str) -> list[tuple[Path, int, int]] | None:
        """The tensor's bytes as (file, offset, length) runs in row-major order, or None when some chunk is not
        one contiguous run of the full tensor (Shard(1), permuted strides). With these the writer can copy in
        the kernel (copy_file_range) instead of passing every byte through user space twice."""
        fqn = self._names.get(name)
        if fqn is None:
            raise KeyError(name)
        if self._verify_crc:
            return None  # the CRC needs the bytes in user space
        info = self._meta.tensors[fqn]
        itemsize = DTYPE_ITEMSIZE[info.dtype]
        runs = []
        for chunk in info.chunks:
            if not math.prod(chunk.sizes):
                continue
            ref, stored = self._locate(info, chunk)
            if not (_is_row_major(stored.size, stored.stride) and _contiguous_box(info.shape, chunk.sizes)):
                return None
            at = _linear(chunk.offsets, info.shape) * itemsize
            start = stored.file_offset + stored.storage_offset * itemsize
            runs.append((at, self.directory / ref.relative_path, start, math.prod(chunk.sizes) * itemsize))
        runs.sort(key=lambda run: run[0])
        # Coverage was checked when the source was opened, so sorted contiguous runs abut exactly.
        return [(path, start, length) for _, path, start, length in runs]

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        self._buffer = None

    def __enter__(self) -> DcpSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------------

    def _fd(self, relative: str) -> int:
        fd = self._fds.get(relative)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_FILES:  # many ranks: close the oldest instead of hitting ulimit
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.directory / relative, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[relative] = fd
        return fd

    def _locate(self, info: TensorInfo, chunk) -> tuple[StorageRef, StoredChunk]:
        ref = self._refs[(info.fqn, chunk.offsets)]
        where = f"{self.directory / ref.relative_path}: {info.fqn}"
        try:
            fd = self._fd(ref.relative_path)
            if os.pread(fd, 4, ref.offset) == b"PK\x03\x04":
                stored = locate_torch_save(fd, ref.offset, ref.length)
            elif ref.length == math.prod(chunk.sizes) * DTYPE_ITEMSIZE[info.dtype]:
                # SAFETENSORS format: _write_item records length = nbytes (a torch.save stream is always
                # longer than its data), and the offset of the file's safetensors blob.
                stored = self._safetensors.locate(fd, ref.relative_path, ref.offset, info.fqn, chunk.offsets)
            else:
                raise ChunkFormatError("not a torch.save zip stream")
        except UnsafeCheckpointError as err:
            raise MergeError(f"{where}: {_one_line(err)}") from None
        except (ChunkFormatError, ValueError, struct.error) as err:  # ValueError: also JSON, UTF-8
            raise MergeError(f"{where}: chunk at {chunk.offsets} is unreadable ({_one_line(err)})") from None
        except OSError as err:
            raise MergeError(f"{where}: {err.strerror or err}") from None
        if stored.dtype != info.dtype:
            raise MergeError(f"{where}: chunk at {chunk.offsets} is stored as {stored.dtype}, metadata says {info.dtype}")
        if stored.size != chunk.sizes:
            raise MergeError(f"{where}: chunk at {chunk.offsets} is stored as {stored.size}, metadata says {chunk.sizes}")
        itemsize = DTYPE_ITEMSIZE[stored.dtype]
        span = stored.storage_offset + 1 + sum((n - 1) * s for n, s in zip(stored.size, stored.stride))
        if span * itemsize > stored.storage_bytes:
            raise MergeError(f"{where}: chunk at {chunk.offsets} reaches past its storage")
        if _dense_order(stored.size, stored.stride) is None:
            raise MergeError(f"{where}: chunk at {chunk.offsets} has non-dense strides {stored.stride}")
        return ref, stored

    def _scratch(self, nbytes: int) -> np.ndarray:
        # np.empty, not bytearray: pages are only touched (and counted in RSS) as reads fill them.
        if self._buffer is None or self._buffer.nbytes < nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        return self._buffer

    def _copy(self, full, dest, info, offsets, sizes, stored: StoredChunk, itemsize: int, relative: str) -> None:
        fd = self._fd(relative)
        order = _dense_order(stored.size, stored.stride)
        assert order is not None  # checked in _locate
        start = stored.file_offset + stored.storage_offset * itemsize
        nbytes_total = math.prod(sizes) * itemsize
        # The CRC covers the whole record; DCP records hold exactly the chunk (filesystem.py clones others).
        check_crc = self._verify_crc and stored.crc32 is not None and stored.storage_offset == 0
        check_crc = check_crc and nbytes_total == stored.storage_bytes
        crc = 0
        box = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
        if _is_row_major(stored.size, stored.stride) and _contiguous_box(info.shape, sizes):
            # Shard(0)-style: the chunk is one run of `out`; read it there directly, no copy at all.
            at = _linear(offsets, info.shape) * itemsize
            _read_into(fd, start, dest[at : at + nbytes_total])
            if check_crc:
                _check_crc(zlib.crc32(dest[at : at + nbytes_total]), stored.crc32)
            return
        # Otherwise read row-major slabs (in the chunk's own dim order) into the bounded buffer, then
        # scatter each into its place: `box.transpose(order)` lines the destination up with the slabs.
        psizes = [sizes[d] for d in order]
        target = box.transpose(order)
        budget = max(self._buffer_cap // itemsize, 1)
        d = next(k for k in range(len(psizes)) if math.prod(psizes[k + 1 :]) <= budget)
        inner = math.prod(psizes[d + 1 :])
        step = max(1, min(psizes[d], budget // inner))
        scratch = self._scratch(min(step * inner, math.prod(psizes)) * itemsize)
        element = _element_view(itemsize)
        for outer in itertools.product(*(range(n) for n in psizes[:d])):
            for first in range(0, psizes[d], step):
                rows = min(step, psizes[d] - first)
                nbytes = rows * inner * itemsize
                flat = _linear((*outer, first), tuple(psizes[: d + 1])) * inner
                _read_into(fd, start + flat * itemsize, memoryview(scratch)[:nbytes])
                if check_crc:  # slabs come in file order, so the running CRC is the record's
                    crc = zlib.crc32(memoryview(scratch)[:nbytes], crc)
                piece = scratch[:nbytes].view(element).reshape(rows, *psizes[d + 1 :])
                target[(*outer, slice(first, first + rows))] = piece
        if check_crc:
            _check_crc(crc, stored.crc32)
