"""Scheduling policies."""

from pathlib import Path

from watcher.journal import Checkpoint, Job
from watcher.scheduler import decide


def _job(job_id, step, variant="regular", next_attempt_at=0.0):
    ckpt = Checkpoint(step, f"checkpoint-{step}", step, 1, Path("/x"), "fp", "hf", ("regular", "ema"), False)
    return Job(job_id, "pending", variant, "smoke", 0, next_attempt_at, None, ckpt)


def test_all_runs_in_step_order_regular_before_ema():
    jobs = [_job(1, 30, "ema"), _job(2, 10, "ema"), _job(3, 10, "regular"), _job(4, 20)]
    order = []
    while jobs:
        chosen = decide(jobs, "all", now=100).run
        order.append(chosen.id)
        jobs.remove(chosen)
    assert order == [3, 2, 4, 1]


def test_all_waits_for_backoff():
    assert decide([_job(1, 10, next_attempt_at=200)], "all", now=100).run is None
    assert decide([_job(1, 10, next_attempt_at=200), _job(2, 20)], "all", now=100).run.id == 2


def test_latest_runs_the_newest_and_skips_the_overtaken():
    decision = decide([_job(1, 10), _job(2, 20), _job(3, 30, "ema"), _job(4, 30)], "latest", now=100)
    assert decision.run.id == 4
    assert sorted(j.id for j in decision.skip) == [1, 2]


def test_latest_never_skips_the_newest_even_while_it_waits_for_a_retry():
    decision = decide([_job(1, 10), _job(2, 20, next_attempt_at=200)], "latest", now=100)
    assert decision.run is None
    assert [j.id for j in decision.skip] == [1]


def test_nothing_pending():
    assert decide([], "latest", now=0).run is None


def test_latest_waits_while_a_newer_checkpoint_settles():
    pending = [_job(1, 10), _job(2, 20)]
    waiting = decide(pending, "latest", now=100, settling_steps=[30])
    assert waiting.run is None and waiting.skip == ()  # nothing starts, nothing is skipped before it is admitted
    older = decide(pending, "latest", now=100, settling_steps=[20, 5])  # not newer than the newest pending
    assert older.run.id == 2 and [j.id for j in older.skip] == [1]
    assert decide(pending, "all", now=100, settling_steps=[30]).run.id == 1  # `all` never waits
