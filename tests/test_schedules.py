"""Schedules as pure functions: which (checkpoint, variant, preset) jobs the entries want, which `latest` skips,
the start order, and round-robin over several runs."""

from __future__ import annotations

from watcher.config import ScheduleEntry
from watcher.schedules import (CheckpointView, JobKey, PendingJob, final_checkpoint, order, overtaken,
                               round_robin, take_while_fits, wanted)  # fmt: skip


def _checkpoints(*steps: int, variants=("regular",)) -> list[CheckpointView]:
    return [CheckpointView(step, f"checkpoint-{step}", variants) for step in steps]


def _entry(preset: str, **kwargs) -> ScheduleEntry:
    kwargs.setdefault("policy", "all")
    kwargs.setdefault("variants", ("regular", "ema"))
    return ScheduleEntry(preset, **kwargs)


def _pairs(jobs) -> set[tuple[int, str]]:
    return {(key.step, key.preset) for key in jobs}


def test_every_two_and_a_final_entry_want_exactly_these_jobs():
    entries = [_entry("30s"), _entry("5min", every=2), _entry("full", final=True)]
    checkpoints = _checkpoints(500, 100, 200, 300, 400)  # in any order: sorted by step
    running = wanted(entries, checkpoints, final_step=None)
    assert _pairs(running) == {(s, "30s") for s in (100, 200, 300, 400, 500)} | {(100, "5min"), (300, "5min"),
                                                                                 (500, "5min")}  # fmt: skip
    finished = wanted(entries, checkpoints, final_step=500)
    assert _pairs(finished) == _pairs(running) | {(500, "full")}
    assert finished[JobKey(500, "regular", "full")] == (2,)
    assert wanted([_entry("x", every=1)], checkpoints, None).keys() == wanted([_entry("x")], checkpoints, None).keys()


def test_every_steps_takes_the_first_checkpoint_at_or_after_each_multiple():
    entries = [_entry("5min", every_steps=1000)]
    assert _pairs(wanted(entries, _checkpoints(0, 500, 1000, 1500, 2000), None)) == {(1000, "5min"), (2000, "5min")}
    # Saves every 700 steps: 1400 is the first at/after 1000, 2100 after 2000, 3500 after 3000 (2800 is not).
    uneven = _checkpoints(700, 1400, 2100, 2800, 3500)
    assert _pairs(wanted(entries, uneven, None)) == {(1400, "5min"), (2100, "5min"), (3500, "5min")}


def test_an_entry_evaluates_its_variants_where_the_checkpoint_has_them():
    entries = [_entry("30s"), _entry("full", variants=("ema",), final=True)]
    jobs = wanted(entries, _checkpoints(10, 20, variants=("regular", "ema")), final_step=20)
    assert set(jobs) == {JobKey(10, "regular", "30s"), JobKey(10, "ema", "30s"), JobKey(20, "regular", "30s"),
                         JobKey(20, "ema", "30s"), JobKey(20, "ema", "full")}  # fmt: skip
    assert JobKey(10, "ema", "30s") not in wanted(entries, _checkpoints(10), None)  # no EMA weights there


def test_two_entries_wanting_the_same_job_make_one_job():
    entries = [_entry("full", every=4), _entry("full", final=True, priority=5)]
    jobs = wanted(entries, _checkpoints(100, 200, 300, 400, 500), final_step=500)
    assert jobs[JobKey(500, "regular", "full")] == (0, 1) and jobs[JobKey(100, "regular", "full")] == (0,)


def test_the_final_checkpoint_is_known_once_the_run_finished_and_nothing_still_settles():
    assert final_checkpoint([100, 200], None, settling=False) is None
    assert final_checkpoint([100, 200], 200, settling=True) == 200  # the save at the last step is there
    assert final_checkpoint([100, 200], 250, settling=True) is None  # the last save may still be settling
    assert final_checkpoint([100, 200], 250, settling=False) == 200  # no save at the very end


def _job(job_id: int, step: int, preset: str, entries: tuple[int, ...], variant: str = "regular",
         run: str = "", next_attempt_at: float = 0.0) -> PendingJob:  # fmt: skip
    return PendingJob(job_id, step, 1, variant, preset, next_attempt_at, entries, run)


def test_latest_skips_per_entry_never_the_newest_nor_the_final():
    entries = [_entry("30s", policy="latest"), _entry("5min", every=2, policy="all"),
               _entry("full", final=True, policy="latest")]  # fmt: skip
    checkpoints = _checkpoints(100, 200, 300)
    jobs = wanted(entries, checkpoints, final_step=300)
    pending = [_job(1, 100, "30s", (0,)), _job(2, 200, "30s", (0,)), _job(3, 300, "30s", (0,)),
               _job(4, 100, "5min", (1,)), _job(5, 300, "5min", (1,)), _job(6, 300, "full", (2,))]  # fmt: skip
    assert [job.job_id for job in overtaken(pending, entries, jobs, final_step=300)] == [1, 2]
    # A job that an `all` entry also wants is kept.
    both = [_entry("30s", policy="latest"), _entry("30s", every=2, policy="all")]
    both_jobs = wanted(both, checkpoints, None)
    shared = [_job(1, 100, "30s", both_jobs[JobKey(100, "regular", "30s")]), _job(2, 200, "30s", (0,))]
    assert [job.job_id for job in overtaken(shared, both, both_jobs)] == [2]


def test_higher_priority_first_then_newest_under_latest_oldest_under_all():
    entries = [_entry("30s", policy="all"), _entry("1min", policy="latest"), _entry("full", final=True, priority=5)]
    pending = [_job(1, 100, "30s", (0,)), _job(2, 200, "30s", (0,)), _job(3, 100, "1min", (1,)),
               _job(4, 200, "1min", (1,)), _job(5, 200, "full", (2,)), _job(6, 100, "30s", (0,), "ema"),
               _job(7, 50, "30s", (0,), next_attempt_at=1000.0)]  # fmt: skip
    assert [job.job_id for job in order(pending, entries, now=10.0)] == [5, 4, 3, 1, 6, 2]
    assert [job.job_id for job in order(pending, entries, now=1000.0)][3] == 7  # its retry time has come


def test_runs_take_turns_at_equal_priority_and_priority_still_wins():
    entries = [_entry("30s"), _entry("full", priority=5)]
    queues = {"run-a": [_job(1, 100, "30s", (0,), run="run-a"), _job(2, 200, "30s", (0,), run="run-a"),
                        _job(3, 300, "30s", (0,), run="run-a")],
              "run-b": [_job(4, 10, "full", (1,), run="run-b"), _job(5, 10, "30s", (0,), run="run-b")],
              "run-c": [_job(6, 7, "30s", (0,), run="run-c")]}  # fmt: skip
    assert [job.job_id for job in round_robin(queues, entries)] == [4, 6, 1, 5, 2, 3]  # b: priority
    # The daemon last started a job of run-a: run-b's turn comes first at equal priority.
    del queues["run-b"][0]
    assert [job.job_id for job in round_robin(queues, entries, after="run-a")] == [5, 6, 1, 2, 3]
    assert round_robin({}, entries) == []


def test_jobs_start_in_order_while_they_fit_and_a_waiting_pair_is_not_overtaken():
    ordered = [_job(1, 100, "30s", ()), _job(2, 100, "pair", ()), _job(3, 200, "30s", ())]
    gpus = {"30s": 1, "pair": 2}
    assert [j.job_id for j in take_while_fits(ordered, 4, lambda j: gpus[j.preset])] == [1, 2, 3]
    assert [j.job_id for j in take_while_fits(ordered, 2, lambda j: gpus[j.preset])] == [1]
    assert take_while_fits(ordered, 0, lambda j: 1) == []
