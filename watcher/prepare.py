"""Prepare stage: turn a checkpoint folder into a Hugging Face model folder an evaluator can load.

A consolidated Hugging Face checkpoint already is one: it is used in place. Sharded checkpoints (FSDP2 DCP
directories, per-rank DTensor files) and EMA weights are merged by the `merge` package into the job's scratch
folder, streaming, with memory that does not grow with the model.
"""

from __future__ import annotations

from pathlib import Path

from merge import MergeError, is_consolidated, merge_checkpoint


class PrepareError(RuntimeError):
    """The checkpoint cannot be turned into a loadable model folder; the message says why."""


def prepare_model(checkpoint: Path, variant: str, workdir: Path, base_model: Path | None = None) -> tuple[Path, bool]:
    """Return (model folder, whether it was merged) for this checkpoint's `variant` weights.

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
        merge_checkpoint(checkpoint, out, variant, base_model=base_model)
    except MergeError as exc:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}") from None
        raise PrepareError(str(exc)) from None
    return out, True
