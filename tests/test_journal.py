"""Journal state machine: every transition, crash recovery, generations, the outbox."""

from pathlib import Path

import pytest

from watcher.journal import Journal
from watcher.records import JobState, Result


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def _add(journal, name="checkpoint-10", step=10, fp="fp1", variants=("regular",)):
    ckpt = journal.add_checkpoint(name, step, Path("/x") / name, fp, "hf", variants)
    journal.ensure_jobs((ckpt, v, "smoke") for v in variants)
    return ckpt


def _record(job_id, status="ok", rid=None, error=None):
    return Result(result_id=rid or f"r{job_id}", step=10, checkpoint="checkpoint-10", variant="regular", preset="smoke",
                  status=status, metrics={"a/acc": 0.5}, error=error)  # fmt: skip


def test_a_new_checkpoint_gets_one_pending_job_per_variant(journal):
    _add(journal, variants=("regular", "ema"))
    jobs = journal.jobs("smoke")
    assert [(j.variant, j.state, j.attempts) for j in jobs] == [("regular", "pending", 0), ("ema", "pending", 0)]
    # ensure_jobs is idempotent
    journal.ensure_jobs((journal.present_checkpoints()[0], v, "smoke") for v in ("regular", "ema"))
    assert len(journal.jobs("smoke")) == 2


def test_happy_path_commits_the_result_before_delivery(journal):
    _add(journal)
    job = journal.jobs("smoke")[0]
    journal.start(job)
    assert journal.job(job.id).state == "preparing" and journal.job(job.id).attempts == 1
    journal.set_stage(job.id, JobState.EVALUATING)
    assert journal.job(job.id).state == "evaluating"
    assert journal.finish(job.id, _record(job.id))
    assert journal.job(job.id).state == "done"
    assert [r.result_id for r in journal.undelivered("files")] == [f"r{job.id}"]
    journal.mark_delivered(f"r{job.id}", "files")
    assert journal.undelivered("files") == []
    assert [r.result_id for r in journal.undelivered("wandb")] == [f"r{job.id}"]  # per-sink state


def test_interrupted_jobs_are_pending_again_and_the_attempt_does_not_count(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    _add(journal)
    job = journal.jobs("smoke")[0]
    journal.start(job)
    journal.set_stage(job.id, JobState.EVALUATING)
    journal.close()  # as if SIGKILLed: nothing else happened
    reopened = Journal(path)
    assert reopened.recover_interrupted() == 1
    again = reopened.job(job.id)
    assert (again.state, again.attempts) == ("pending", 0)
    assert "interrupted" in again.error
    reopened.close()


def test_failed_attempt_waits_for_its_backoff_then_final_failure_is_recorded(journal):
    _add(journal)
    job = journal.jobs("smoke")[0]
    journal.start(job)
    journal.retry_later(job.id, "boom", delay=60)
    waiting = journal.job(job.id)
    assert waiting.state == "pending" and waiting.error == "boom" and waiting.next_attempt_at > 0
    journal.start(job)
    assert journal.finish(job.id, _record(job.id, status="failed", error="boom again"))
    final = journal.job(job.id)
    assert (final.state, final.attempts, final.error) == ("failed", 2, "boom again")
    assert journal.requeue("smoke", [JobState.FAILED]) == 1
    assert journal.job(job.id).state == "pending" and journal.job(job.id).attempts == 0


def test_a_resave_is_a_new_generation_and_retires_the_old_ones_unfinished_jobs(journal):
    first = _add(journal, variants=("regular", "ema"))
    regular, ema = journal.jobs("smoke")
    journal.start(regular)
    journal.finish(regular.id, _record(regular.id))
    second = _add(journal, fp="fp2", variants=("regular", "ema"))
    assert second.generation == first.generation + 1
    states = {(j.checkpoint.generation, j.variant): j.state for j in journal.jobs("smoke")}
    assert states == {(1, "regular"): "done", (1, "ema"): "gone", (2, "regular"): "pending", (2, "ema"): "pending"}
    assert [c.generation for c in journal.present_checkpoints()] == [2]


def test_gone_checkpoint_keeps_finished_results_and_a_running_job_cannot_finish(journal):
    ckpt = _add(journal, variants=("regular", "ema"))
    regular, ema = journal.jobs("smoke")
    journal.start(regular)
    journal.finish(regular.id, _record(regular.id))
    journal.start(ema)
    journal.mark_gone(ckpt.id)
    assert journal.job(regular.id).state == "done"
    assert journal.job(ema.id).state == "gone"
    assert not journal.finish(ema.id, _record(ema.id))  # nothing committed for a vanished checkpoint
    assert [r.result_id for r in journal.results()] == [f"r{regular.id}"]


def test_skip_only_touches_pending_jobs(journal):
    _add(journal, "checkpoint-10", 10)
    _add(journal, "checkpoint-20", 20, fp="x")
    a, b = journal.jobs("smoke")
    journal.start(b)
    journal.skip([a.id, b.id], "overtaken")
    assert journal.job(a.id).state == "skipped"
    assert journal.job(b.id).state == "preparing"


def test_start_returns_the_job_as_written_and_only_a_pending_one_starts(journal):
    _add(journal)
    job = journal.jobs("smoke")[0]
    started = journal.start(job)
    assert (started.state, started.attempts) == (JobState.PREPARING, 1) and started == journal.job(job.id)
    assert journal.start(job) is None  # no longer pending


def test_results_are_typed_and_keep_what_was_committed(journal):
    _add(journal)
    job = journal.jobs("smoke")[0]
    journal.start(job)
    result = Result.from_dict({**_record(job.id).to_dict(), "from_a_newer_version": 1})
    assert journal.finish(job.id, result)
    assert journal.results() == [result] and journal.undelivered("files") == [result]


def test_checkpoint_progress_is_journaled_and_an_older_journal_gains_the_column(tmp_path):
    import sqlite3

    from watcher.journal import _SCHEMA

    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA.replace("    progress     TEXT,", "--"))  # a journal of a version without progress
    old.execute("INSERT INTO checkpoints (name, step, generation, path, fingerprint, layout, variants, completed_at)"
                " VALUES ('checkpoint-5', 5, 1, '/x/checkpoint-5', 'fp', 'hf', '[\"regular\"]', 0)")  # fmt: skip
    old.commit()
    old.close()
    journal = Journal(path)
    assert journal.present_checkpoints()[0].progress == {}
    added = journal.add_checkpoint("checkpoint-10", 10, Path("/x/checkpoint-10"), "fp", "hf", ("regular",),
                                   {"train/epoch": 1.5})
    assert added.progress == {"train/epoch": 1.5}
    assert [c.progress for c in journal.present_checkpoints()] == [{}, {"train/epoch": 1.5}]
    # The older row is read from its folder once at the next start (Daemon.run); new rows never need that.
    assert [c.name for c in journal.checkpoints_without_progress()] == ["checkpoint-5"]
    journal.set_progress(journal.present_checkpoints()[0].id, {"train/epoch": 0.5})
    assert journal.checkpoints_without_progress() == []
    assert journal.present_checkpoints()[0].progress == {"train/epoch": 0.5}
    journal.close()
