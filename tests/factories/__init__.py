"""Factories for REAL checkpoints: genuine distributed saves made by torch itself, never imitations.

`make_distributed_checkpoint(dest, layout, step)` runs `save_distributed.py` under torchrun with two
CPU processes (gloo, FSDP2) and returns the checkpoint folder it wrote. One torchrun costs ~8 s here,
so tests should build each layout once per session: `session_distributed_checkpoints` builds all
layouts with a single torchrun and caches the result for the whole pytest process, so several test
modules can share it (copy before mutating!).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("save_distributed.py")
LAYOUTS = ("torchtitan", "hf-fsdp", "rank-shards")
WORLD_SIZE = 2

__all__ = [
    "LAYOUTS",
    "WORLD_SIZE",
    "DistributedCheckpointError",
    "checkpoint_folder_name",
    "make_distributed_checkpoint",
    "make_distributed_checkpoints",
    "session_distributed_checkpoints",
]


class DistributedCheckpointError(RuntimeError):
    """torchrun failed or timed out; the message carries its stderr."""


def checkpoint_folder_name(layout: str, step: int) -> str:
    return f"step-{step}" if layout == "torchtitan" else f"checkpoint-{step}"


def _run_torchrun(dest: Path, layouts: tuple[str, ...], step: int, timeout: float) -> None:
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layout(s) {sorted(unknown)}; choose from {LAYOUTS}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: the rendezvous binds a free port itself, so parallel runs cannot collide
        "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(SCRIPT), "--dest", str(dest), "--step", str(step),
    ]  # fmt: skip
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


def make_distributed_checkpoint(dest: Path, layout: str, step: int = 20, timeout: float = 300) -> Path:
    """Write one real sharded checkpoint of the tiny Llama into `dest`; return its folder.

    `dest` also receives `reference.pt` / `reference_ema.pt`: the full unsharded state dicts.
    """
    dest = Path(dest)
    _run_torchrun(dest, (layout,), step, timeout)
    return dest / checkpoint_folder_name(layout, step)


def make_distributed_checkpoints(
    dest: Path, layouts: tuple[str, ...] = LAYOUTS, step: int = 20, timeout: float = 300
) -> dict[str, Path]:
    """Like `make_distributed_checkpoint` for several layouts from ONE torchrun (same weights in all).

    Each layout goes to `dest/<layout>/` (with its own reference.pt); returns layout -> checkpoint folder.
    """
    dest = Path(dest)
    layouts = tuple(layouts)
    if len(layouts) == 1:
        return {layouts[0]: make_distributed_checkpoint(dest / layouts[0], layouts[0], step, timeout)}
    _run_torchrun(dest, layouts, step, timeout)
    return {layout: dest / layout / checkpoint_folder_name(layout, step) for layout in layouts}


_SESSION_CACHE: dict[int, dict[str, Path]] = {}


def session_distributed_checkpoints(tmp_path_factory, step: int = 20) -> dict[str, Path]:
    """All layouts, built once per pytest process and shared by every test module. Read-only."""
    if step not in _SESSION_CACHE:
        _SESSION_CACHE[step] = make_distributed_checkpoints(tmp_path_factory.mktemp("distributed"), LAYOUTS, step)
    return _SESSION_CACHE[step]
