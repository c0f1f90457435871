"""A checkpoint's layout is decided once (watcher.completion, journaled) and handed to merge, which looks up where
that layout keeps the weights instead of detecting it again (merge/layouts.py, issue 12)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

import merge.consolidate
import watcher.completion
from merge import MergeError, open_weights
from merge.layouts import FSDP_MODEL_DIR, Layout, weight_home
from watcher.prepare import prepare_model

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture
def fsdp_with_stray_weights(tiny_model_dir, tmp_path):
    """An accelerate FSDP checkpoint (DCP in pytorch_model_fsdp_0/) with a stray model.safetensors beside it that
    holds other values: reading the folder again would take the stray file for the model."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_model_dir / "model.safetensors")
    folder = tmp_path / "checkpoint-5"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=folder / FSDP_MODEL_DIR, no_dist=True)
    for name in MODEL_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy2(tiny_model_dir / name, folder / name)
    save_file({name: tensor * 2 for name, tensor in state.items()}, folder / "model.safetensors")
    return folder, state


def _no_detection(monkeypatch):
    def detect(*args, **kwargs):
        raise AssertionError("the layout was detected again although the journaled one was given")

    monkeypatch.setattr(merge.consolidate, "detect_layout", detect)


def test_prepare_uses_the_given_layout_without_detecting_again(fsdp_with_stray_weights, tmp_path, monkeypatch):
    folder, state = fsdp_with_stray_weights
    _no_detection(monkeypatch)
    model_dir, merged = prepare_model(folder, "regular", tmp_path / "work", layout="hf-fsdp-dcp")
    assert merged and model_dir == tmp_path / "work" / "model"
    written = _load_folder(model_dir)
    assert written.keys() == state.keys()
    assert all(written[name].equal(tensor) for name, tensor in state.items())  # the DCP weights, not the stray file

    # Without a layout (a folder nothing journaled), the folder's files decide: here the stray weights, in place.
    monkeypatch.undo()
    in_place, merged = prepare_model(folder, "regular", tmp_path / "work-2")
    assert (in_place, merged) == (folder, False)


def test_open_weights_takes_the_layout_over_the_folder(tiny_model_dir, tmp_path, monkeypatch):
    """A folder detection would call veRL's (an actor/ folder) opens as the Hugging Face folder it was journaled as."""
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    shutil.copy2(tiny_model_dir / "model.safetensors", folder / "model.safetensors")
    (folder / "actor").mkdir()
    with pytest.raises(MergeError, match="actor"):
        open_weights(folder).close()  # detected: veRL, whose actor/ holds no rank files
    _no_detection(monkeypatch)
    source = open_weights(folder, layout=Layout.HF)
    try:
        assert "model.embed_tokens.weight" in source.specs()
    finally:
        source.close()


@pytest.mark.parametrize("layout", [Layout.SENTINEL, Layout.UNKNOWN, "a-layout-of-a-later-version"])
def test_a_layout_that_names_no_weights_falls_back_to_detection(tiny_model_dir, monkeypatch, layout):
    seen = []
    real = merge.consolidate.detect_layout
    monkeypatch.setattr(merge.consolidate, "detect_layout", lambda folder: seen.append(folder) or real(folder))
    open_weights(tiny_model_dir, layout=layout).close()
    assert seen == [tiny_model_dir]


def test_every_layout_the_detector_journals_has_a_completion_rule_and_says_where_its_weights_are():
    assert set(watcher.completion._RULES) == set(Layout) - {Layout.SENTINEL}
    for layout in Layout:
        expected = layout not in (Layout.SENTINEL, Layout.UNKNOWN)
        assert (weight_home(layout, "regular") is not None) == expected, layout
        assert (weight_home(layout.value, "ema") is not None) == expected, layout
