"""Per-rank DTensor state dicts (veRL / LMMs-Engine style) as a `WeightSource`.

Each rank of an FSDP2 (or any DTensor) job `torch.save`s its own `model.state_dict()` to
`model_world_size_W_rank_R.pt`. Every value is a DTensor: the rank's local shard plus the global shape, the
DeviceMesh and one placement per mesh dimension. This source opens every rank file once with
`torch.load(mmap=True, weights_only=True)`, works out from that metadata which box of the full tensor each
rank holds (merge/placements.py), and `read()` copies the boxes of one tensor into the caller's buffer.
Tensor bytes stay in the mapped files until read, and are dropped from this process again right after
(merge/mapped_pages.py), so memory does not grow with the number of tensors or ranks.

Supported placements, over meshes of any number of dimensions: `Shard(d)` (torch.chunk semantics: ceil-sized
pieces first, trailing ranks may hold fewer rows or none), `Replicate()`, and several mesh dims sharding the
same tensor dim in torch's default left-to-right order. `Partial` (a pending sum), `_StridedShard` (FSDP over
a TP-sharded dim: a rank's rows are not one contiguous block) and any non-default `shard_order` are a
`MergeError`: copying boxes would produce a wrong tensor.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.layouts import RANK_SHARD
from merge.mapped_pages import mapped_ranges, releasable, release
from merge.placements import Box, check_tiling, local_box
from merge.source import DTYPES, MergeError, TensorSpec, model_key

# A container some trainers wrap the state dict in ({"model": sd}); stripped when it is the only entry.
CONTAINERS = ("model", "state_dict", "module")

__all__ = ["Box", "RankShardSource", "check_tiling", "local_box"]


# ---------------------------------------------------------------------------------------------------
# Loading rank files safely


def _dtensor_globals() -> list[Any]:
    """What `weights_only` must admit to rebuild a DTensor state dict (found on real torch 2.13 saves).

    A DTensor pickles (torch/_tensor.py `_reduce_ex_internal`, `_rebuild_wrapper_subclass` +
    `_rebuild_from_type_v2`) with its `_spec` slot: a DTensorSpec dataclass holding the DeviceMesh, the
    placements, a TensorMeta and a tuple of ShardOrderEntry. torch 2.13's DeviceMesh keeps its layout as a
    `_MeshLayout` of `_FlatLayout` axes (torch/distributed/_mesh_layout.py) plus a `_rank_map` tensor; the
    optional imports below let older releases, which lack some of these classes, still work.
    Partial and _StridedShard are admitted only so that such files fail with a clear MergeError, not an
    "unsupported global".
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    allowed: list[Any] = [DTensor, DTensorSpec, TensorMeta, DeviceMesh, Shard, Replicate, Partial]
    with contextlib.suppress(ImportError):  # newer than torch 2.4
        from torch.distributed.tensor.placement_types import _StridedShard

        allowed.append(_StridedShard)
    with contextlib.suppress(ImportError):
        from torch.distributed.tensor._dtensor_spec import ShardOrderEntry

        allowed.append(ShardOrderEntry)
    with contextlib.suppress(ImportError):
        from torch.distributed._mesh_layout import _FlatLayout, _MeshLayout

        allowed += [_MeshLayout, _FlatLayout]
    return allowed


@contextlib.contextmanager
def _dtensor_unpickling() -> Iterator[None]:
    # torch 2.13 already add_safe_globals() all of these when torch.distributed.tensor / device_mesh are
    # imported. torch.serialization.safe_globals() *removes* its list on exit (a set difference in
    # _weights_only_unpickler._remove_safe_globals), which would undo torch's own registration for the rest
    # of the process; so admit only what is not registered yet.
    registered = set(torch.serialization.get_safe_globals())
    missing = [g for g in _dtensor_globals() if g not in registered]
    # DeviceMesh.__setstate__ looks its process groups up by name and, finding none (we have no process
    # group, and need none), logs a warning about torch.compile per mesh. Irrelevant here: silence it.
    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_log.level
    mesh_log.setLevel(logging.ERROR)
    try:
        with torch.serialization.safe_globals(missing):
            yield
    finally:
        mesh_log.setLevel(level)


def _first_sentence(err: BaseException) -> str:
    text = str(err).strip().split("\n")[0].split(". ")[0].strip() or type(err).__name__
    return text[:200]


# A truncated zip: RuntimeError from PytorchStreamReader; a weights_only refusal: UnpicklingError;
# garbage inside the pickle: EOFError, ValueError, ...; an empty file cannot be mapped: OSError.
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, TypeError, AttributeError)


def _load_rank_file(path: Path) -> Mapping[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as err:
        raise MergeError(f"{path.name}: cannot be read ({err.strerror})") from None
    if size == 0:  # else torch's complaint is about mmap needing the zip format
        raise MergeError(f"{path.name}: empty file")
    try:
        with _dtensor_unpickling():
            obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except _LOAD_ERRORS as err:
        detail = _first_sentence(err)
        # weights_only hides the culprit on a later line: "... Unsupported global: GLOBAL os.system ..."
        unsafe = re.search(r"(Unsupported global: GLOBAL [\w.]+|Trying to [^\n]*)", str(err))
        if unsafe:
            detail = f"refused by weights_only ({unsafe.group(1)})"
        raise MergeError(f"{path.name}: not a loadable torch.save file: {detail}") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise MergeError(f"{path.name}: holds a {type(obj).__name__}, not a state dict")
    if len(obj) == 1:
        ((key, value),) = obj.items()
        if key in CONTAINERS and isinstance(value, Mapping):
            obj = value
    return obj


# ---------------------------------------------------------------------------------------------------
# Meshes and placements of a loaded DTensor


def _mesh_tensor(mesh: Any, rank: int) -> torch.Tensor:
    """The rank ids of `mesh` laid out in its shape, computed without a process group.

    torch 2.13's `DeviceMesh.mesh` property calls `get_rank()` for a mesh sliced out of a bigger one
    (device_mesh.py `_get_mesh_tensor_from_full_mesh`), which needs an initialised process group. The same
    data is its `_layout.remap_to_tensor(_rank_map)`: one copy of the mesh per slice, shape
    (copies, *mesh_shape); the copy this file's rank is in is its mesh. Older releases pickled the tensor
    itself as `mesh`.
    """
    state = vars(mesh)
    if "_layout" in state and "_rank_map" in state:
        copies = state["_layout"].remap_to_tensor(state["_rank_map"])
        for copy in copies:
            if bool((copy == rank).any()):
                return copy
        return copies[0]
    if isinstance(state.get("mesh"), torch.Tensor):
        return state["mesh"]
    raise ValueError("its DeviceMesh carries neither a layout nor a mesh tensor")


def _coordinate(mesh_ranks: torch.Tensor, rank: int) -> tuple[int, ...]:
    where = (mesh_ranks == rank).nonzero()
    if where.size(0) != 1:
        raise ValueError(f"rank {rank} is {'not in' if where.size(0) == 0 else 'repeated in'} its DeviceMesh")
    return tuple(int(i) for i in where[0])


class _Unmergeable(ValueError):
    """A placement that copying boxes cannot reassemble (the caller names the tensor)."""


def _check_placements(spec: Any, placements: Sequence[Any]) -> None:
    """Refuse what box copying cannot merge. Only the default shard order (mesh dims left to right)
    matches `local_box`'s nesting.

    DTensorSpec.shard_order (torch/distributed/tensor/_dtensor_spec.py) lists, per tensor dim, the mesh dims
    that shard it in the order they were applied; anything but ascending means the pieces nest differently.
    """
    from torch.distributed.tensor import Partial

    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Partial):
            raise _Unmergeable(f"placement {placement!r} on mesh dim {mesh_dim} is a pending reduction: "
                             "a partial sum cannot be merged by copying")  # fmt: skip
        if type(placement).__name__ == "_StridedShard":  # by name: older torch has no such class
            raise _Unmergeable(f"placement {placement!r} on mesh dim {mesh_dim} (strided, nested sharding as "
                             "FSDP over tensor parallel writes) is not supported")  # fmt: skip
    for entry in getattr(spec, "shard_order", None) or ():
        if list(entry.mesh_dims) != sorted(entry.mesh_dims):
            raise _Unmergeable(f"tensor dim {entry.tensor_dim} is sharded over mesh dims {tuple(entry.mesh_dims)} "
                             "in a non-default order")  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name} is not supported")
    return name


# ---------------------------------------------------------------------------------------------------
# The source


@dataclass
class _Piece:
    box: Box
    local: torch.Tensor  # a view into the mapped rank file
    releasable: bool  # inside a rank file's mapping: its pages may be dropped after a read


@dataclass
class _Tensor:
    spec: TensorSpec
    pieces: list[_Piece]  # one per distinct box; replicas of a box are read once, from the lowest rank
    plain: list[torch.Tensor] | None = None  # a plain (non-DTensor) tensor: every rank's copy


class RankShardSource:
    """The tensors of one `model_world_size_W_rank_R.pt` set, reassembled one at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._tensors: dict[str, _Tensor] = {}
        files = self._rank_files()
        states = [_load_rank_file(path) for path in files]
        self._files = files
        with torch.no_grad():
            self._build(files, states)
        mapped = mapped_ranges(files)
        for tensor in self._tensors.values():
            for piece in tensor.pieces:
                piece.releasable = releasable(piece.local, mapped)

    # -- discovery -------------------------------------------------------------------------------

    def _rank_files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise MergeError(f"{self.directory}: not a directory")
        found: dict[int, dict[int, Path]] = {}
        for path in self.directory.iterdir():
            match = RANK_SHARD.fullmatch(path.name)
            if match:
                found.setdefault(int(match[1]), {})[int(match[2])] = path
        if not found:
            raise MergeError(f"{self.directory}: no model_world_size_W_rank_R.pt files")
        if len(found) > 1:
            raise MergeError(f"{self.directory}: rank files of several world sizes {sorted(found)}")
        ((world, ranks),) = found.items()
        missing = [r for r in range(world) if r not in ranks]
        if missing:
            raise MergeError(f"{self.directory}: model_world_size_{world}_rank_{missing[0]}.pt is missing "
                             f"({len(missing)} of {world} rank files absent)")  # fmt: skip
        extra = min(set(ranks) - set(range(world)), default=None)
        if extra is not None:
            raise MergeError(f"{ranks[extra].name}: rank {extra} is outside world size {world}")
        return [ranks[r] for r in range(world)]

    # -- validation ------------------------------------------------------------------------------

    def _build(self, files: list[Path], states: list[Mapping[str, Any]]) -> None:
        from torch.distributed.tensor import DTensor

        names: dict[str, str] = {}  # HF name -> key as saved
        for key in states[0]:
            name = model_key(key)
            if name in names:
                raise MergeError(f"{files[0].name}: keys {names[name]} and {key} both map to {name}")
            names[name] = key
        for path, state in zip(files[1:], states[1:]):
            if state.keys() != states[0].keys():
                diff = min(set(states[0]).symmetric_difference(state))
                where = "lacks" if diff in states[0] else "has an extra"
                raise MergeError(f"{path.name}: {where} key {diff} (compared with {files[0].name})")

        meshes = _Meshes()
        for name, key in names.items():
            values = [state[key] for state in states]
            try:
                if isinstance(values[0], DTensor):
                    self._tensors[name] = _dtensor(key, files, values, meshes)
                elif isinstance(values[0], torch.Tensor):
                    self._tensors[name] = _plain(key, files, values)
                else:
                    raise MergeError(f"{files[0].name}: {key} is a {type(values[0]).__name__}, not a tensor")
            except ValueError as err:
                raise MergeError(f"{self.directory.name}: {key}: {err}") from None

    # -- WeightSource ----------------------------------------------------------------------------

    def specs(self) -> dict[str, TensorSpec]:
        return {name: tensor.spec for name, tensor in self._tensors.items()}

    def read(self, name: str, out: memoryview) -> None:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise MergeError(f"{self.directory.name}: no tensor {name}")
        spec = tensor.spec
        size = memoryview(out).nbytes
        if size != spec.nbytes:
            raise MergeError(f"{name}: a buffer of {size} bytes for a tensor of {spec.nbytes}")
        if spec.nbytes == 0:
            return
        if tensor.plain is not None:
            self._check_identical(name, tensor)
        full = torch.frombuffer(out, dtype=getattr(torch, spec.dtype)).view(spec.shape)
        for piece in tensor.pieces:
            full[piece.box.slices()].copy_(piece.local)
            if piece.releasable:
                release(piece.local)

    def _check_identical(self, name: str, tensor: _Tensor) -> None:
        # A plain tensor in a DTensor state dict is not sharded: every rank must hold the same bytes.
        copies = tensor.plain or []
        reference = _raw_bytes(copies[0])
        for path, copy in zip(self._files[1:], copies[1:]):
            if not torch.equal(reference, _raw_bytes(copy)):
                raise MergeError(f"{path.name}: plain tensor {name} differs from {self._files[0].name}'s copy")

    def byte_ranges(self, name: str) -> None:
        return None  # assembled from the ranks' shards (checked against each other) on `read`

    def close(self) -> None:
        # Each file's mapping goes away with the last tensor that views it.
        self._tensors = {}
        self._files = []


class _Meshes:
    """Mesh shape, this file's coordinate and the rank layout, per DeviceMesh object of each file.

    Pickle memoises objects, so a file normally holds one DeviceMesh per distinct mesh whatever the number
    of tensors: computing per object keeps __init__ linear in keys + ranks.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        self._keep: list[Any] = []  # the meshes themselves, so that no id() is reused while cached
        # One object per distinct rank layout, so that callers compare layouts with `is`: comparing W-long
        # tuples for every key and rank would make __init__ quadratic in the world size.
        self._layouts: dict[tuple[int, ...], tuple[int, ...]] = {}

    def lookup(self, mesh: Any, rank: int, path: Path) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        key = (rank, id(mesh))
        if key not in self._seen:
            stored = vars(mesh).get("_rank")
            if isinstance(stored, int) and stored != rank:
                raise MergeError(f"{path.name}: written by rank {stored}, but named as rank {rank}")
            ranks = _mesh_tensor(mesh, rank)
            layout = tuple(ranks.flatten().tolist())
            layout = self._layouts.setdefault(layout, layout)
            self._seen[key] = (tuple(ranks.shape), _coordinate(ranks, rank), layout)
            self._keep.append(mesh)
        return self._seen[key]


def _dtensor(key: str, files: list[Path], values: list[Any], meshes: _Meshes) -> _Tensor:
    from torch.distributed.tensor import DTensor

    first = values[0]
    shape, placements = tuple(first.shape), tuple(first.placements)
    dtype = _dtype_name(first.dtype)
    layout0: tuple[int, ...] | None = None
    boxes: list[Box] = []
    pieces: dict[Box, _Piece] = {}
    for rank, (path, value) in enumerate(zip(files, values)):
        if not isinstance(value, DTensor):
            raise MergeError(f"{path.name}: {key} is a {type(value).__name__}, a DTensor in {files[0].name}")
        if tuple(value.shape) != shape or value.dtype != first.dtype:
            raise MergeError(f"{path.name}: {key} is {value.dtype} {tuple(value.shape)}, "
                             f"{files[0].name} says {first.dtype} {shape}")  # fmt: skip
        if tuple(value.placements) != placements:
            raise MergeError(f"{path.name}: {key} has placements {tuple(value.placements)}, "
                             f"{files[0].name} {placements}")  # fmt: skip
        _check_placements(value._spec, placements)
        mesh_shape, coordinate, layout = meshes.lookup(value.device_mesh, rank, path)
        layout0 = layout if layout0 is None else layout0
        if layout is not layout0:  # interned by _Meshes
            raise MergeError(f"{path.name}: {key} lies on another DeviceMesh than in {files[0].name}")
        if len(mesh_shape) != len(placements):
            raise ValueError(f"{len(placements)} placements for a {len(mesh_shape)}-dim mesh")
        box = local_box(shape, mesh_shape, coordinate, placements)
        local = value.to_local()
        if tuple(local.shape) != box.sizes or local.dtype != first.dtype:
            raise MergeError(f"{path.name}: {key} local shard is {local.dtype} {tuple(local.shape)}; placements "
                             f"{placements} at mesh coordinate {coordinate} imply {box.sizes}")  # fmt: skip
        boxes.append(box)
        if not box.empty and box not in pieces:  # a replica: the lowest rank's copy is read, never compared
            pieces[box] = _Piece(box, local, releasable=False)
    problem = check_tiling(shape, boxes)
    if problem:
        raise ValueError(f"the ranks' shards do not tile the {shape} tensor: {problem}")
    return _Tensor(TensorSpec(dtype, shape), list(pieces.values()))


def _plain(key: str, files: list[Path], values: list[Any]) -> _Tensor:
    from torch.distributed.tensor import DTensor

    first = values[0]
    for path, value in zip(files, values):
        if isinstance(value, DTensor) or not isinstance(value, torch.Tensor):
            raise MergeError(f"{path.name}: {key} is a {type(value).__name__}, a plain tensor in {files[0].name}")
        if value.shape != first.shape or value.dtype != first.dtype:
            raise MergeError(f"{path.name}: {key} is {value.dtype} {tuple(value.shape)}, "
                             f"{files[0].name} says {first.dtype} {tuple(first.shape)}")  # fmt: skip
    shape = tuple(first.shape)
    piece = _Piece(Box((0,) * len(shape), shape), first, releasable=False)
    return _Tensor(TensorSpec(_dtype_name(first.dtype), shape), [piece], plain=list(values))


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values as bytes, so that equal means bit-identical (NaN payloads and -0.0 included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)
