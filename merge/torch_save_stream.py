"""Where one DCP chunk's bytes lie in its file, and how they are laid out, read without torch.

torch/distributed/checkpoint/filesystem.py `_write_item` writes every tensor chunk as one complete
`torch.save` stream at the [offset, offset + length) of a `.distcp` file that `.metadata` records
(`SerializationFormat.TORCH_SAVE`, the default). `locate_torch_save` parses that one stream and returns a
`StoredChunk`: where the raw storage bytes start in the file, how many there are, and the dtype, storage
offset, size and stride that turn them into the chunk.

A torch.save stream is a zip archive (PKWARE APPNOTE 4.3, as torch's PyTorchStreamWriter / miniz writes
it): all records ZIP_STORED (uncompressed) and 64-byte aligned, `<archive>/data.pkl` (a ~160-byte pickle
describing the tensor), `<archive>/data/<key>` (the raw storage bytes), `<archive>/byteorder`, ... We read
the end-of-central-directory and the central directory from the end of the byte range (zip64 included),
then the tiny `data.pkl`, and stop there: the storage record's bytes are left for the caller to read
straight into its own buffer.

Why by hand, and not `torch.load`: torch.load would import torch (the DCP merge path stays torch-free),
run the pickle through torch's unpickler (arbitrary code unless `weights_only`), and materialise the whole
chunk in memory before anything could be copied out of it. Here the pickle goes through a restricted
unpickler that maps every allowed global onto an inert stand-in (`_rebuild_tensor_v2/_v3`, storage classes,
dtypes) and refuses any other, so nothing of the pickle's choosing ever runs, and only a few KiB of each
chunk's range are read.

`SafetensorsHeaders` answers the same question for `SerializationFormat.SAFETENSORS` (the same writer, used
by torch's Hugging Face storage writer): the tensors of a file are one safetensors blob starting at the
recorded offset, and its JSON header gives each fqn's byte range.

Every malformed input raises `ChunkFormatError` (or `UnsafeCheckpointError` for a refused global, or
ValueError / struct.error / OSError from the parsers and reads); the caller adds file and tensor names.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from typing import Any

from merge.dcp_metadata import DTYPE_ITEMSIZE, UnsafeCheckpointError
from merge.source import SAFETENSORS_TO_TORCH

__all__ = ["ChunkFormatError", "SafetensorsHeaders", "StoredChunk", "locate_torch_save", "row_major"]

_MAX_PICKLE_BYTES = 1 << 20  # a tensor's data.pkl is ~160 bytes; anything huge is not one
_MAX_CENTRAL_DIRECTORY = 1 << 20  # torch.save writes 7 records
_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit the safetensors library itself enforces
_WINDOW = 4096  # head and tail of each chunk's range, read once: usually all the zip metadata there is


# ---------------------------------------------------------------------------------------------------
# The tensor pickle inside a torch.save archive, unpickled onto stand-ins


class ChunkFormatError(ValueError):
    """A chunk's bytes are not what DCP writes; the caller adds file and tensor to the message."""


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
        raise ChunkFormatError(f"{what} is not a tuple of non-negative ints")
    return value


def _no_hooks(hooks: Any, metadata: Any) -> None:
    # DCP saves detached tensors: no backward hooks, no conj/neg bits (torch/_utils.py get_tensor_metadata)
    if not isinstance(hooks, dict) or hooks:
        raise ChunkFormatError("tensor pickle carries backward hooks")
    if metadata is not None and (not isinstance(metadata, dict) or metadata):
        raise ChunkFormatError("tensor pickle carries tensor metadata (conj/neg bits), not supported")


def _tensor(storage: Any, dtype: Any, storage_offset: Any, size: Any, stride: Any) -> _PickledTensor:
    if not isinstance(storage, _Storage):
        raise ChunkFormatError("tensor pickle without a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise ChunkFormatError("bad storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise ChunkFormatError("size and stride differ in rank")
    return _PickledTensor(storage, dtype, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: the storage's (typed) class gives the dtype."""
    _no_hooks({} if hooks is None else hooks, metadata)
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise ChunkFormatError("_rebuild_tensor_v2 of an untyped storage")
    return _tensor(storage, storage.dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v3 (dtypes without a typed storage class: fp8, uint16...)."""
    _no_hooks(hooks, metadata)
    if not isinstance(dtype, _TorchDtype):
        raise ChunkFormatError("_rebuild_tensor_v3 without a dtype")
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
            raise ChunkFormatError("unexpected persistent id")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ChunkFormatError("malformed storage persistent id")
        if not key or "/" in key or key in (".", ".."):
            raise ChunkFormatError(f"bad storage key {key!r:.40}")
        return _Storage(kind.dtype, key, numel)


def _unpickle_tensor(data: bytes) -> _PickledTensor:
    try:
        result = _TensorUnpickler(io.BytesIO(data)).load()
    except (UnsafeCheckpointError, ChunkFormatError):
        raise
    except Exception as err:  # truncated / corrupt pickles fail in many ways
        raise ChunkFormatError(f"corrupt data.pkl ({type(err).__name__}: {err})") from None
    if not isinstance(result, _PickledTensor):
        raise ChunkFormatError(f"data.pkl holds a {type(result).__name__}, not a tensor")
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
            raise ChunkFormatError("zip record points outside the chunk's byte range")
        if offset + n <= len(self._head):
            return self._head[offset : offset + n]
        if offset >= self._tail_start:
            return self._tail[offset - self._tail_start : offset - self._tail_start + n]
        return _pread(self.fd, n, self.base + offset)


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ChunkFormatError(f"file ends at byte {offset + len(data)}, wanted {offset + n}")
    return data


def _central_directory(window: _Window) -> dict[str, _ZipEntry]:
    tail_len = min(window.length, _WINDOW)
    tail = window.read(window.length - tail_len, tail_len)
    # torch writes no archive comment, so the record is the last 22 bytes; else search back for it.
    at = len(tail) - _EOCD.size if tail[-_EOCD.size :].startswith(b"PK\x05\x06") else tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise ChunkFormatError("no zip end-of-central-directory record (not a torch.save stream)")
    _, disk, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if 0xFFFF in (count, disk) or 0xFFFFFFFF in (cd_size, cd_offset):  # zip64
        locator_at = window.length - tail_len + at - _ZIP64_LOCATOR.size
        sig, _, eocd64_offset, _ = _ZIP64_LOCATOR.unpack(window.read(locator_at, _ZIP64_LOCATOR.size))
        if sig != b"PK\x06\x07":
            raise ChunkFormatError("zip64 locator missing")
        fields = _ZIP64_EOCD.unpack(window.read(eocd64_offset, _ZIP64_EOCD.size))
        if fields[0] != b"PK\x06\x06":
            raise ChunkFormatError("zip64 end-of-central-directory missing")
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_size > _MAX_CENTRAL_DIRECTORY:
        raise ChunkFormatError(f"central directory of {cd_size} bytes")
    cd = window.read(cd_offset, cd_size)
    entries: dict[str, _ZipEntry] = {}
    pos = 0
    for _ in range(count):
        f = _CENTRAL.unpack_from(cd, pos)
        if f[0] != b"PK\x01\x02":
            raise ChunkFormatError("bad central directory entry")
        method, crc, comp_size, size, name_len, extra_len, comment_len, header_offset = (
            f[4], f[7], f[8], f[9], f[10], f[11], f[12], f[16],
        )  # fmt: skip
        start = pos + _CENTRAL.size
        try:
            name = cd[start : start + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise ChunkFormatError("corrupt central directory (undecodable record name)") from None
        extra = cd[start + name_len : start + name_len + extra_len]
        size, comp_size, header_offset = _zip64_extra(extra, size, comp_size, header_offset)
        if method != 0 or comp_size != size:
            raise ChunkFormatError(f"record {name} is compressed (method {method}); torch.save never does that")
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
        raise ChunkFormatError(f"bad local header for {name}")
    name_len, extra_len = f[9], f[10]
    if window.read(entry.header_offset + _LOCAL.size, name_len) != name.encode("utf-8"):
        raise ChunkFormatError(f"local header of {name} names another record")
    start = entry.header_offset + _LOCAL.size + name_len + extra_len
    if start + entry.size > window.length:
        raise ChunkFormatError(f"record {name} runs past the chunk's byte range")
    return start


# ---------------------------------------------------------------------------------------------------
# Locating one stored chunk


@dataclass(frozen=True)
class StoredChunk:
    file_offset: int  # absolute offset in the file of storage element 0
    storage_bytes: int
    dtype: str
    storage_offset: int  # elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    crc32: int | None = None  # of the whole storage record, when the writer computed one


def locate_torch_save(fd: int, base: int, length: int) -> StoredChunk:
    window = _Window(fd, base, length)
    entries = _central_directory(window)
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise ChunkFormatError("no single <archive>/data.pkl record")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = entries.get(prefix + "byteorder")
    if byteorder is not None:  # absent only in archives older than torch 2.1, which were little-endian
        order = window.read(_record_start(window, prefix + "byteorder", byteorder), min(byteorder.size, 16))
        if order.decode("ascii", "replace") != sys.byteorder:
            raise ChunkFormatError(f"saved {order!r} byte order on a {sys.byteorder}-endian machine")
    elif sys.byteorder != "little":
        raise ChunkFormatError("no byteorder record on a big-endian machine")
    pkl = entries[pickles[0]]
    if pkl.size > _MAX_PICKLE_BYTES:
        raise ChunkFormatError(f"data.pkl of {pkl.size} bytes")
    tensor = _unpickle_tensor(window.read(_record_start(window, pickles[0], pkl), pkl.size))
    name = f"{prefix}data/{tensor.storage.key}"
    record = entries.get(name)
    if record is None:
        raise ChunkFormatError(f"no record {name}")
    itemsize = DTYPE_ITEMSIZE.get(tensor.dtype)
    if itemsize is None:
        raise ChunkFormatError(f"unknown dtype {tensor.dtype}")
    # typed storages count elements, UntypedStorage counts bytes (torch/serialization.py persistent_id)
    expected = tensor.storage.numel * (1 if tensor.storage.dtype is None else itemsize)
    if record.size != expected:
        raise ChunkFormatError(f"{name} holds {record.size} bytes, its storage needs {expected}")
    start = _record_start(window, name, record)
    # torch.set_crc32_options(False) makes torch.save leave the CRC at 0: nothing to check then.
    crc = record.crc32 or None
    return StoredChunk(base + start, record.size, tensor.dtype, tensor.storage_offset, tensor.size, tensor.stride, crc)


def row_major(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


class SafetensorsHeaders:
    """SerializationFormat.SAFETENSORS: each file's tensors are one safetensors blob at the recorded offset
    (filesystem.py `_write_files_from_queue` writes `safetensors.torch.save(tensor_dict)` after the bytes
    entries). Headers are cached per (file, offset): every tensor of that file points at the same blob."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[int, dict]] = {}

    def locate(self, fd: int, relative: str, base: int, fqn: str, offsets: tuple[int, ...]) -> StoredChunk:
        key = (relative, base)
        if key not in self._cache:
            (n,) = struct.unpack("<Q", _pread(fd, 8, base))
            if n > _MAX_SAFETENSORS_HEADER:
                raise ChunkFormatError(f"safetensors header of {n} bytes")
            header = json.loads(_pread(fd, n, base + 8))
            if not isinstance(header, dict):
                raise ChunkFormatError("safetensors header is not a JSON object")
            self._cache[key] = (base + 8 + n, header)
        data_start, header = self._cache[key]
        entry = header.get(fqn)
        if not isinstance(entry, dict):
            raise ChunkFormatError(f"the safetensors blob has no {fqn}")
        saved = _saved_offsets(header.get("__metadata__"), fqn)
        if saved is not None and saved != offsets:
            raise ChunkFormatError(f"the blob holds the chunk at {saved}, not {offsets}")
        dtype = SAFETENSORS_TO_TORCH.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, span = entry.get("shape"), entry.get("data_offsets")
        if dtype is None or not isinstance(shape, list) or not isinstance(span, list) or len(span) != 2:
            raise ChunkFormatError(f"malformed safetensors entry for {fqn}")
        begin, end = span
        if type(begin) is not int or type(end) is not int:
            raise ChunkFormatError(f"malformed safetensors entry for {fqn}")
        size = _ints(tuple(shape), "shape")
        if not 0 <= begin <= end:
            raise ChunkFormatError(f"bad data_offsets for {fqn}")
        return StoredChunk(data_start + begin, end - begin, dtype, 0, size, row_major(size))


def _saved_offsets(metadata: Any, fqn: str) -> tuple[int, ...] | None:
    """The chunk offsets the writer recorded for fqn in the blob's __metadata__, if it did."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("DCP_SHARDING_INFO"), str):
        return None
    info = json.loads(metadata["DCP_SHARDING_INFO"])
    entry = info.get(fqn) if isinstance(info, dict) else None
    saved = entry.get("saved_offsets") if isinstance(entry, dict) else None
    return _ints(tuple(saved), "saved_offsets") if isinstance(saved, list) else None
