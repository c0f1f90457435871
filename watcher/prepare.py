"""Prepare stage: turn a checkpoint folder into a Hugging Face model folder an evaluator can load.

A Hugging Face Trainer checkpoint already is one, so there is nothing to merge. Sharded formats (FSDP2 DCP
directories, per-rank DTensor files) and EMA weights are consolidated by the `merge` package, which plugs in
here; until it does, such checkpoints fail with a message that says so.
"""

from __future__ import annotations

from pathlib import Path

HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class PrepareError(RuntimeError):
    """The checkpoint cannot be turned into a loadable model folder; the message says why."""


def prepare_model(checkpoint: Path, variant: str, workdir: Path) -> Path:
    """Return a model folder for this checkpoint's `variant` weights, writing into `workdir` if needed.

    Never writes inside the checkpoint folder: the trainer owns it (and sorts checkpoints by mtime).
    """
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}")
    has_hf_weights = any((checkpoint / name).exists() for name in HF_WEIGHT_FILES)
    if variant == "regular" and has_hf_weights:
        if not (checkpoint / "config.json").is_file():
            raise PrepareError(f"{checkpoint.name} has weights but no config.json, so no model can be built from it")
        return checkpoint
    raise PrepareError(
        f"{checkpoint.name}: the {variant} weights are not a consolidated Hugging Face model and this version of "
        "ckpt-watch cannot merge sharded checkpoints yet"
    )
