"""Read a torch.distributed.checkpoint (DCP) `.metadata` file safely, without importing torch.

DCP's coordinator writes `.metadata` last (to `.metadata.tmp`, then an atomic rename), as a plain
pickle of `torch.distributed.checkpoint.metadata.Metadata`. torch's own reader calls `pickle.load` on
it, so a malicious checkpoint could run arbitrary code. Here a restricted unpickler admits only the
globals a genuine `.metadata` references and maps each one onto a tiny stand-in of our own, so:

* nothing outside the allow-list is ever imported or called: any other global raises
  `UnsafeCheckpointError` naming it;
* torch is never imported (the watcher daemon must stay light).

Globals a real `.metadata` written by torch 2.13 references (found with `pickletools` on real saves):

    torch.distributed.checkpoint.metadata: Metadata, TensorStorageMetadata, BytesStorageMetadata,
        ChunkStorageMetadata, TensorProperties, MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING
    torch.distributed.checkpoint.filesystem: _StorageInfo
    torch: Size, and one global per dtype (torch.float32, torch.bfloat16, ...)
    torch.serialization: _get_layout    (torch.layout pickles as `_get_layout("torch.strided")`)
    pathlib: PosixPath                  (StorageMeta.checkpoint_id when it was given as a Path)

The same classes and field names exist since torch 2.4 (`StorageMeta` and `version` are newer than
some 2.x releases and `_StorageInfo.transform_descriptors` appeared later still; all are optional here).

The result is converted into plain dataclasses (`DcpMetadata`) that carry everything a streaming merger
needs: every tensor's dtype, global shape and chunk layout, and for every chunk (and every non-tensor
"bytes" entry) the file and byte range that holds it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

METADATA_FILE = ".metadata"

__all__ = [
    "METADATA_FILE",
    "DTYPE_ITEMSIZE",
    "UnsafeCheckpointError",
    "DcpMetadataError",
    "ChunkInfo",
    "TensorInfo",
    "StorageRef",
    "DcpMetadata",
    "read_dcp_metadata",
    "required_file_sizes",
]


class UnsafeCheckpointError(ValueError):
    """The `.metadata` pickle references something a genuine DCP checkpoint never does."""


class DcpMetadataError(ValueError):
    """The `.metadata` file is truncated, corrupt or not DCP metadata at all."""


@dataclass
class ChunkInfo:
    offsets: tuple[int, ...]  # where this chunk starts in the full tensor, per dimension
    sizes: tuple[int, ...]


@dataclass
class TensorInfo:
    fqn: str
    dtype: str  # torch's name without the "torch." prefix: "float32", "bfloat16", ...
    shape: tuple[int, ...]  # the full (unsharded) shape
    chunks: list[ChunkInfo]


@dataclass
class StorageRef:
    fqn: str
    offset_in_tensor: tuple[int, ...] | None  # the chunk's offsets; None for a bytes entry
    relative_path: str  # file inside the checkpoint directory, e.g. "__0_0.distcp"
    offset: int  # byte range [offset, offset + length) inside that file
    length: int
    # Stream transforms (e.g. compression) applied to this byte range; () means raw torch.save bytes.
    transform_descriptors: tuple[str, ...] = ()


@dataclass
class DcpMetadata:
    tensors: dict[str, TensorInfo]
    bytes_entries: list[str]  # fqns of non-tensor entries (pickled objects saved as raw bytes)
    storage: list[StorageRef]  # sorted by (relative_path, offset): the order a sequential reader wants
    # How each flattened fqn maps back to the nested state-dict keys, e.g.
    # "model.lm_head.weight" -> ("model", "lm_head.weight"); from the default planner's planner_data.
    planner_data: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    version: str | None = None


# dtype name -> bytes per element, for every dtype torch 2.13 can pickle; also the dtype allow-list.
DTYPE_ITEMSIZE: dict[str, int] = {
    "bfloat16": 2, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bool": 1,
    "complex128": 16, "complex32": 4, "complex64": 8, "float16": 2, "float32": 4,
    "float4_e2m1fn_x2": 1, "float64": 8, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1,
    "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "int1": 1, "int16": 2, "int2": 1, "int3": 1, "int32": 4,
    "int4": 1, "int5": 1, "int6": 1, "int64": 8, "int7": 1, "int8": 1, "qint32": 4, "qint8": 1,
    "quint2x4": 1, "quint4x2": 1, "quint8": 1, "uint1": 1, "uint16": 2, "uint2": 1, "uint3": 1,
    "uint32": 4, "uint4": 1, "uint5": 1, "uint6": 1, "uint64": 8, "uint7": 1, "uint8": 1,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Stand-ins. Pickle rebuilds the DCP dataclasses with NEWOBJ (no arguments) followed by BUILD with the
# instance dict, so an empty class that accepts a dict state is all that is needed. None defines
# __eq__, so all stay hashable (MetadataIndex instances are dict keys in storage_data).


class _Record:
    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) and not k.startswith("__") for k in state):
            raise DcpMetadataError(f"{type(self).__name__}: unexpected pickled state {type(state).__name__}")
        self.__dict__.update(state)


class _Metadata(_Record): ...


class _TensorStorageMetadata(_Record): ...


class _BytesStorageMetadata(_Record): ...


class _ChunkStorageMetadata(_Record): ...


class _MetadataIndex(_Record): ...


class _StorageMeta(_Record): ...


class _StorageInfo(_Record): ...


class _TensorProperties(_Record):
    def __setstate__(self, state: Any) -> None:
        # torch's TensorProperties.__getstate__ returns a 5-tuple, because torch.memory_format
        # cannot be pickled; the dict form is accepted in case an older/newer release drops that.
        if isinstance(state, tuple) and len(state) == 5:
            self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state
        else:
            super().__setstate__(state)


class _Dtype(str):
    """A torch dtype, by name. A str subclass so it cannot be confused with a plain string entry."""


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


def _get_layout(name: Any) -> str:
    if not isinstance(name, str):
        raise DcpMetadataError("torch.serialization._get_layout: expected a layout name")
    return name.removeprefix("torch.")


def _mem_format_encoding(value: Any) -> int:
    if type(value) is not int:
        raise DcpMetadataError("_MEM_FORMAT_ENCODING: expected an int")
    return value


def _posix_path(*parts: Any) -> str:
    return str(PurePosixPath(*parts))  # a *pure* path: no filesystem access


def _windows_path(*parts: Any) -> str:
    return str(PureWindowsPath(*parts))


_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_DCP, "Metadata"): _Metadata,
    (_DCP, "TensorStorageMetadata"): _TensorStorageMetadata,
    (_DCP, "BytesStorageMetadata"): _BytesStorageMetadata,
    (_DCP, "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (_DCP, "TensorProperties"): _TensorProperties,
    (_DCP, "MetadataIndex"): _MetadataIndex,
    (_DCP, "StorageMeta"): _StorageMeta,
    (_DCP, "_MEM_FORMAT_ENCODING"): _mem_format_encoding,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): _torch_size,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("pathlib", "PosixPath"): _posix_path,
    ("pathlib", "PurePosixPath"): _posix_path,
    ("pathlib", "WindowsPath"): _windows_path,
    ("pathlib", "PureWindowsPath"): _windows_path,
    **{("torch", name): _Dtype(name) for name in DTYPE_ITEMSIZE},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load .metadata: it references {module}.{name}, "
                "which a DCP checkpoint never needs"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing to load .metadata: it uses pickle persistent ids")


def _load(stream: BinaryIO) -> Any:
    try:
        return _RestrictedUnpickler(stream).load()
    except (UnsafeCheckpointError, OSError):
        raise
    except Exception as err:  # a truncated or corrupt pickle fails in many different ways
        raise DcpMetadataError(f"cannot unpickle .metadata ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------------
# Conversion of the stand-ins into the public dataclasses, validating every field on the way: the
# merger will turn these numbers into file reads, so they must be what they claim to be.


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise DcpMetadataError(f"{what}: expected a sequence of non-negative ints, got {value!r:.80}")
    return tuple(value)


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise DcpMetadataError(f"{what}: expected a non-negative int, got {value!r:.80}")
    return value


def _tensor_info(fqn: str, entry: _TensorStorageMetadata) -> TensorInfo:
    props = getattr(entry, "properties", None)
    dtype = getattr(props, "dtype", None)
    if not isinstance(dtype, _Dtype):
        raise DcpMetadataError(f"{fqn}: tensor entry without a dtype")
    shape = _ints(getattr(entry, "size", None), f"{fqn}: size")
    chunks = getattr(entry, "chunks", None)
    if not isinstance(chunks, list) or not all(isinstance(c, _ChunkStorageMetadata) for c in chunks):
        raise DcpMetadataError(f"{fqn}: malformed chunk list")
    infos = []
    for chunk in chunks:
        offsets = _ints(getattr(chunk, "offsets", None), f"{fqn}: chunk offsets")
        sizes = _ints(getattr(chunk, "sizes", None), f"{fqn}: chunk sizes")
        if not len(offsets) == len(sizes) == len(shape):
            raise DcpMetadataError(f"{fqn}: chunk rank differs from the tensor's")
        infos.append(ChunkInfo(offsets, sizes))
    return TensorInfo(fqn=fqn, dtype=str(dtype), shape=shape, chunks=infos)


def _storage_ref(index: Any, info: Any) -> StorageRef:
    if not isinstance(index, _MetadataIndex) or not isinstance(info, _StorageInfo):
        raise DcpMetadataError("storage_data: expected MetadataIndex -> _StorageInfo entries")
    fqn = getattr(index, "fqn", None)
    if not isinstance(fqn, str):
        raise DcpMetadataError("storage_data: MetadataIndex without an fqn")
    offset = getattr(index, "offset", None)
    path = getattr(info, "relative_path", None)
    if not isinstance(path, str) or not path:
        raise DcpMetadataError(f"{fqn}: storage entry without a relative_path")
    # The merger will open <checkpoint dir>/<relative_path>; DCP only ever writes flat file names.
    if PurePosixPath(path).name != path or "\\" in path or path in (".", ".."):
        raise UnsafeCheckpointError(f"refusing to load .metadata: {fqn} points outside the checkpoint ({path!r})")
    transforms = getattr(info, "transform_descriptors", None) or ()
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise DcpMetadataError(f"{fqn}: malformed transform_descriptors")
    return StorageRef(
        fqn=fqn,
        offset_in_tensor=None if offset is None else _ints(offset, f"{fqn}: offset"),
        relative_path=path,
        offset=_int(getattr(info, "offset", None), f"{fqn}: byte offset"),
        length=_int(getattr(info, "length", None), f"{fqn}: byte length"),
        transform_descriptors=tuple(transforms),
    )


def _planner_data(raw: Any) -> dict[str, tuple[str | int, ...]]:
    # Only the default planner's shape is understood; anything else is simply not reported.
    if not isinstance(raw, dict):
        return {}
    return {
        k: tuple(v)
        for k, v in raw.items()
        if isinstance(k, str) and isinstance(v, (tuple, list)) and all(isinstance(p, (str, int)) for p in v)
    }


def _convert(raw: Any) -> DcpMetadata:
    if not isinstance(raw, _Metadata):
        raise DcpMetadataError(f"not DCP metadata (top-level object is {type(raw).__name__})")
    entries = getattr(raw, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise DcpMetadataError("state_dict_metadata missing")
    tensors: dict[str, TensorInfo] = {}
    bytes_entries: list[str] = []
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise DcpMetadataError(f"state_dict_metadata key {fqn!r:.80} is not a string")
        if isinstance(entry, _TensorStorageMetadata):
            tensors[fqn] = _tensor_info(fqn, entry)
        elif isinstance(entry, _BytesStorageMetadata):
            bytes_entries.append(fqn)
        else:
            raise DcpMetadataError(f"{fqn}: unknown storage metadata type {type(entry).__name__}")
    storage_data = getattr(raw, "storage_data", None)
    if not isinstance(storage_data, dict):
        raise DcpMetadataError("storage_data missing (not written by FileSystemWriter?)")
    storage = sorted(
        (_storage_ref(index, info) for index, info in storage_data.items()),
        key=lambda ref: (ref.relative_path, ref.offset),
    )
    version = getattr(raw, "version", None)
    return DcpMetadata(
        tensors=tensors,
        bytes_entries=bytes_entries,
        storage=storage,
        planner_data=_planner_data(getattr(raw, "planner_data", None)),
        version=version if isinstance(version, str) else None,
    )


def read_dcp_metadata(path: Path) -> DcpMetadata:
    """Parse a DCP `.metadata` file (or the directory holding one) without executing anything.

    Raises FileNotFoundError (or another OSError) if it cannot be read, UnsafeCheckpointError if the
    pickle references anything outside the allow-list, DcpMetadataError if it is truncated or malformed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    with open(path, "rb") as stream:
        return _convert(_load(stream))


def required_file_sizes(meta: DcpMetadata) -> dict[str, int]:
    """relative_path -> the minimum size in bytes that file must have to hold every range it is said to."""
    sizes: dict[str, int] = {}
    for ref in meta.storage:
        sizes[ref.relative_path] = max(sizes.get(ref.relative_path, 0), ref.offset + ref.length)
    return sizes
