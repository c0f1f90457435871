"""The scheduler: journal rows through the schedule entries -> which jobs start on the free slots, which
`latest` skips, and why the others wait."""

from pathlib import Path

from watcher.config import ScheduleEntry
from watcher.journal import Checkpoint, Job
from watcher.scheduler import RunQueue, plan, wanted_jobs


def _ckpt(step, gone=False):
    return Checkpoint(step, f"checkpoint-{step}", step, 1, Path("/x"), "fp", "hf", ("regular", "ema"), gone)


def _job(job_id, step, variant="regular", preset="smoke", next_attempt_at=0.0):
    return Job(job_id, "pending", variant, preset, 0, next_attempt_at, None, _ckpt(step))


def _entry(preset="smoke", policy="all", **more):
    return ScheduleEntry(preset, policy=policy, variants=("regular", "ema"), **more)


def _plan(pending, entries, free=1, settling=(), steps=None, gpus=None, now=100.0):
    steps = steps if steps is not None else sorted({j.checkpoint.step for j in pending})
    queue = RunQueue("run", [_ckpt(s) for s in steps], pending, None, settling)
    return plan([queue], entries, now, free, lambda preset: (gpus or {}).get(preset, 1), None)


def _ids(pairs):
    return [job.id for _, job, *_ in pairs]


def test_all_runs_in_step_order_regular_before_ema_on_as_many_slots_as_are_free():
    jobs = [_job(1, 30, "ema"), _job(2, 10, "ema"), _job(3, 10, "regular"), _job(4, 20)]
    assert _ids(_plan(jobs, [_entry()], free=1).start) == [3]
    decided = _plan(jobs, [_entry()], free=3)
    assert _ids(decided.start) == [3, 2, 4]
    assert decided.waiting == [("run", jobs[0], "no free slot")] and decided.blocked == ("run", jobs[0], 1)


def test_all_waits_for_backoff():
    assert _plan([_job(1, 10, next_attempt_at=200)], [_entry()]).start == []
    decided = _plan([_job(1, 10, next_attempt_at=200), _job(2, 20)], [_entry()])
    assert _ids(decided.start) == [2] and decided.waiting[0][2] == "retry in 100 s"


def test_latest_runs_the_newest_and_skips_the_overtaken():
    decided = _plan([_job(1, 10), _job(2, 20), _job(3, 30, "ema"), _job(4, 30)], [_entry(policy="latest")])
    assert _ids(decided.start) == [4]
    assert sorted(_ids(decided.skip)) == [1, 2]
    assert {why for *_, why in decided.skip} == {"policy latest: overtaken by step 30"}


def test_latest_never_skips_the_newest_even_while_it_waits_for_a_retry():
    decided = _plan([_job(1, 10), _job(2, 20, next_attempt_at=200)], [_entry(policy="latest")])
    assert decided.start == [] and _ids(decided.skip) == [1]


def test_latest_waits_while_a_newer_checkpoint_settles():
    pending = [_job(1, 10), _job(2, 20)]
    decided = _plan(pending, [_entry(policy="latest")], settling=[30])
    assert decided.start == []  # seconds from admission, the settling one would overtake whatever started now
    assert "settle" in decided.waiting[0][2]
    assert _ids(_plan(pending, [_entry()], settling=[30]).start) == [1]  # `all` never waits


def test_latest_is_per_entry_and_a_deleted_newest_overtakes_nothing():
    entries = [_entry("quick", policy="latest"), _entry("full", policy="all")]
    jobs = [_job(1, 10, preset="quick"), _job(2, 10, preset="full"), _job(3, 20, preset="quick")]
    decided = _plan(jobs, entries, free=2)
    assert _ids(decided.skip) == [1]  # quick's older job only; full evaluates everything
    assert _ids(decided.start) == [3, 2]  # latest entries' jobs before the backlog at equal priority
    queue = RunQueue("run", [_ckpt(10), _ckpt(20, gone=True)], [_job(1, 10)], None, ())
    kept = plan([queue], [_entry(policy="latest")], 100.0, 1, lambda p: 1, None)
    assert kept.skip == [] and _ids(kept.start) == [1]


def test_a_pair_job_is_not_overtaken_by_single_ones_and_lower_priority_says_so():
    entries = [_entry("full", priority=5), _entry("quick")]
    jobs = [_job(1, 10, preset="full"), _job(2, 10, preset="quick"), _job(3, 20, preset="quick")]
    decided = _plan(jobs, entries, free=1, gpus={"full": 2})
    assert decided.start == []
    assert [why for *_, why in decided.waiting] == ["no free slot", "lower priority", "lower priority"]


def test_jobs_of_a_preset_no_entry_names_wait():
    assert _plan([_job(1, 10, preset="old")], [_entry("new")]).start == []


def test_wanted_jobs_skip_deleted_checkpoints_but_count_them():
    checkpoints = [_ckpt(10, gone=True), _ckpt(20), _ckpt(30)]
    found = wanted_jobs([ScheduleEntry("s", every=2, variants=("regular",))], checkpoints, None)
    assert [(c.step, v, p) for c, v, p in found] == [(30, "regular", "s")]  # 10 was the 1st, 30 the 3rd
