"""Coverage of a DCP checkpoint, checked from `.metadata` and file sizes before any tensor data is read.

`check_coverage` raises a one-line MergeError unless every tensor's chunks tile it exactly (in bounds, no
gap, no overlap), every chunk has exactly one byte range, no range needs a storage transform, and every
`.distcp` file is long enough to hold the ranges that point into it.
"""

from __future__ import annotations

import math
from pathlib import Path

from merge.dcp_metadata import DcpMetadata, StorageRef, TensorInfo
from merge.source import MergeError

__all__ = ["check_coverage"]


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
