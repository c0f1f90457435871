"""Scheduling: the journal's jobs seen through the `[[schedule]]` entries, and which of them start now.

The rules themselves are pure functions in watcher/schedules.py (which checkpoints an entry wants, `latest`
skipping per entry, start order, round-robin over runs, no overtaking of a bigger job); this module maps the
journal's rows onto them and back, and says why each job that does not start waits. No I/O: the daemon gives it
each run's journaled checkpoints and pending jobs, and the number of free slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from watcher.config import ScheduleEntry
from watcher.journal import Checkpoint, Job
from watcher.schedules import (CheckpointView, JobKey, PendingJob, is_latest, order, overtaken, priority,
                               round_robin, take_while_fits, wanted)  # fmt: skip


@dataclass(frozen=True)
class RunQueue:
    """One run as the scheduler sees it."""

    run: str  # the run's name (unique among the daemon's runs)
    checkpoints: Sequence[Checkpoint]  # every journaled checkpoint, deleted ones too (`every` counts them)
    pending: Sequence[Job]  # its pending jobs
    final_step: int | None = None  # the step of its final checkpoint, once known (schedules.final_checkpoint)
    settling_steps: Sequence[int] = ()  # complete checkpoints still inside their settle window
    queued: Sequence[Job] = ()  # jobs handed out but not yet begun (Slurm jobs still in Slurm's queue)


@dataclass
class Plan:
    """What to do now: jobs to start (in order, with their run), jobs `latest` gives up on, and why the others
    wait (for the log and `status`)."""

    start: list[tuple[str, Job]] = field(default_factory=list)
    skip: list[tuple[str, Job, str]] = field(default_factory=list)  # (run, job, reason)
    cancel: list[tuple[str, Job, str]] = field(default_factory=list)  # queued jobs `latest` gives up on, likewise
    waiting: list[tuple[str, Job, str]] = field(default_factory=list)  # (run, job, why), in start order
    # The first job that found too few free slots and how many it needs: the caller words why once this round's
    # starts hold their slots (the pool's reason, e.g. "no free slot: needs 2 GPUs, cuda:1 busy: ...").
    blocked: tuple[str, Job, int] | None = None


def wanted_jobs(entries: Sequence[ScheduleEntry], checkpoints: Sequence[Checkpoint],
                final_step: int | None) -> list[tuple[Checkpoint, str, str]]:  # fmt: skip
    """The (checkpoint, variant, preset) jobs the schedule asks for among the present checkpoints (a deleted
    checkpoint still counts for `every`, but gets no job)."""
    present = {c.step: c for c in checkpoints if not c.gone}  # the newest generation of each step
    found = []
    for key in wanted(entries, _views(checkpoints), final_step):
        checkpoint = present.get(key.step)
        if checkpoint is not None and key.variant in checkpoint.variants:
            found.append((checkpoint, key.variant, key.preset))
    return found


def plan(queues: Sequence[RunQueue], entries: Sequence[ScheduleEntry], now: float, free_slots: int,
         gpus_of: Callable[[str], int], after: str | None = None) -> Plan:  # fmt: skip
    """Decide the next starts. `gpus_of(preset)`: slots one job of it takes (1 in a cpu pool); `after`: the run
    that started the last job (round-robin goes on from the next one)."""
    result = Plan()
    known = {entry.preset for entry in entries}
    by_id: dict[tuple[str, int], Job] = {}
    ready: dict[str, list[PendingJob]] = {}
    for queue in queues:
        wanted_keys = wanted(entries, _views(queue.checkpoints), queue.final_step)
        present_steps = {c.step for c in queue.checkpoints if not c.gone}
        # A deleted newest checkpoint overtakes nothing: `latest` compares with what can still run.
        wanted_present = {key: numbers for key, numbers in wanted_keys.items() if key.step in present_steps}
        pending, queued = [], []
        for job in [*queue.pending, *queue.queued]:
            if job.preset not in known:  # a reload removed its entry: it waits until one names the preset again
                continue
            by_id[(queue.run, job.id)] = job
            key = JobKey(job.checkpoint.step, job.variant, job.preset)
            (queued if job in queue.queued else pending).append(
                PendingJob(job.id, job.checkpoint.step, job.checkpoint.generation, job.variant, job.preset,
                           job.next_attempt_at, wanted_keys.get(key, ()), queue.run))  # fmt: skip
        skipped = {p.job_id for p in overtaken([*pending, *queued], entries, wanted_present, queue.final_step)}
        for p in [*pending, *queued]:
            if p.job_id in skipped:
                newest = max(k.step for k, numbers in wanted_present.items() if set(numbers) & set(p.entries))
                (result.cancel if p in queued else result.skip).append(
                    (queue.run, by_id[(queue.run, p.job_id)], f"policy latest: overtaken by step {newest}"))  # fmt: skip
        runnable = []
        for p in pending:
            if p.job_id in skipped:
                continue
            newer_settling = [s for s in queue.settling_steps if s > p.step]
            if newer_settling and is_latest(p, entries):
                # Seconds from admission, it would overtake whatever started now.
                result.waiting.append((queue.run, by_id[(queue.run, p.job_id)],
                                       f"settle: a newer checkpoint (step {max(newer_settling)}) is settling"))  # fmt: skip
            elif p.next_attempt_at > now:
                result.waiting.append((queue.run, by_id[(queue.run, p.job_id)],
                                       f"retry in {p.next_attempt_at - now:.0f} s"))  # fmt: skip
            else:
                runnable.append(p)
        ready[queue.run] = order(runnable, entries, now)
    merged = round_robin(ready, entries, after) if ready else []
    starting = take_while_fits(merged, free_slots, lambda p: gpus_of(p.preset))
    result.start = [(p.run, by_id[(p.run, p.job_id)]) for p in starting]
    blocked = merged[len(starting):]
    if blocked:
        head = blocked[0]
        result.blocked = (head.run, by_id[(head.run, head.job_id)], gpus_of(head.preset))
        result.waiting.insert(0, (head.run, by_id[(head.run, head.job_id)], "no free slot"))
        head_priority = priority(head, entries)
        for p in blocked[1:]:
            why = ("lower priority" if priority(p, entries) < head_priority
                   else f"queued behind {by_id[(head.run, head.job_id)].label}")  # fmt: skip
            result.waiting.append((p.run, by_id[(p.run, p.job_id)], why))
    return result


def _views(checkpoints: Sequence[Checkpoint]) -> list[CheckpointView]:
    return [CheckpointView(c.step, c.name, c.variants) for c in checkpoints]
