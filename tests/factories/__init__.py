"""Factories for REAL checkpoints: genuine distributed saves made by torch itself, never imitations.

`make_distributed_checkpoint(dest, layout, step)` runs `save_distributed.py` under torchrun with two
CPU processes (gloo, FSDP2) and returns the checkpoint folder it wrote. One torchrun costs ~8 s here,
so tests should build each layout once per session: `session_distributed_checkpoints` builds all
layouts with a single torchrun and caches the result for the whole pytest process, so several test
modules can share it (copy before mutating!).

Keyword options (every default reproduces the original checkpoints; the session cache keys on them):

* ``dtype="float32" | "bfloat16"``: the parameters' dtype when sharded and saved; reference.pt is the
  full gathered state dict in that dtype. `session_distributed_variants` builds several dtypes from one
  torchrun (and fills the same cache), which is ~6 s cheaper per extra dtype than one torchrun each.
* ``shard_dim1=False | True``: every 2-D weight in the decoder layers saved with a ``Shard(1)``
  placement (column chunks); the 259-row embedding keeps its uneven ``Shard(0)`` split.
* ``world_size=2``: number of ranks (e.g. 3 makes every ``Shard(0)`` split uneven: 32 rows -> 11+11+10).
  FSDP2 refuses uneven ``Shard(1)`` ("FSDP does not support uneven sharding on dim 1",
  torch/distributed/fsdp/_fully_shard/_fsdp_param.py), and the tiny model's dims 1 are all even, so
  ``shard_dim1=True`` needs an even world size; the uneven split is then the 259-row embedding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("save_distributed.py")
LAYOUTS = ("torchtitan", "hf-fsdp", "rank-shards")
# Producers' own layouts, built only on request (not by the session builders): see save_distributed.py.
PRODUCER_LAYOUTS = ("lmms-engine", "verl")
DTYPES = ("float32", "bfloat16")
WORLD_SIZE = 2  # the default number of ranks

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "PRODUCER_LAYOUTS",
    "WORLD_SIZE",
    "DistributedCheckpointError",
    "checkpoint_folder_name",
    "make_distributed_checkpoint",
    "make_distributed_checkpoints",
    "make_distributed_variants",
    "session_distributed_checkpoints",
    "session_distributed_variants",
]


class DistributedCheckpointError(RuntimeError):
    """torchrun failed or timed out; the message carries its stderr."""


def checkpoint_folder_name(layout: str, step: int) -> str:
    if layout == "verl":
        return f"global_step_{step}"
    return f"step-{step}" if layout == "torchtitan" else f"checkpoint-{step}"


def _run_torchrun(
    dest: Path,
    layouts: tuple[str, ...],
    step: int,
    timeout: float,
    dtype: str | tuple[str, ...] = "float32",
    shard_dim1: bool = False,
    world_size: int = WORLD_SIZE,
) -> None:
    """One torchrun; several dtypes (a tuple) go to dest/<dtype>/, several layouts to .../<layout>/."""
    unknown = set(layouts) - set(LAYOUTS) - set(PRODUCER_LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layout(s) {sorted(unknown)}; choose from {LAYOUTS + PRODUCER_LAYOUTS}")
    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    if not dtypes or set(dtypes) - set(DTYPES):
        raise ValueError(f"unknown dtype(s) {dtypes!r}; choose from {DTYPES}")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: the rendezvous binds a free port itself, so parallel runs cannot collide
        "--standalone", "--nproc_per_node", str(world_size),
        str(SCRIPT), "--dest", str(dest), "--step", str(step),
    ]  # fmt: skip
    for name in dtypes:
        cmd += ["--dtype", name]
    if shard_dim1:
        cmd.append("--shard-dim1")
    for layout in layouts:
        cmd += ["--layout", layout]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise DistributedCheckpointError(f"torchrun timed out after {timeout:.0f}s:\n{err.stderr or ''}") from err
    if proc.returncode != 0:
        raise DistributedCheckpointError(
            f"torchrun exited with {proc.returncode}:\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
        )


def make_distributed_checkpoint(
    dest: Path,
    layout: str,
    step: int = 20,
    timeout: float = 300,
    *,
    dtype: str = "float32",
    shard_dim1: bool = False,
    world_size: int = WORLD_SIZE,
) -> Path:
    """Write one real sharded checkpoint of the tiny Llama into `dest`; return its folder.

    `dest` also receives `reference.pt` / `reference_ema.pt`: the full unsharded state dicts.
    """
    dest = Path(dest)
    _run_torchrun(dest, (layout,), step, timeout, dtype, shard_dim1, world_size)
    return dest / checkpoint_folder_name(layout, step)


def make_distributed_checkpoints(
    dest: Path,
    layouts: tuple[str, ...] = LAYOUTS,
    step: int = 20,
    timeout: float = 300,
    *,
    dtype: str = "float32",
    shard_dim1: bool = False,
    world_size: int = WORLD_SIZE,
) -> dict[str, Path]:
    """Like `make_distributed_checkpoint` for several layouts from ONE torchrun (same weights in all).

    Each layout goes to `dest/<layout>/` (with its own reference.pt); returns layout -> checkpoint folder.
    """
    dest = Path(dest)
    layouts = tuple(layouts)
    options = {"dtype": dtype, "shard_dim1": shard_dim1, "world_size": world_size}
    if len(layouts) == 1:
        return {layouts[0]: make_distributed_checkpoint(dest / layouts[0], layouts[0], step, timeout, **options)}
    _run_torchrun(dest, layouts, step, timeout, **options)
    return {layout: dest / layout / checkpoint_folder_name(layout, step) for layout in layouts}


def make_distributed_variants(
    dest: Path,
    dtypes: tuple[str, ...] = DTYPES,
    layouts: tuple[str, ...] = LAYOUTS,
    step: int = 20,
    timeout: float = 300,
    *,
    shard_dim1: bool = False,
    world_size: int = WORLD_SIZE,
) -> dict[str, dict[str, Path]]:
    """Like `make_distributed_checkpoints` for several dtypes from ONE torchrun (a fresh model each).

    Each dtype goes to `dest/<dtype>/<layout>/`; returns dtype -> layout -> checkpoint folder.
    """
    dest, dtypes, layouts = Path(dest), tuple(dtypes), tuple(layouts)
    if len(dtypes) == 1:
        folders = make_distributed_checkpoints(
            dest / dtypes[0], layouts, step, timeout, dtype=dtypes[0], shard_dim1=shard_dim1, world_size=world_size
        )
        return {dtypes[0]: folders}
    _run_torchrun(dest, layouts, step, timeout, dtypes, shard_dim1, world_size)
    base = {dtype: dest / dtype for dtype in dtypes}
    if len(layouts) == 1:
        return {dtype: {layouts[0]: base[dtype] / checkpoint_folder_name(layouts[0], step)} for dtype in dtypes}
    return {dtype: {lay: base[dtype] / lay / checkpoint_folder_name(lay, step) for lay in layouts} for dtype in dtypes}


# (step, dtype, shard_dim1, world_size) -> layout -> checkpoint folder
_SESSION_CACHE: dict[tuple[int, str, bool, int], dict[str, Path]] = {}


def session_distributed_checkpoints(
    tmp_path_factory,
    step: int = 20,
    *,
    dtype: str = "float32",
    shard_dim1: bool = False,
    world_size: int = WORLD_SIZE,
) -> dict[str, Path]:
    """All layouts, built once per pytest process (per set of options) and shared by every test module.

    Read-only: copy before mutating.
    """
    key = (step, dtype, bool(shard_dim1), world_size)
    if key not in _SESSION_CACHE:
        name = f"distributed-{dtype}{'-dim1' if shard_dim1 else ''}-w{world_size}"
        _SESSION_CACHE[key] = make_distributed_checkpoints(
            tmp_path_factory.mktemp(name), LAYOUTS, step, dtype=dtype, shard_dim1=shard_dim1, world_size=world_size
        )
    return _SESSION_CACHE[key]


def session_distributed_variants(
    tmp_path_factory,
    dtypes: tuple[str, ...] = DTYPES,
    step: int = 20,
    *,
    shard_dim1: bool = False,
    world_size: int = WORLD_SIZE,
) -> dict[str, dict[str, Path]]:
    """`session_distributed_checkpoints` for several dtypes: those not cached yet are built by one torchrun.

    Returns dtype -> layout -> checkpoint folder; later `session_distributed_checkpoints(dtype=...)` calls
    with the same options are served from the cache. Read-only: copy before mutating.
    """
    keys = {dtype: (step, dtype, bool(shard_dim1), world_size) for dtype in dtypes}
    missing = tuple(dtype for dtype, key in keys.items() if key not in _SESSION_CACHE)
    if missing:
        name = f"distributed-{'-'.join(missing)}{'-dim1' if shard_dim1 else ''}-w{world_size}"
        built = make_distributed_variants(
            tmp_path_factory.mktemp(name), missing, LAYOUTS, step, shard_dim1=shard_dim1, world_size=world_size
        )
        for dtype, folders in built.items():
            _SESSION_CACHE[keys[dtype]] = folders
    return {dtype: _SESSION_CACHE[key] for dtype, key in keys.items()}
