"""torchtitan checkpoints (issue 18): REAL saves by torchtitan 0.3.0's own CheckpointManager over FSDP2 on 2 gloo
ranks (factories/save_torchtitan.py), mapped to Hugging Face names with torchtitan's own adapter and compared bit
for bit with torchtitan's own Hugging Face export of the same weights."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is a test dependency: pip install -e '.[test]'")

from factories.save_torchtitan import make_torchtitan_checkpoints  # noqa: E402
from helpers import ckpt_watch, load_folder, logits, results  # noqa: E402
from merge import merge_checkpoint  # noqa: E402
from watcher.completion import check_checkpoint  # noqa: E402
from watcher.prepare import prepare_model, verify_loadable  # noqa: E402

CONFIG = '[presets.params]\n[[presets.params.evaluators]]\nbackend = "probes"\nprobes = ["parameters"]\n'


@pytest.fixture(scope="session")
def titan(tmp_path_factory):
    """checkpoint/step-10 (native DCP), checkpoint/step-20 (torchtitan's HF export, same weights), base/. Read-only."""
    return make_torchtitan_checkpoints(tmp_path_factory.mktemp("torchtitan"))


def test_native_checkpoint_maps_bit_for_bit_to_torchtitans_own_hf_export(titan, tmp_path):
    native, export, base = titan / "checkpoint" / "step-10", titan / "checkpoint" / "step-20", titan / "base"
    merged = merge_checkpoint(native, tmp_path / "merged", base_model=base)
    ours = load_folder(merged)
    theirs = load_folder(export)
    assert sorted(ours) == sorted(theirs) and len(ours) == 20  # no lm_head: tied, as torchtitan's export drops it
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    # The export has no config.json: from_pretrained it with base's, as the daemon does (prepare links it in).
    export_model, merged_flag = prepare_model(export, "regular", tmp_path / "work", base_model=base)
    assert not merged_flag
    verify_loadable(merged, native.name)  # every weight loads: nothing newly initialised
    verify_loadable(export_model, export.name)
    assert torch.equal(logits(merged), logits(export_model))


@pytest.fixture(scope="session")
def titan_moe(tmp_path_factory):
    """The same for a tiny Qwen3-MoE (4 experts, top 2): grouped expert tensors sharded over the 2 ranks."""
    return make_torchtitan_checkpoints(tmp_path_factory.mktemp("torchtitan-moe"), family="qwen3_moe")


def test_moe_grouped_experts_are_split_bit_for_bit_like_torchtitans_export(titan_moe, tmp_path):
    native, export, base = titan_moe / "checkpoint" / "step-10", titan_moe / "checkpoint" / "step-20", titan_moe / "base"
    merged = merge_checkpoint(native, tmp_path / "merged", base_model=base)
    ours, theirs = load_folder(merged), load_folder(export)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in theirs
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    verify_loadable(merged, native.name)  # transformers fuses the experts back itself: nothing missing
    export_model, _ = prepare_model(export, "regular", tmp_path / "work", base_model=base)
    assert torch.equal(logits(merged), logits(export_model))


def test_completion_rules_for_both_folders(titan, tmp_path):
    native, export, base = titan / "checkpoint" / "step-10", titan / "checkpoint" / "step-20", titan / "base"
    assert check_checkpoint(export, 20, base_model=base).layout == "hf-export"
    assert check_checkpoint(export, 20, base_model=base).complete
    unusable = check_checkpoint(export, 20)
    assert not unusable.complete and unusable.final and "set base_model" in unusable.reason, unusable
    partial = tmp_path / "step-20"
    shutil.copytree(export, partial)
    (partial / "model.safetensors.index.json").unlink()  # torch's writer writes it last
    assert "model.safetensors.index.json missing" in check_checkpoint(partial, 20, base_model=base).reason
    assert check_checkpoint(native, 10, base_model=base).complete


def test_the_daemon_evaluates_native_and_export_folders_with_only_base_model_set(titan, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(titan / "checkpoint", output)
    config = tmp_path / "c.toml"
    config.write_text(f'base_model = "{titan / "base"}"\n' + CONFIG)
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "params")
    assert run.returncode == 0, run.stderr
    records = {r["step"]: r for r in results(output)}
    assert sorted(records) == [10, 20] and all(r["status"] == "ok" for r in records.values()), records
    assert records[10]["layout"] == "dcp" and records[20]["layout"] == "hf-export"
    assert records[10]["metrics"] == records[20]["metrics"]


def test_without_torchtitan_a_native_checkpoint_fails_clearly(titan, tmp_path):
    """torchtitan made unimportable in a child process: the merge says what to install, nothing is written."""
    code = (
        "import sys; sys.modules['torchtitan'] = None\n"
        "from pathlib import Path\n"
        "from watcher.prepare import PrepareError, prepare_model\n"
        "try:\n"
        f"    prepare_model(Path({str(titan / 'checkpoint' / 'step-10')!r}), 'regular', Path({str(tmp_path)!r}),\n"
        f"                  base_model=Path({str(titan / 'base')!r}))\n"
        "except PrepareError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torchtitan's parameter names" in run.stdout and "pip install 'ckpt-watch[torchtitan]'" in run.stdout, run.stdout
    assert not (tmp_path / "model").exists()
