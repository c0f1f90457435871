"""`WeightSource` over a torch.distributed.checkpoint (DCP) directory: `.metadata` + `*.distcp` files.

No torch, no `torch.load`, and no `.distcp` file is ever read whole. The byte path of one chunk:

* torch/distributed/checkpoint/filesystem.py `_write_item` writes every tensor chunk as one complete
  `torch.save` stream into a `.distcp` file, at the [offset, offset + length) that `.metadata` records
  (`SerializationFormat.TORCH_SAVE`, the default). `torch.save` writes a zip archive whose records are
  all ZIP_STORED (uncompressed) and 64-byte aligned: `<archive>/data.pkl` (a ~160-byte pickle that
  describes the tensor), `<archive>/data/<key>` (the raw storage bytes), `<archive>/byteorder`, ...
  We read the zip's end-of-central-directory and central directory from the end of the range, then the
  tiny `data.pkl` (with a restricted unpickler that maps every allowed global onto a stand-in, so
  nothing of the pickle's choosing ever runs), which yields dtype, storage offset, size and stride.
* The storage record's bytes are then read with `os.preadv` straight into the caller's `out` buffer when
  the chunk is one contiguous block of the full row-major tensor (a `Shard(0)` chunk), and otherwise
  (a `Shard(1)` column block, or a chunk saved with permuted strides) in pieces of at most
  `read_buffer_bytes` (64 MiB) into one reused buffer and scattered into `out` with numpy views.
  Copies are bitwise (numpy sees unsigned integers of the element's width), so bf16/fp8 need no support.
* With `SerializationFormat.SAFETENSORS` (the same writer, used by torch's Hugging Face storage writer)
  the tensors of a file are instead one safetensors blob starting at the recorded offset; its JSON header
  gives each fqn's byte range, and the data is read the same way.

Memory: `out` plus one read buffer of at most `read_buffer_bytes`, plus per-chunk headers of a few KiB.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge.dcp_metadata import (
    DTYPE_ITEMSIZE,
    DcpMetadata,
    DcpMetadataError,
    StorageRef,
    TensorInfo,
    UnsafeCheckpointError,
    read_dcp_metadata,
)
from merge.source import DTYPES, SAFETENSORS_TO_TORCH, MergeError, TensorSpec, model_key

__all__ = ["NON_MODEL_KEYS", "READ_BUFFER_BYTES", "DcpSource", "check_coverage", "model_entries"]

READ_BUFFER_BYTES = 64 << 20
# torchtitan's CheckpointManager saves these next to the flat model keys (torchtitan/components/checkpoint.py).
NON_MODEL_KEYS = frozenset({"optimizer", "lr_scheduler", "dataloader", "train_state"})
# accelerate (FSDP SHARDED_STATE_DICT) and the HF Trainer save `{"model": state_dict}`.
MODEL_CONTAINER = "model"

_MAX_PICKLE_BYTES = 1 << 20  # a tensor's data.pkl is ~160 bytes; anything huge is not one
_MAX_CENTRAL_DIRECTORY = 1 << 20  # torch.save writes 7 records
_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit the safetensors library itself enforces
_WINDOW = 4096  # head and tail of each chunk's range, read once: usually all the zip metadata there is
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


# ---------------------------------------------------------------------------------------------------
# Coverage: the chunks tile every tensor and every byte range exists, checked before any data is read


def _tiles_exactly(info: TensorInfo) -> str | None:
    """None if the chunks tile the tensor exactly, else why not."""
    total = 0
    boxes = []
    for chunk in info.chunks:
        if len(chunk.offsets) != len(info.shape) or len(chunk.sizes) != len(info.shape):
            return f"a chunk of rank {len(chunk.sizes)} in a tensor of rank {len(info.shape)}"
        for offset, size, dim in zip(chunk.offsets, chunk.sizes, info.shape):
            if offset + size > dim:
                return f"chunk at {chunk.offsets} of size {chunk.sizes} exceeds the shape {info.shape}"
        volume = math.prod(chunk.sizes)
        total += volume
        if volume:
            boxes.append((chunk.offsets, chunk.sizes))
    if total != math.prod(info.shape):
        return f"chunks hold {total} elements, the shape {info.shape} needs {math.prod(info.shape)}"
    overlap = _find_overlap(boxes)
    return None if overlap is None else f"chunks at {overlap[0]} and {overlap[1]} overlap"


def _find_overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple | None:
    """Two overlapping boxes, if any. A sweep along the dimension with the most distinct starts keeps
    the active set at ~1 box for 1-D sharding (Shard(0) or Shard(1)) instead of comparing all pairs."""
    if len(boxes) < 2:
        return None
    if not boxes[0][0]:  # a 0-d tensor: any two chunks holding its one element overlap
        return boxes[0][0], boxes[1][0]
    axis = max(range(len(boxes[0][0])), key=lambda d: len({off[d] for off, _ in boxes}))
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for box in sorted(boxes, key=lambda b: b[0][axis]):
        start = box[0][axis]
        active = [a for a in active if a[0][axis] + a[1][axis] > start]
        for other in active:
            if all(o1 < o2 + s2 and o2 < o1 + s1 for o1, s1, o2, s2 in zip(*box, *other)):
                return other[0], box[0]
        active.append(box)
    return None


def check_coverage(meta: DcpMetadata, directory: Path, fqns: set[str] | None = None) -> None:
    """Raise MergeError (one line, naming the tensor or file) unless every tensor (or only those in
    `fqns`) is tiled exactly by its chunks, every chunk has one byte range, and every file holds its
    ranges. Bytes entries are checked too when `fqns` is None."""
    directory = Path(directory)
    wanted = set(meta.tensors) if fqns is None else set(fqns)
    refs: dict[tuple[str, tuple[int, ...] | None], StorageRef] = {}
    for ref in meta.storage:
        key = (ref.fqn, ref.offset_in_tensor)
        if key in refs:
            raise MergeError(f"{ref.fqn}: two byte ranges for the chunk at {ref.offset_in_tensor}")
        refs[key] = ref
    used: list[StorageRef] = []
    for fqn in sorted(wanted):
        info = meta.tensors.get(fqn)
        if info is None:
            raise MergeError(f"{fqn}: not a tensor of {directory}")
        problem = _tiles_exactly(info)
        if problem:
            raise MergeError(f"{fqn}: {problem}")
        for chunk in info.chunks:
            ref = refs.get((fqn, chunk.offsets))
            if ref is None:
                raise MergeError(f"{fqn}: no byte range for the chunk at {chunk.offsets}")
            used.append(ref)
    if fqns is None:
        for fqn in meta.bytes_entries:
            ref = refs.get((fqn, None))
            if ref is None:
                raise MergeError(f"{fqn}: no byte range for this entry")
            used.append(ref)
    needed: dict[str, tuple[int, str]] = {}
    for ref in used:
        if ref.transform_descriptors:
            raise MergeError(
                f"{directory / ref.relative_path}: {ref.fqn} is stored with transforms "
                f"{'+'.join(ref.transform_descriptors)}, which are not supported"
            )
        end = ref.offset + ref.length
        if end > needed.get(ref.relative_path, (-1, ""))[0]:
            needed[ref.relative_path] = (end, ref.fqn)
    for relative, (end, fqn) in sorted(needed.items()):
        path = directory / relative
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MergeError(f"{path}: missing (it holds {fqn})") from None
        except OSError as err:
            raise MergeError(f"{path}: cannot stat ({err.strerror or err})") from None
        if size < end:
            raise MergeError(f"{path}: truncated to {size} bytes, {fqn} needs {end}")


# ---------------------------------------------------------------------------------------------------
# The tensor pickle inside a torch.save archive, unpickled onto stand-ins


class _ChunkFormatError(ValueError):
    """A chunk's bytes are not what DCP writes; the caller adds file and tensor to the message."""


def _one_line(err: BaseException) -> str:
    """MergeError messages are one line; parser messages (pickle, json) may quote newlines."""
    return " ".join(str(err).split())


@dataclass(frozen=True)
class _StorageType:
    """`torch.FloatStorage` & co. (legacy typed storages: numel counts elements) or `UntypedStorage`
    (dtype None: numel counts bytes, the dtype comes from `_rebuild_tensor_v3`)."""

    dtype: str | None


@dataclass(frozen=True)
class _Storage:
    dtype: str | None
    key: str
    numel: int


@dataclass(frozen=True)
class _PickledTensor:
    storage: _Storage
    dtype: str
    storage_offset: int  # in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]


# torch/storage.py `_dtype_to_storage_type_map`: the typed storage class each dtype pickles as.
_LEGACY_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
}  # fmt: skip


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise _ChunkFormatError(f"{what} is not a tuple of non-negative ints")
    return value


def _no_hooks(hooks: Any, metadata: Any) -> None:
    # DCP saves detached tensors: no backward hooks, no conj/neg bits (torch/_utils.py get_tensor_metadata)
    if not isinstance(hooks, dict) or hooks:
        raise _ChunkFormatError("tensor pickle carries backward hooks")
    if metadata is not None and (not isinstance(metadata, dict) or metadata):
        raise _ChunkFormatError("tensor pickle carries tensor metadata (conj/neg bits), not supported")


def _tensor(storage: Any, dtype: Any, storage_offset: Any, size: Any, stride: Any) -> _PickledTensor:
    if not isinstance(storage, _Storage):
        raise _ChunkFormatError("tensor pickle without a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _ChunkFormatError("bad storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise _ChunkFormatError("size and stride differ in rank")
    return _PickledTensor(storage, dtype, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: the storage's (typed) class gives the dtype."""
    _no_hooks({} if hooks is None else hooks, metadata)
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise _ChunkFormatError("_rebuild_tensor_v2 of an untyped storage")
    return _tensor(storage, storage.dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v3 (dtypes without a typed storage class: fp8, uint16...)."""
    _no_hooks(hooks, metadata)
    if not isinstance(dtype, _TorchDtype):
        raise _ChunkFormatError("_rebuild_tensor_v3 without a dtype")
    return _tensor(storage, str(dtype), storage_offset, size, stride)


class _TorchDtype(str):
    """`torch.float8_e4m3fn` & co., by name."""


def _ordered_dict() -> dict:
    return {}  # backward hooks: always pickled as an empty OrderedDict()


_TENSOR_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "UntypedStorage"): _StorageType(None),
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    **{("torch", cls): _StorageType(dtype) for cls, dtype in _LEGACY_STORAGES.items()},
    **{("torch", name): _TorchDtype(name) for name in DTYPE_ITEMSIZE},
}


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _TENSOR_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"refusing a tensor pickle that references {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        # torch/serialization.py `_save` persistent_id: ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _ChunkFormatError("unexpected persistent id")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _ChunkFormatError("malformed storage persistent id")
        if not key or "/" in key or key in (".", ".."):
            raise _ChunkFormatError(f"bad storage key {key!r:.40}")
        return _Storage(kind.dtype, key, numel)


def _unpickle_tensor(data: bytes) -> _PickledTensor:
    try:
        result = _TensorUnpickler(io.BytesIO(data)).load()
    except (UnsafeCheckpointError, _ChunkFormatError):
        raise
    except Exception as err:  # truncated / corrupt pickles fail in many ways
        raise _ChunkFormatError(f"corrupt data.pkl ({type(err).__name__}: {err})") from None
    if not isinstance(result, _PickledTensor):
        raise _ChunkFormatError(f"data.pkl holds a {type(result).__name__}, not a tensor")
    return result


# ---------------------------------------------------------------------------------------------------
# The zip container (PKWARE APPNOTE 4.3), as torch's PyTorchStreamWriter (miniz) writes it: local headers
# with bit 3 set (sizes only in the central directory), ZIP_STORED, zip64 records past 4 GiB.

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")


@dataclass(frozen=True)
class _ZipEntry:
    size: int
    crc32: int
    header_offset: int  # relative to the start of the archive


class _Window:
    """Reads inside one chunk's byte range, served from its head and tail when possible."""

    def __init__(self, fd: int, base: int, length: int) -> None:
        self.fd, self.base, self.length = fd, base, length
        n = min(length, _WINDOW)
        self._head = _pread(fd, n, base)
        self._tail_start = length - n
        self._tail = self._head if self._tail_start == 0 else _pread(fd, n, base + self._tail_start)

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.length:
            raise _ChunkFormatError("zip record points outside the chunk's byte range")
        if offset + n <= len(self._head):
            return self._head[offset : offset + n]
        if offset >= self._tail_start:
            return self._tail[offset - self._tail_start : offset - self._tail_start + n]
        return _pread(self.fd, n, self.base + offset)


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise _ChunkFormatError(f"file ends at byte {offset + len(data)}, wanted {offset + n}")
    return data


def _central_directory(window: _Window) -> dict[str, _ZipEntry]:
    tail_len = min(window.length, _WINDOW)
    tail = window.read(window.length - tail_len, tail_len)
    # torch writes no archive comment, so the record is the last 22 bytes; else search back for it.
    at = len(tail) - _EOCD.size if tail[-_EOCD.size :].startswith(b"PK\x05\x06") else tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise _ChunkFormatError("no zip end-of-central-directory record (not a torch.save stream)")
    _, disk, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if 0xFFFF in (count, disk) or 0xFFFFFFFF in (cd_size, cd_offset):  # zip64
        locator_at = window.length - tail_len + at - _ZIP64_LOCATOR.size
        sig, _, eocd64_offset, _ = _ZIP64_LOCATOR.unpack(window.read(locator_at, _ZIP64_LOCATOR.size))
        if sig != b"PK\x06\x07":
            raise _ChunkFormatError("zip64 locator missing")
        fields = _ZIP64_EOCD.unpack(window.read(eocd64_offset, _ZIP64_EOCD.size))
        if fields[0] != b"PK\x06\x06":
            raise _ChunkFormatError("zip64 end-of-central-directory missing")
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_size > _MAX_CENTRAL_DIRECTORY:
        raise _ChunkFormatError(f"central directory of {cd_size} bytes")
    cd = window.read(cd_offset, cd_size)
    entries: dict[str, _ZipEntry] = {}
    pos = 0
    for _ in range(count):
        f = _CENTRAL.unpack_from(cd, pos)
        if f[0] != b"PK\x01\x02":
            raise _ChunkFormatError("bad central directory entry")
        method, crc, comp_size, size, name_len, extra_len, comment_len, header_offset = (
            f[4], f[7], f[8], f[9], f[10], f[11], f[12], f[16],
        )  # fmt: skip
        start = pos + _CENTRAL.size
        try:
            name = cd[start : start + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise _ChunkFormatError("corrupt central directory (undecodable record name)") from None
        extra = cd[start + name_len : start + name_len + extra_len]
        size, comp_size, header_offset = _zip64_extra(extra, size, comp_size, header_offset)
        if method != 0 or comp_size != size:
            raise _ChunkFormatError(f"record {name} is compressed (method {method}); torch.save never does that")
        entries[name] = _ZipEntry(size, crc, header_offset)
        pos = start + name_len + extra_len + comment_len
    return entries


def _zip64_extra(extra: bytes, size: int, comp_size: int, header_offset: int) -> tuple[int, int, int]:
    """Sizes/offsets saturated at 0xFFFFFFFF live in the zip64 extra field (id 1), in this order."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            if size == 0xFFFFFFFF:
                size = next(values)
            if comp_size == 0xFFFFFFFF:
                comp_size = next(values)
            if header_offset == 0xFFFFFFFF:
                header_offset = next(values)
            break
        pos += 4 + length
    return size, comp_size, header_offset


def _record_start(window: _Window, name: str, entry: _ZipEntry) -> int:
    """Offset (in the archive) of the first byte of a record's data, from its local header."""
    f = _LOCAL.unpack(window.read(entry.header_offset, _LOCAL.size))
    if f[0] != b"PK\x03\x04":
        raise _ChunkFormatError(f"bad local header for {name}")
    name_len, extra_len = f[9], f[10]
    if window.read(entry.header_offset + _LOCAL.size, name_len) != name.encode("utf-8"):
        raise _ChunkFormatError(f"local header of {name} names another record")
    start = entry.header_offset + _LOCAL.size + name_len + extra_len
    if start + entry.size > window.length:
        raise _ChunkFormatError(f"record {name} runs past the chunk's byte range")
    return start


# ---------------------------------------------------------------------------------------------------
# Locating one stored chunk


@dataclass(frozen=True)
class _StoredChunk:
    file_offset: int  # absolute offset in the file of storage element 0
    storage_bytes: int
    dtype: str
    storage_offset: int  # elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    crc32: int | None = None  # of the whole storage record, when the writer computed one


def _locate_torch_save(fd: int, base: int, length: int) -> _StoredChunk:
    window = _Window(fd, base, length)
    entries = _central_directory(window)
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise _ChunkFormatError("no single <archive>/data.pkl record")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = entries.get(prefix + "byteorder")
    if byteorder is not None:  # absent only in archives older than torch 2.1, which were little-endian
        order = window.read(_record_start(window, prefix + "byteorder", byteorder), min(byteorder.size, 16))
        if order.decode("ascii", "replace") != sys.byteorder:
            raise _ChunkFormatError(f"saved {order!r} byte order on a {sys.byteorder}-endian machine")
    elif sys.byteorder != "little":
        raise _ChunkFormatError("no byteorder record on a big-endian machine")
    pkl = entries[pickles[0]]
    if pkl.size > _MAX_PICKLE_BYTES:
        raise _ChunkFormatError(f"data.pkl of {pkl.size} bytes")
    tensor = _unpickle_tensor(window.read(_record_start(window, pickles[0], pkl), pkl.size))
    name = f"{prefix}data/{tensor.storage.key}"
    record = entries.get(name)
    if record is None:
        raise _ChunkFormatError(f"no record {name}")
    itemsize = DTYPE_ITEMSIZE.get(tensor.dtype)
    if itemsize is None:
        raise _ChunkFormatError(f"unknown dtype {tensor.dtype}")
    # typed storages count elements, UntypedStorage counts bytes (torch/serialization.py persistent_id)
    expected = tensor.storage.numel * (1 if tensor.storage.dtype is None else itemsize)
    if record.size != expected:
        raise _ChunkFormatError(f"{name} holds {record.size} bytes, its storage needs {expected}")
    start = _record_start(window, name, record)
    # torch.set_crc32_options(False) makes torch.save leave the CRC at 0: nothing to check then.
    crc = record.crc32 or None
    return _StoredChunk(base + start, record.size, tensor.dtype, tensor.storage_offset, tensor.size, tensor.stride, crc)


def _row_major(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


class _SafetensorsHeaders:
    """SerializationFormat.SAFETENSORS: each file's tensors are one safetensors blob at the recorded offset
    (filesystem.py `_write_files_from_queue` writes `safetensors.torch.save(tensor_dict)` after the bytes
    entries). Headers are cached per (file, offset): every tensor of that file points at the same blob."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[int, dict]] = {}

    def locate(self, fd: int, relative: str, base: int, fqn: str, offsets: tuple[int, ...]) -> _StoredChunk:
        key = (relative, base)
        if key not in self._cache:
            (n,) = struct.unpack("<Q", _pread(fd, 8, base))
            if n > _MAX_SAFETENSORS_HEADER:
                raise _ChunkFormatError(f"safetensors header of {n} bytes")
            header = json.loads(_pread(fd, n, base + 8))
            if not isinstance(header, dict):
                raise _ChunkFormatError("safetensors header is not a JSON object")
            self._cache[key] = (base + 8 + n, header)
        data_start, header = self._cache[key]
        entry = header.get(fqn)
        if not isinstance(entry, dict):
            raise _ChunkFormatError(f"the safetensors blob has no {fqn}")
        saved = _saved_offsets(header.get("__metadata__"), fqn)
        if saved is not None and saved != offsets:
            raise _ChunkFormatError(f"the blob holds the chunk at {saved}, not {offsets}")
        dtype = SAFETENSORS_TO_TORCH.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, span = entry.get("shape"), entry.get("data_offsets")
        if dtype is None or not isinstance(shape, list) or not isinstance(span, list) or len(span) != 2:
            raise _ChunkFormatError(f"malformed safetensors entry for {fqn}")
        begin, end = span
        if type(begin) is not int or type(end) is not int:
            raise _ChunkFormatError(f"malformed safetensors entry for {fqn}")
        size = _ints(tuple(shape), "shape")
        if not 0 <= begin <= end:
            raise _ChunkFormatError(f"bad data_offsets for {fqn}")
        return _StoredChunk(data_start + begin, end - begin, dtype, 0, size, _row_major(size))


def _saved_offsets(metadata: Any, fqn: str) -> tuple[int, ...] | None:
    """The chunk offsets the writer recorded for fqn in the blob's __metadata__, if it did."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("DCP_SHARDING_INFO"), str):
        return None
    info = json.loads(metadata["DCP_SHARDING_INFO"])
    entry = info.get(fqn) if isinstance(info, dict) else None
    saved = entry.get("saved_offsets") if isinstance(entry, dict) else None
    return _ints(tuple(saved), "saved_offsets") if isinstance(saved, list) else None


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
    return all(n == 1 or s == r for n, s, r in zip(size, stride, _row_major(size)))


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
        raise _ChunkFormatError(f"CRC-32 of the tensor data is {got:08x}, the zip says {expected:08x}: corrupt data")


def _read_into(fd: int, offset: int, dest: memoryview) -> None:
    done = 0
    while done < len(dest):
        got = os.preadv(fd, [dest[done : done + _MAX_SYSCALL]], offset + done)
        if got <= 0:
            raise _ChunkFormatError(f"file ends at byte {offset + done}")
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
        self._safetensors = _SafetensorsHeaders()

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
            except _ChunkFormatError as err:
                raise MergeError(f"{self.directory / ref.relative_path}: {fqn}: {_one_line(err)}") from None
            except OSError as err:
                raise MergeError(f"{self.directory / ref.relative_path}: {fqn}: {err.strerror or err}") from None

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

    def _locate(self, info: TensorInfo, chunk) -> tuple[StorageRef, _StoredChunk]:
        ref = self._refs[(info.fqn, chunk.offsets)]
        where = f"{self.directory / ref.relative_path}: {info.fqn}"
        try:
            fd = self._fd(ref.relative_path)
            if os.pread(fd, 4, ref.offset) == b"PK\x03\x04":
                stored = _locate_torch_save(fd, ref.offset, ref.length)
            elif ref.length == math.prod(chunk.sizes) * DTYPE_ITEMSIZE[info.dtype]:
                # SAFETENSORS format: _write_item records length = nbytes (a torch.save stream is always
                # longer than its data), and the offset of the file's safetensors blob.
                stored = self._safetensors.locate(fd, ref.relative_path, ref.offset, info.fqn, chunk.offsets)
            else:
                raise _ChunkFormatError("not a torch.save zip stream")
        except UnsafeCheckpointError as err:
            raise MergeError(f"{where}: {_one_line(err)}") from None
        except (_ChunkFormatError, ValueError, struct.error) as err:  # ValueError: also JSON, UTF-8
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

    def _copy(self, full, dest, info, offsets, sizes, stored: _StoredChunk, itemsize: int, relative: str) -> None:
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
