"""Prepare stage: turn a checkpoint folder into a Hugging Face model folder an evaluator can load.

A consolidated Hugging Face checkpoint already is one: it is used in place. Sharded checkpoints (FSDP2 DCP
directories, per-rank DTensor files) and EMA weights are merged by the `merge` package into the job's scratch
folder, streaming, with memory that does not grow with the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from merge import MergeError, is_consolidated, merge_checkpoint
from merge.writer import ByteProgress


class PrepareError(RuntimeError):
    """The checkpoint cannot be turned into a loadable model folder; the message says why."""


def prepare_model(checkpoint: Path, variant: str, workdir: Path, base_model: Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[Path, bool]:  # fmt: skip
    """Return (model folder, whether it was merged) for this checkpoint's `variant` weights.

    `progress(done, total)`: bytes of merged weights written so far, of how many (a merge only; throttled to at
    most every 0.2 s, and the last call has done == total).

    Never writes inside the checkpoint folder: the trainer owns it (and sorts checkpoints by mtime).
    """
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}")
    if variant == "regular" and is_consolidated(checkpoint):
        if not (checkpoint / "config.json").is_file():
            raise PrepareError(f"{checkpoint.name} has weights but no config.json, so no model can be built from it")
        return checkpoint, False
    out = workdir / "model"
    try:
        merge_checkpoint(checkpoint, out, variant, base_model=base_model,
                         progress=ByteProgress(progress) if progress else None)  # fmt: skip
    except MergeError as exc:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}") from None
        raise PrepareError(str(exc)) from None
    return out, True
