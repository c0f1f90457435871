"""Prepare stage: turn a checkpoint folder into a Hugging Face model folder an evaluator can load.

A consolidated Hugging Face checkpoint already is one: it is used in place, or, when it lacks `config.json` or
tokenizer files that `base_model` has, through a folder of links to its files plus those from `base_model`.
Sharded checkpoints (FSDP2 DCP directories, per-rank DTensor files) and EMA weights are merged by the `merge`
package into the job's scratch folder, streaming, with memory that does not grow with the model.

Whatever the route, the worker then calls `verify_loadable` before it hands the folder to any evaluator: the
weights are checked against the model class its `config.json` builds (watcher.load_check), so a model whose
weights would not all load is never evaluated. It is a step of its own because it imports torch and transformers
(hundreds of MB), which the streaming merge never needs.

`prepare_input` wraps either route in a watcher.model_input.ModelInput. With `merge=False` a sharded checkpoint is
not merged at all: the evaluators load it straight from its shards (each of them said it can take a loaded
model), and the merge runs only if one of them asks for a folder after all. Its weights are then checked against
the model class from their metadata alone (`verify_input`), before any evaluator, as a folder's are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from merge import MergeError, is_consolidated, merge_checkpoint, open_model
from merge.consolidate import TOKENIZER_FILES, copy_model_files
from merge.layouts import Layout, weight_home
from merge.writer import ByteProgress
from watcher.load_check import LoadReport, compare_tensors, compare_with_model, failure_text
from watcher.model_input import ModelInput, PrepareError  # PrepareError: see watcher/model_input.py


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
    if _in_place(checkpoint, variant, layout):
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


def prepare_input(checkpoint: Path, variant: str, workdir: Path, base_model: Path | None = None,
                  progress: Callable[[int, int], None] | None = None, layout: Layout | str | None = None,
                  merge: bool = True, checkpoint_name: str | None = None) -> ModelInput:  # fmt: skip
    """The job's ModelInput: a model folder as `prepare_model` makes it, or, with `merge=False`, a sharded
    checkpoint's weights read in place (merged, with `progress`, only when an evaluator asks for a folder)."""
    name = checkpoint_name or Path(checkpoint).name
    if merge or _in_place(checkpoint, variant, layout):
        folder, merged = prepare_model(checkpoint, variant, workdir, base_model, progress, layout)
        return ModelInput(name, folder=folder, merged=merged)
    try:
        weights = open_model(checkpoint, variant, base_model=base_model, layout=layout)
    except MergeError as exc:
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"checkpoint folder is gone: {checkpoint}") from None
        raise PrepareError(str(exc)) from None

    def merge_now() -> Path:
        folder, _ = prepare_model(checkpoint, variant, workdir, base_model, progress, layout)
        verify_loadable(folder, name)
        return folder

    return ModelInput(name, weights=weights, merge=merge_now)


def verify_input(model: ModelInput) -> None:
    """`verify_loadable` for any ModelInput: a folder's weights from their headers, a sharded checkpoint's from
    the shards' metadata (nothing is read or written)."""
    if model.has_folder:
        verify_loadable(model.folder(), model.checkpoint_name)
        return
    config = model.transformers_config()
    tensors = {name: (spec.dtype, spec.shape) for name, spec in model.specs().items()}
    _judge(compare_tensors(config, tensors, model.checkpoint_name) if config is not None else None,
           model.checkpoint_name)  # fmt: skip


def verify_loadable(model_dir: Path, checkpoint_name: str) -> None:
    """Raise PrepareError unless every weight in `model_dir` would load into the model its config.json builds."""
    _judge(compare_with_model(model_dir), checkpoint_name)


def _judge(report: LoadReport | None, checkpoint_name: str) -> None:
    if report is None:  # said in the job's log: the evaluators still run, unchecked
        print(f"[ckpt-watch] weight check skipped for {checkpoint_name}: no full-model weights, or a model class "
              "this transformers cannot build (custom code)", flush=True)
    elif not report.ok:
        raise PrepareError(f"{checkpoint_name}: {failure_text(report)}")


def _in_place(checkpoint: Path, variant: str, layout: Layout | str | None) -> bool:
    """Consolidated weights of this variant: used as they are, never merged."""
    home = weight_home(layout, variant) if layout is not None else None
    # A layout whose weights are sharded is merged even if a stray model.safetensors lies beside them.
    return variant == "regular" and (home is None or home.consolidated) and is_consolidated(checkpoint)


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
