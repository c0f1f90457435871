"""Never evaluate a model whose weights did not all load (issue 18): the prepare stage's check, on real folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ckpt_watch, results
from merge import merge_checkpoint
from watcher.load_check import TORCHTITAN_HINT, compare_with_model
from watcher.prepare import PrepareError, prepare_model, verify_loadable

RENAMED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_projection.weight")


def rewrite_weights(folder, change) -> None:
    """Re-save folder/model.safetensors after `change(state_dict)` edits it in place."""
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def prepare_and_verify(checkpoint, workdir, base_model=None):
    """What the job's worker does before any evaluator runs."""
    model_dir, merged = prepare_model(checkpoint, "regular", workdir, base_model)
    verify_loadable(model_dir, checkpoint.name)
    return model_dir, merged


@pytest.fixture
def copy_model(tiny_model_dir, tmp_path):
    def _copy(name: str = "checkpoint-30"):
        dest = tmp_path / name
        shutil.copytree(tiny_model_dir, dest)
        return dest

    return _copy


def test_a_whole_model_passes_with_its_tied_lm_head_absent(tiny_model_dir, tmp_path):
    report = compare_with_model(tiny_model_dir)
    assert report is not None and report.ok, report
    assert report.model_class == "LlamaForCausalLM"
    assert prepare_and_verify(tiny_model_dir, tmp_path / "work") == (tiny_model_dir, False)


def test_a_moe_model_passes_through_transformers_own_expert_conversion(tiny_moe_dir):
    report = compare_with_model(tiny_moe_dir)
    assert report is not None and report.ok, report


def test_one_renamed_tensor_fails_permanently_naming_both_keys(copy_model, tmp_path):
    folder = copy_model()
    rewrite_weights(folder, lambda sd: sd.__setitem__(RENAMED[1], sd.pop(RENAMED[0])))
    with pytest.raises(PrepareError) as caught:
        prepare_and_verify(folder, tmp_path / "work")
    message = str(caught.value)
    assert f"1 missing (first: {RENAMED[0]})" in message and f"1 unexpected (first: {RENAMED[1]})" in message, message
    assert "LlamaForCausalLM" in message and "\n" not in message


def test_a_missing_tensor_and_a_wrong_shape_are_named(copy_model, tmp_path):
    folder = copy_model()
    rewrite_weights(folder, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(PrepareError, match=r"1 missing \(first: model.norm.weight\)"):
        prepare_and_verify(folder, tmp_path / "work")
    folder = copy_model("checkpoint-31")
    rewrite_weights(folder, lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"][:-1].clone()))
    with pytest.raises(PrepareError, match=r"wrong shape \(first: model.norm.weight: \(63,\) in the folder, \(64,\)"):
        prepare_and_verify(folder, tmp_path / "work")


def test_torchtitan_names_point_at_the_mapping(copy_model, tmp_path):
    folder = copy_model()
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    rewrite_weights(folder, lambda sd: [sd.__setitem__(new, sd.pop(old)) for old, new in names.items()])
    with pytest.raises(PrepareError) as caught:
        prepare_and_verify(folder, tmp_path / "work")
    assert TORCHTITAN_HINT in str(caught.value)


def test_base_model_supplies_config_and_tokenizer_to_a_folder_without_them(copy_model, tiny_model_dir, tmp_path):
    """Issue 18 item 3: a Hugging Face folder without config.json is evaluated with base_model's."""
    folder = copy_model()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(PrepareError, match="no config.json"):
        prepare_and_verify(folder, tmp_path / "work-a")
    model_dir, merged = prepare_and_verify(folder, tmp_path / "work-b", base_model=tiny_model_dir)
    assert not merged and (model_dir / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert (model_dir / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in copy_model("untouched").iterdir()
                                                               if p.name not in ("config.json", "tokenizer.json",
                                                                                 "tokenizer_config.json"))  # fmt: skip


def test_the_daemon_fails_the_job_permanently_before_lm_eval_runs(copy_trainer_output, tmp_path):
    """lm-eval loads the model itself and would evaluate a half-random model: the check runs before it."""
    output = copy_trainer_output()
    for step in (10, 20):
        shutil.rmtree(output / f"checkpoint-{step}")
    rewrite_weights(output / "checkpoint-30", lambda sd: sd.__setitem__(RENAMED[1], sd.pop(RENAMED[0])))
    # Keep the re-save's mtime old so --scan takes the folder at once.
    config = tmp_path / "c.toml"
    config.write_text('[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "lm_eval"\n'
                      'tasks = ["ckpt_watch_smoke_ppl"]\nlimit = 3\n')  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "quick")
    assert run.returncode == 1, run.stderr  # a failed job in a scan
    (record,) = results(output)
    assert record["status"] == "failed", record
    assert f"1 missing (first: {RENAMED[0]})" in record["error"], record
    job_logs = [p.read_text(errors="replace") for p in (output / "ckpt-watch").rglob("*.log")]
    assert any("stage: preparing" in text for text in job_logs), job_logs
    assert not any("stage: evaluating" in text for text in job_logs), job_logs


def test_a_bf16_export_merged_with_a_float32_base_config_says_bfloat16(copy_model, tiny_model_dir, tmp_path):
    """Issue 18 item 6: the merged config.json's dtype follows the weights written, not base_model's config."""
    folder = copy_model()
    rewrite_weights(folder, lambda sd: sd.update({k: v.to(torch.bfloat16) for k, v in sd.items()}))
    (folder / "config.json").unlink()
    assert json.loads((tiny_model_dir / "config.json").read_text()).get("dtype") == "float32"
    merged = merge_checkpoint(folder, tmp_path / "merged", base_model=tiny_model_dir)
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    cast = merge_checkpoint(folder, tmp_path / "cast", dtype="float16", base_model=tiny_model_dir)
    assert json.loads((cast / "config.json").read_text())["dtype"] == "float16"
