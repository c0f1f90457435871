"""DTensor placements -> the box of the global tensor each rank holds, and whether the boxes tile it.

`local_box` follows torch's own rule (torch/distributed/tensor/_utils.py
`_compute_local_shape_and_global_offset`, with `Shard.local_shard_size_and_offset` in placement_types.py)
for plain `Shard(d)` / `Replicate()` placements over a mesh of any number of dimensions; `check_tiling`
checks that the distinct boxes of all ranks cover the tensor exactly once. torch is imported only inside
`local_box`, for the placement classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Box", "check_tiling", "local_box"]


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return math.prod(self.sizes) == 0

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))


def local_box(
    global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any]
) -> Box:
    """The box of the full tensor held at `coordinate` of a mesh of `mesh_shape`.

    The rule is torch's (torch/distributed/tensor/_utils.py `_compute_local_shape_and_global_offset` with
    `Shard.local_shard_size_and_offset` in placement_types.py): mesh dims are applied left to right; a
    `Shard(d)` over n ranks cuts the *current* extent of dim d into ceil(extent / n)-sized pieces, so a second
    mesh dim sharding the same tensor dim subdivides the first one's piece. Raises ValueError for any
    placement that is not a plain Shard or Replicate (the caller names the tensor).
    """
    from torch.distributed.tensor import Replicate, Shard

    offsets = [0] * len(global_shape)
    sizes = list(global_shape)
    for mesh_dim, placement in enumerate(placements):
        # type() and not isinstance: a subclass (e.g. a future strided variant) may not chunk contiguously.
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:
            raise ValueError(f"placement {placement} on mesh dim {mesh_dim} is not supported")
        dim = placement.dim + len(sizes) if placement.dim < 0 else placement.dim
        if not 0 <= dim < len(sizes):
            raise ValueError(f"{placement} on a {len(sizes)}-dim tensor")
        extent, pieces = sizes[dim], mesh_shape[mesh_dim]
        chunk = -(-extent // pieces)  # ceil: torch.chunk puts the remainder on the leading ranks' side
        start = min(chunk * coordinate[mesh_dim], extent)
        sizes[dim] = min(start + chunk, extent) - start
        offsets[dim] += start
    return Box(tuple(offsets), tuple(sizes))


def check_tiling(shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    """None if the distinct non-empty `boxes` cover the tensor exactly once, else why not.

    Boxes from chunking form a grid. So: along every dim the distinct intervals must cut [0, size) into
    consecutive pieces, and the boxes must be exactly the grid's cells (all distinct and as many as cells).
    O(boxes log boxes), unlike a pairwise overlap test, so thousands of ranks stay cheap.
    """
    if math.prod(shape) == 0:
        return None
    cells = {box for box in boxes if not box.empty}
    if not cells:
        return "no rank holds any of it"
    grid = 1
    for dim, size in enumerate(shape):
        intervals = sorted({(box.offsets[dim], box.sizes[dim]) for box in cells})
        end = 0
        for start, length in intervals:
            if start != end:
                return f"dim {dim}: {'gap' if start > end else 'overlap'} at index {min(start, end)}"
            end = start + length
        if end != size:
            return f"dim {dim}: pieces cover {end} of {size}"
        grid *= len(intervals)
    if len(cells) != grid:
        return f"{len(cells)} distinct pieces do not form the {grid}-cell grid their extents imply"
    return None
