"""A job's Result: built from the journal's facts and the worker's Outcome, never from the checkpoint folder."""

from datetime import datetime
from pathlib import Path

from watcher.journal import Journal
from watcher.recording import build_result
from watcher.records import Outcome, OutcomeKind, Result


def test_a_result_carries_the_journaled_progress_and_millisecond_times(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    checkpoint = journal.add_checkpoint("checkpoint-10", 10, tmp_path / "gone-already", "fp", "dcp", ("regular",),
                                        {"train/epoch": 0.5, "train/tokens": 1024.0})  # fmt: skip
    journal.ensure_jobs((checkpoint, v, "smoke") for v in ("regular",))
    job = journal.start(journal.jobs("smoke")[0])
    outcome = Outcome(OutcomeKind.OK, metrics={"arc/acc": 0.25}, versions={"lm_eval": "0.4"})
    result = build_result(job, outcome, attempt=job.attempts, started=1_700_000_000.1234, device="cpu",
                          cuda_visible_devices="", log_file="checkpoint-10/regular/smoke.log")  # fmt: skip
    # The folder does not exist: progress comes from the journal, as detection read it.
    assert result.progress == {"train/epoch": 0.5, "train/tokens": 1024.0}
    assert (result.status, result.layout, result.attempt, result.metrics) == ("ok", "dcp", 1, {"arc/acc": 0.25})
    assert result.started_at == "2023-11-14T22:13:20.123+00:00"
    assert datetime.fromisoformat(result.finished_at) >= datetime.fromisoformat(result.started_at)
    assert "ckpt_watch" in result.versions and result.versions["lm_eval"] == "0.4"
    assert journal.finish(job.id, result) and journal.results() == [result]
    failed = build_result(job, Outcome.failure("boom", OutcomeKind.PERMANENT), attempt=2, started=0.0, device="cpu",
                          cuda_visible_devices="", log_file="x.log")  # fmt: skip
    assert (failed.status, failed.error, failed.ok) == ("failed", "boom", False)
    assert Result.from_dict(failed.to_dict()) == failed
    journal.close()
    assert not Path(tmp_path / "gone-already").exists()
