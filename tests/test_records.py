"""The records between stages: JSON round trips, tolerance of older and newer records, states."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.records import (EvaluatorStep, JobSpec, JobState, Outcome, OutcomeKind, Preset, Result,
                             iso_time)  # fmt: skip


def _spec(tmp_path: Path) -> JobSpec:
    preset = Preset("smoke", "tiny", 60.0, (EvaluatorStep("probes", {"probes": ["params"]}),))
    return JobSpec(job_id=7, checkpoint_name="checkpoint-20", checkpoint_path=tmp_path / "checkpoint-20", step=20,
                   generation=2, layout="hf-trainer-fsdp", variants=("regular", "ema"), variant="ema",
                   preset=preset, devices=("cuda:0", "cuda:1"), base_model=None, scratch_dir=tmp_path / "s",
                   outcome_path=tmp_path / "outcome.json", parent_pid=1234)  # fmt: skip


def test_job_spec_round_trips_through_its_file(tmp_path):
    spec = _spec(tmp_path)
    spec.write(tmp_path / "spec.json")
    assert JobSpec.read(tmp_path / "spec.json") == spec
    assert spec.device == "cuda:0,1"


def test_outcome_round_trip_and_kinds(tmp_path):
    outcome = Outcome(OutcomeKind.OK, metrics={"a/b": 0.5}, stages={"prepare": {"walltime_s": 1.0}})
    outcome.write(tmp_path / "o.json")
    assert Outcome.read(tmp_path / "o.json") == outcome
    assert outcome.ok and not Outcome.failure("boom").ok
    assert Outcome.failure("bad", OutcomeKind.PERMANENT).to_dict()["kind"] == "permanent"
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError):
        Outcome.read(tmp_path / "bad.json")


def test_result_keeps_unknown_fields_and_defaults_missing_ones():
    old = {"step": 5, "checkpoint": "checkpoint-5", "variant": "regular", "preset": "smoke", "status": "ok",
           "metrics": {"x": 1.0}, "from_the_future": [1, 2]}  # fmt: skip
    result = Result.from_dict(old)
    assert result.ok and result.generation == 1 and result.progress == {}
    assert result.to_dict()["from_the_future"] == [1, 2]
    assert Result.from_dict(result.to_dict()) == result
    with pytest.raises(ValueError):
        Result.from_dict({"step": "5"})


def test_states_are_their_sql_values():
    assert JobState("done") is JobState.DONE and JobState.DONE == "done"
    assert str(JobState.SKIPPED) == "skipped"


def test_times_have_milliseconds():
    assert iso_time(1.2345) == "1970-01-01T00:00:01.234+00:00"
