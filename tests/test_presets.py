"""Presets as data: the bundled file, user presets from the config, and `ckpt-watch presets`."""

import subprocess
import sys

import pytest

from watcher.config import ConfigError
from watcher.presets import get_preset, load_presets


def _presets(*args):
    return subprocess.run([sys.executable, "-m", "watcher", "presets", *map(str, args)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_the_bundled_smoke_preset_runs_the_offline_tasks():
    smoke = get_preset("smoke")
    assert [step.backend for step in smoke.evaluators] == ["lm_eval"]
    assert smoke.evaluators[0].options["tasks"] == ["ckpt_watch_smoke_mc", "ckpt_watch_smoke_ppl"]
    assert smoke.time_budget and smoke.time_budget > 0


def test_user_presets_add_to_and_override_the_bundled_ones():
    user = {"smoke": {"description": "mine", "evaluators": [{"backend": "probes"}]},
            "tiny": {"evaluators": [{"backend": "lm_eval", "tasks": ["ckpt_watch_smoke_mc"], "limit": 4}]}}  # fmt: skip
    presets = load_presets(user)
    assert presets["smoke"].description == "mine" and presets["tiny"].evaluators[0].options["limit"] == 4
    with pytest.raises(ConfigError, match="runs no evaluator"):
        load_presets({"empty": {"description": "nothing"}})
    with pytest.raises(ConfigError, match="time_budget"):
        load_presets({"bad": {"time_budget": -1, "evaluators": [{"backend": "probes"}]}})


def test_the_presets_command_lists_what_each_preset_runs(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[presets.mine]\ndescription = "params only"\n[[presets.mine.evaluators]]\nbackend = "probes"\n')
    listed = _presets("--config", config)
    assert listed.returncode == 0, listed.stderr
    assert "smoke (time budget" in listed.stdout and "ckpt_watch_smoke_mc" in listed.stdout
    assert "mine [from config] (no time budget; needs network: no): params only" in listed.stdout
    assert "smoke (time budget 1800 s; needs network: no)" in listed.stdout  # the bundled offline tasks
    assert "1min (time budget 240 s; needs network: yes, or a warm datasets cache)" in listed.stdout  # hellaswag
    config.write_text('[presets.mine]\n[[presets.mine.evaluators]]\nbackend = "nonesuch"\n')
    broken = _presets("--config", config)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "unknown backend 'nonesuch'" in broken.stderr


def test_the_time_budget_family_is_bundled_and_valid():
    presets = load_presets()
    assert {"smoke", "30s", "1min", "5min", "15min", "full"} <= set(presets)
    budgets = [presets[name].time_budget for name in ("30s", "1min", "5min", "15min")]
    assert budgets == sorted(budgets) and presets["full"].time_budget is None
    lm_eval = {name: next(s.options for s in presets[name].evaluators if s.backend == "lm_eval")
               for name in ("1min", "5min", "15min", "full")}  # fmt: skip
    assert [lm_eval[n].get("limit") for n in ("1min", "5min", "15min", "full")] == [5, 20, 100, None]
    assert lm_eval["full"]["tasks"] == ["mmlu", "hellaswag", "arc_easy"]


def test_the_30s_preset_runs_offline_on_a_real_checkpoint(copy_trainer_output):
    from helpers import ckpt_watch, results

    output = copy_trainer_output()
    run = ckpt_watch(output, "--scan", "--preset", "30s")
    assert run.returncode == 0, run.stderr
    assert all({"params/total", "ppl/perplexity"} <= set(r["metrics"]) for r in results(output))
    assert len(results(output)) == 3


def test_backend_settings_fill_every_evaluator_of_that_backend_and_entries_win():
    user = {"a": {"evaluators": [{"backend": "probes"}, {"backend": "probes", "iterations": 9}]}}
    presets = load_presets(user, {"probes": {"iterations": 2}})
    assert [s.options["iterations"] for s in presets["a"].evaluators] == [2, 9]
    assert presets["30s"].evaluators[0].options["iterations"] == 2  # bundled presets get them too
    with pytest.raises(ConfigError, match=r"\[backends.nope\]: unknown backend"):
        load_presets({}, {"nope": {}})
    with pytest.raises(ConfigError, match="unknown probes option.*typo"):
        load_presets(user, {"probes": {"typo": 1}})


def test_gpus_is_how_many_gpus_one_job_takes_and_travels_with_the_preset():
    from watcher.records import Preset

    presets = load_presets({"pair": {"gpus": 2, "evaluators": [{"backend": "probes"}]}})
    assert presets["pair"].gpus == 2 and presets["smoke"].gpus == 1  # default: one GPU
    assert Preset.from_dict(presets["pair"].to_dict()) == presets["pair"]
    older = presets["pair"].to_dict()
    del older["gpus"]  # a job spec written before presets had `gpus`
    assert Preset.from_dict(older).gpus == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"preset 'bad': gpus must be a positive integer"):
            load_presets({"bad": {"gpus": bad, "evaluators": [{"backend": "probes"}]}})
