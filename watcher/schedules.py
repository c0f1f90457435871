"""Schedules: which (checkpoint, variant, preset) jobs the `[[schedule]]` entries ask for, and in what order they
start. Pure functions over small typed views, no I/O, so the rules are easy to test and to read.

- `wanted`: the jobs the entries ask for, given the run's checkpoints. An entry's conditions add up (see
  config.ScheduleEntry): `every = N` is the 1st, N+1th, 2N+1th ... checkpoint in step order (the first gives an
  early reading; `every = 1` is all); `every_steps = K` is the first checkpoint at or after each multiple of K
  (the multiples themselves when the save interval divides K); `final` is the run's last checkpoint, once the
  run is known finished (`final_checkpoint`). No condition: every checkpoint.
- `overtaken`: under `latest`, an entry's pending jobs that a newer checkpoint wanted by the same entry
  overtook. Never that entry's newest, never the final checkpoint, and a job two entries want only when both
  would skip it.
- `order`: start order of one run's ready jobs: higher priority first; within a priority, jobs of `latest`
  entries (newest first) before the backlog of `all` entries (oldest first), since `latest` says the freshest
  result matters most; regular weights before EMA.
- `round_robin`: several runs' ordered queues as one, taking turns among runs at equal priority.
- `take_while_fits`: the prefix of that order that starts now. It stops at the first job that does not fit,
  so a 2-GPU job is not starved by 1-GPU jobs behind it that keep taking each GPU as it frees up.

The checkpoints passed are the journal's (every one ever seen, also deleted ones), so the count behind `every`
stays put when a trainer rotates old checkpoints away. The integration keeps a job once it was created, even if
a checkpoint detected late (out of step order) changes which ones `every`/`every_steps` would pick now.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from watcher.config import ScheduleEntry


@dataclass(frozen=True)
class CheckpointView:
    step: int
    name: str
    variants: tuple[str, ...]  # the weight variants it holds ("regular", "ema")


@dataclass(frozen=True)
class JobKey:
    step: int
    variant: str
    preset: str


@dataclass(frozen=True)
class PendingJob:
    """A pending job as the scheduler sees it (the integration maps journal rows onto it)."""

    job_id: int
    step: int
    generation: int
    variant: str
    preset: str
    next_attempt_at: float  # Unix time before which a failed job is not retried
    entries: tuple[int, ...] = ()  # indices of the schedule entries that want it (from `wanted`)
    run: str = ""  # the run it belongs to, for `round_robin`

    @property
    def key(self) -> JobKey:
        return JobKey(self.step, self.variant, self.preset)


def final_checkpoint(steps: Iterable[int], finished_step: int | None, settling: bool) -> int | None:
    """The step of the run's final checkpoint, or None while it is not known.

    `finished_step`: the trainer's last step when the run is known finished (its run record's `state =
    finished`, or `ckpt-watch finalize`), else None. `settling`: a checkpoint folder is still being written or
    settling; it may be the final one (a trainer saves, then records that it finished), so nothing is final yet
    unless a checkpoint at exactly `finished_step` is already there.
    """
    known = sorted(set(steps))
    if finished_step is None or not known:
        return None
    if finished_step in known:
        return finished_step
    return None if settling else known[-1]  # no save at the very end: the last one the run made


def wanted(entries: Sequence[ScheduleEntry], checkpoints: Sequence[CheckpointView],
           final_step: int | None) -> dict[JobKey, tuple[int, ...]]:  # fmt: skip
    """The jobs the schedule asks for, each with the indices of the entries that ask for it."""
    ordered = sorted({c.step: c for c in checkpoints}.values(), key=lambda c: c.step)  # one per step (generations)
    found: dict[JobKey, list[int]] = defaultdict(list)
    for number, entry in enumerate(entries):
        for checkpoint in _chosen(entry, ordered, final_step):
            for variant in checkpoint.variants:
                if entry.variants is None or variant in entry.variants:
                    found[JobKey(checkpoint.step, variant, entry.preset)].append(number)
    return {key: tuple(numbers) for key, numbers in found.items()}


def _chosen(entry: ScheduleEntry, ordered: list[CheckpointView], final_step: int | None) -> list[CheckpointView]:
    unconditional = entry.every is None and entry.every_steps is None and not entry.final
    chosen = []
    previous_step = 0
    for position, checkpoint in enumerate(ordered):
        by_count = entry.every is not None and position % entry.every == 0
        # A multiple of K in (previous checkpoint's step, this step]: the first checkpoint at or after it.
        by_steps = entry.every_steps is not None and checkpoint.step // entry.every_steps > (
            previous_step // entry.every_steps)
        is_final = entry.final and checkpoint.step == final_step
        if unconditional or by_count or by_steps or is_final:
            chosen.append(checkpoint)
        previous_step = checkpoint.step
    return chosen


def _newest_by_entry(wanted_jobs: Mapping[JobKey, tuple[int, ...]]) -> dict[int, int]:
    newest: dict[int, int] = {}
    for key, numbers in wanted_jobs.items():
        for number in numbers:
            newest[number] = max(newest.get(number, key.step), key.step)
    return newest


def overtaken(pending: Iterable[PendingJob], entries: Sequence[ScheduleEntry],
              wanted_jobs: Mapping[JobKey, tuple[int, ...]],
              final_step: int | None = None) -> list[PendingJob]:  # fmt: skip
    """The pending jobs `latest` gives up on (see the module docstring); the caller marks them skipped."""
    newest = _newest_by_entry(wanted_jobs)

    def skips(job: PendingJob, number: int) -> bool:
        entry = entries[number]
        return entry.policy == "latest" and job.step < newest.get(number, job.step)

    return [job for job in pending
            if job.entries and job.step != final_step and all(skips(job, n) for n in job.entries)]  # fmt: skip


def priority(job: PendingJob, entries: Sequence[ScheduleEntry]) -> int:
    """The highest priority of the entries that want it; 0 for a job no entry wants any more (a reload removed
    its entry: it still runs, as it would have, at the default priority)."""
    return max((entries[n].priority for n in job.entries), default=0)


def is_latest(job: PendingJob, entries: Sequence[ScheduleEntry]) -> bool:
    return bool(job.entries) and all(entries[n].policy == "latest" for n in job.entries)


def _start_key(job: PendingJob, entries: Sequence[ScheduleEntry]) -> tuple:
    latest = is_latest(job, entries)
    newest_first = -1 if latest else 1
    return (-priority(job, entries), 0 if latest else 1, newest_first * job.step, newest_first * job.generation,
            0 if job.variant == "regular" else 1, job.preset, job.job_id)  # fmt: skip


def order(pending: Iterable[PendingJob], entries: Sequence[ScheduleEntry], now: float) -> list[PendingJob]:
    """One run's jobs whose retry time has come, in start order (see the module docstring)."""
    return sorted((job for job in pending if job.next_attempt_at <= now), key=lambda job: _start_key(job, entries))


def round_robin(queues: Mapping[str, Sequence[PendingJob]], entries: Sequence[ScheduleEntry],
                after: str | None = None) -> list[PendingJob]:  # fmt: skip
    """Several runs' queues (each in `order`) as one start order: always the highest priority among the runs'
    next jobs; among runs whose next job has that priority, the runs take turns in name order, beginning with
    the run after `after` (the run of the last job started, which the daemon remembers across ticks)."""
    runs = sorted(queues)
    heads = {run: 0 for run in runs}
    turn = (runs.index(after) + 1) % len(runs) if after in runs else 0
    merged: list[PendingJob] = []
    while True:
        waiting = [run for run in runs[turn:] + runs[:turn] if heads[run] < len(queues[run])]
        if not waiting:
            return merged
        best = max(priority(queues[run][heads[run]], entries) for run in waiting)
        run = next(r for r in waiting if priority(queues[r][heads[r]], entries) == best)
        merged.append(queues[run][heads[run]])
        heads[run] += 1
        turn = (runs.index(run) + 1) % len(runs)


def take_while_fits(ordered: Sequence[PendingJob], free_slots: int,
                    slots_of: Callable[[PendingJob], int]) -> list[PendingJob]:  # fmt: skip
    """The jobs to start now: from the front while the free slots last, stopping at the first that does not fit
    (no job overtakes a bigger one waiting for its GPUs). `slots_of`: GPUs a job takes (1 in a cpu pool); a
    job larger than the whole pool is the caller's to fail at start (Pool.fits)."""
    starting = []
    for job in ordered:
        needed = slots_of(job)
        if needed > free_slots:
            break
        starting.append(job)
        free_slots -= needed
    return starting
