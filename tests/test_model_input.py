"""One model load per job, no merged copy when none is needed (watcher/model_input.py, watcher/worker.run_job).

Real checkpoints: the tiny model's Trainer checkpoints and FSDP2 sharded ones (DCP and per-rank files, each with
an EMA twin) written by torchrun (tests/factories). The "before" of every comparison is the folder route, which is
what the worker ran before this change (the merged folder, loaded by transformers and by lm-eval from its path).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from factories import session_distributed_checkpoints
from helpers import ckpt_watch, results
from merge import merge_checkpoint, open_model
from watcher.evaluators import JobContext, get_evaluator
from watcher.model_input import LOADED_LINE, ModelInput
from watcher.prepare import PrepareError, prepare_input, verify_input
from watcher.presets import get_preset
from watcher.records import JobSpec, Preset
from watcher.worker import run_job

LAYOUTS = {"dcp": "hf-fsdp", "rank-shards": "rank-shards"}  # our name -> the factory's
PROBES = ["parameters", "flops", "perplexity", "inference"]
MC = {"backend": "lm_eval", "tasks": ["ckpt_watch_smoke_mc"], "limit": 4, "batch_size": 4}
ONE_LOAD_PRESET = [{"backend": "probes", "probes": PROBES, "iterations": 1, "new_tokens": 4}, MC]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return session_distributed_checkpoints(tmp_path_factory)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _spec(tmp_path: Path, checkpoint: Path, variant: str, layout: str, evaluators: list[dict],
          base_model: Path | None, keep_merged: bool = False) -> JobSpec:  # fmt: skip
    steps = [{"backend": e["backend"], "options": {k: v for k, v in e.items() if k != "backend"}} for e in evaluators]
    preset = Preset.from_dict({"name": "t", "evaluators": steps})
    return JobSpec(job_id=1, checkpoint_name=checkpoint.name, checkpoint_path=checkpoint, step=20, generation=1,
                   layout=layout, variants=("regular", "ema"), variant=variant, preset=preset, devices=("cpu",),
                   base_model=base_model, scratch_dir=tmp_path / "scratch", outcome_path=tmp_path / "outcome.json",
                   parent_pid=0, keep_merged=keep_merged)  # fmt: skip


@pytest.mark.parametrize("variant", ["regular", "ema"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_directly_loaded_model_is_the_merged_folders_exactly(sharded, tiny_model_dir, tmp_path, layout, variant):
    from transformers import AutoModelForCausalLM

    checkpoint = sharded[LAYOUTS[layout]]
    merged = merge_checkpoint(checkpoint, tmp_path / "merged", variant, base_model=tiny_model_dir)
    expected = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    model = ModelInput(checkpoint.name, weights=open_model(checkpoint, variant, base_model=tiny_model_dir))
    loaded, tokenizer = model.load("cpu")
    assert model.load("cpu") == (loaded, tokenizer)  # cached: the same objects
    found, wanted = loaded.state_dict(), expected.state_dict()
    assert list(found) == list(wanted)
    for name in wanted:
        assert found[name].dtype == wanted[name].dtype and torch.equal(found[name], wanted[name]), name
    for name, buffer in expected.named_buffers():  # non-persistent ones (RoPE's inv_freq) too
        assert torch.equal(dict(loaded.named_buffers())[name], buffer), name
    assert loaded.generation_config == expected.generation_config
    assert model.specs() == ModelInput("m", folder=merged).specs()
    assert model.config() == ModelInput("m", folder=merged).config()
    model.close()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_job_of_in_process_evaluators_writes_nothing_under_scratch(sharded, tiny_model_dir, tmp_path, capfd, layout):
    checkpoint = sharded[LAYOUTS[layout]]
    spec = _spec(tmp_path, checkpoint, "ema", LAYOUTS[layout] if layout == "rank-shards" else "hf-fsdp-dcp",
                 ONE_LOAD_PRESET, tiny_model_dir)  # fmt: skip
    outcome = run_job(spec)
    assert outcome.ok and outcome.merged_model is None
    assert _files(spec.scratch_dir) == []
    log = capfd.readouterr().out
    assert log.count(LOADED_LINE) == 1 and "(from shards: no merged copy)" in log
    assert {"params/total", "ppl/perplexity", "inference/latency_s", "ckpt_watch_smoke_mc/acc"} <= set(outcome.metrics)


def test_a_step_that_needs_a_folder_gets_the_merge_and_the_load_is_still_one(sharded, tiny_model_dir, tmp_path, capfd):
    """lm-eval with a dtype of its own loads the folder itself: the checkpoint is merged, the probes load once."""
    checkpoint = sharded["hf-fsdp"]
    spec = _spec(tmp_path, checkpoint, "regular", "hf-fsdp-dcp",
                 [{"backend": "probes", "probes": ["perplexity"]}, {**MC, "dtype": "float32"}], tiny_model_dir)  # fmt: skip
    outcome = run_job(spec)
    assert outcome.ok and outcome.merged_model == str(spec.scratch_dir / "model")
    assert capfd.readouterr().out.count(LOADED_LINE) == 1  # the probes' (lm-eval's own load does not say it)


def test_keep_merged_merges_even_when_no_step_needs_a_folder(sharded, tiny_model_dir, tmp_path):
    spec = _spec(tmp_path, sharded["rank-shards"], "regular", "rank-shards", [{"backend": "probes"}], tiny_model_dir,
                 keep_merged=True)  # fmt: skip
    assert run_job(spec).merged_model == str(spec.scratch_dir / "model")


def test_weights_that_do_not_fit_the_config_fail_before_any_evaluator_and_at_load(sharded, tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "checkpoint-20"
    shutil.copytree(sharded["hf-fsdp"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    model = prepare_input(checkpoint, "regular", tmp_path / "scratch", tiny_model_dir, layout="hf-fsdp-dcp",
                          merge=False)  # fmt: skip
    with pytest.raises(PrepareError, match=r"missing \(first: model\.layers\.2\."):
        verify_input(model)
    with pytest.raises(PrepareError, match=r"checkpoint-20: not every weight .* missing \(first: model\.layers\.2\."):
        model.load("cpu")
    assert not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("preset", ["30s", "smoke"])
def test_a_bundled_preset_gives_the_same_metrics_from_the_loaded_model(tiny_model_dir, tmp_path, preset):
    """Folder route (what every job ran before: from_pretrained / lm-eval's own load of the path) vs the job's
    shared loaded model: the same metrics to the last bit on the CPU."""
    folder_metrics, shared_metrics = {}, {}
    context = JobContext(model=ModelInput(tiny_model_dir.name, folder=tiny_model_dir))
    for index, step in enumerate(get_preset(preset).evaluators):
        evaluator = get_evaluator(step.backend)
        assert evaluator.takes_loaded_model(dict(step.options), ("cpu",))
        folder_metrics |= evaluator.run(tiny_model_dir, ("cpu",), dict(step.options), tmp_path / f"a{index}").metrics
        shared_metrics |= evaluator.run(None, ("cpu",), dict(step.options), tmp_path / f"b{index}", context).metrics
    assert folder_metrics and shared_metrics == folder_metrics


def test_the_held_out_text_is_tokenised_as_before_without_the_length_warning(tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    from watcher.evaluators.probes import _heldout_text, heldout_ids

    with caplog.at_level(logging.WARNING):
        before = AutoTokenizer.from_pretrained(tiny_model_dir)(_heldout_text({}), return_tensors="pt").input_ids[0]
        assert "Token indices sequence length" in caplog.text  # the old call: longer than the tokenizer's 512
        caplog.clear()
        ids = heldout_ids(AutoTokenizer.from_pretrained(tiny_model_dir), {})
    assert torch.equal(ids, before)
    assert "Token indices sequence length" not in caplog.text


def test_lm_evals_task_index_is_built_once_per_process():
    from watcher.evaluators.lm_eval_run import _task_manager, bundled_tasks_dir, parse_options

    opts = parse_options({"tasks": ["ckpt_watch_smoke_mc"]})
    first = _task_manager(opts, bundled_tasks_dir(), metadata={"pretrained": "a"})
    second = _task_manager(opts, bundled_tasks_dir(), metadata={"pretrained": "b"})
    assert first.task_index is second.task_index  # one index ...
    assert (first.metadata, second.metadata) == ({"pretrained": "a"}, {"pretrained": "b"})  # ... each job's metadata
    assert "hellaswag" not in first.all_tasks  # lm-eval's own tasks are not indexed for ours
    assert bundled_tasks_dir() == bundled_tasks_dir()


def test_one_model_load_per_job_through_the_daemon(sharded, tiny_model_dir, trainer_output, tmp_path):
    """A Trainer checkpoint and a sharded one in one run, probes + lm-eval: one load line per job, no merged copy."""
    output = tmp_path / "output"
    output.mkdir()
    shutil.copytree(trainer_output / "checkpoint-10", output / "checkpoint-10")
    shutil.copytree(sharded["hf-fsdp"], output / "checkpoint-20")
    probes = '[[presets.one.evaluators]]\nbackend = "probes"\nprobes = ["parameters", "flops", "perplexity", "inference"]\n' \
             'iterations = 1\nnew_tokens = 4\n'  # fmt: skip
    lm_eval = '[[presets.one.evaluators]]\nbackend = "lm_eval"\ntasks = ["ckpt_watch_smoke_mc"]\nlimit = 4\n'
    config = tmp_path / "c.toml"
    config.write_text(f'base_model = "{tiny_model_dir}"\nvariants = ["regular"]\n[presets.one]\n{probes}{lm_eval}')
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "one")
    assert run.returncode == 0, run.stderr
    records = {r["checkpoint"]: r for r in results(output)}
    assert sorted(records) == ["checkpoint-10", "checkpoint-20"]
    assert all(r["status"] == "ok" for r in records.values())
    assert records["checkpoint-20"]["stages"]["prepare"]["walltime_s"] < 1  # no merge
    logs = {name: (output / "ckpt-watch" / record["log"]).read_text() for name, record in records.items()}
    for log in logs.values():
        assert log.count(LOADED_LINE) == 1, log
        assert "Token indices sequence length" not in log
    assert "(from shards: no merged copy)" in logs["checkpoint-20"]
