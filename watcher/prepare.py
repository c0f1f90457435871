"""Prepare stage: turn a checkpoint folder into a Hugging Face model folder an evaluator can load.

A consolidated Hugging Face checkpoint already is one: it is used in place, or, when it lacks `config.json` or
tokenizer files that `base_model` has, through a folder of links to its files plus those from `base_model`.
Sharded checkpoints (FSDP2 DCP directories, per-rank DTensor files) and EMA weights are merged by the `merge`
package into the job's scratch folder, streaming, with memory that does not grow with the model.

Whatever the route, the worker then calls `verify_loadable` before it hands the folder to any evaluator: the
weights are checked against the model class its `config.json` builds (watcher.load_check), so a model whose
weights would not all load is never evaluated. It is a step of its own because it imports torch and transformers
(hundreds of MB), which the streaming merge never needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from merge import MergeError, is_consolidated, merge_checkpoint
from merge.consolidate import TOKENIZER_FILES, copy_model_files
from merge.layouts import Layout, weight_home
from merge.writer import ByteProgress
from watcher.load_check import LoadCheckError, check_all_weights_load


class PrepareError(RuntimeError):
    """The checkpoint cannot be turned into a loadable model folder; the message says why."""


def prepare_model(checkpoint: Path, variant: str, workdir: Path, base_model: Path | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  layout: Layout | str | None = None) -> tuple[Path, bool]:  # fmt: skip
    """Return (model folder, whether it was merged) for this checkpoint's `variant` weights.

    `progress(done, total)`: bytes of merged weights written so far, of how many (a merge only; throttled to at
    most every 0.2 s, and the last call has done == total).
    `layout`: the layout the detector journaled (merge/layouts.py): where the weights are is looked up, not
    detected again. None (or a layout that names no weights, such as "sentinel"): detected from the folder.

    Never writes inside the checkpoint folder: the trainer owns it (and sorts checkpoints by mtime).
    """
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}")
    home = weight_home(layout, variant) if layout is not None else None
    # A layout whose weights are sharded is merged even if a stray model.safetensors lies beside them.
    in_place = variant == "regular" and (home is None or home.consolidated) and is_consolidated(checkpoint)
    if in_place:
        if _lacks_model_files(checkpoint) and base_model is not None:
            return _link_with_base(checkpoint, base_model, workdir / "model"), False
        if not (checkpoint / "config.json").is_file():
            raise PrepareError(f"{checkpoint.name} has weights but no config.json, so no model can be built from it "
                               "(set base_model to a folder that has one)")  # fmt: skip
        return checkpoint, False
    out = workdir / "model"
    try:
        merge_checkpoint(checkpoint, out, variant, base_model=base_model,
                         progress=ByteProgress(progress) if progress else None, layout=layout)  # fmt: skip
    except MergeError as exc:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}") from None
        raise PrepareError(str(exc)) from None
    return out, True


def verify_loadable(model_dir: Path, checkpoint_name: str) -> None:
    """Raise PrepareError unless every weight in `model_dir` would load into the model its config.json builds."""
    try:
        report = check_all_weights_load(model_dir)
    except LoadCheckError as exc:
        raise PrepareError(f"{checkpoint_name}: {exc}") from None
    if report is None:  # said in the job's log: the evaluators still run, unchecked
        print(f"[ckpt-watch] weight check skipped for {checkpoint_name}: no full-model weights, or a model class "
              "this transformers cannot build (custom code)", flush=True)


def _lacks_model_files(checkpoint: Path) -> bool:
    return not (checkpoint / "config.json").is_file() or not any((checkpoint / n).is_file() for n in TOKENIZER_FILES)


def _link_with_base(checkpoint: Path, base_model: Path, out: Path) -> Path:
    """A model folder of links to the checkpoint's own files, completed with config and tokenizer files from
    `base_model`: nothing is copied but those small files, and the checkpoint folder is not touched."""
    if not (checkpoint / "config.json").is_file() and not (Path(base_model) / "config.json").is_file():
        raise PrepareError(f"{checkpoint.name} has weights but no config.json, and base_model {base_model} has none")
    out.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint.iterdir():
        if entry.is_file():
            os.symlink(entry.resolve(), out / entry.name)
    copy_model_files([Path(base_model)], out, missing_only=True)
    return out
