"""Scheduling: which pending job runs next, and which ones a policy skips.

Pure functions over journal rows, so the policy is easy to test and to read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from watcher.journal import Job


@dataclass(frozen=True)
class Decision:
    run: Job | None  # the job to start now, if any
    skip: tuple[Job, ...] = ()  # jobs the policy gives up on (policy `latest` only)


def _order(job: Job) -> tuple:
    # Regular weights before EMA within a checkpoint: the curve people look at first.
    return (job.checkpoint.step, job.checkpoint.generation, 0 if job.variant == "regular" else 1)


def decide(pending: list[Job], policy: str, now: float, settling_steps: Iterable[int] = ()) -> Decision:
    """Pick the next job among pending ones.

    `all`: the lowest step whose retry time has come. `latest`: the newest checkpoint only; pending jobs of
    older checkpoints are skipped. The newest checkpoint, and so a run's final checkpoint, is never skipped,
    even while one of its jobs waits for a retry. `settling_steps`: steps of complete checkpoints still inside
    their settle window; under `latest`, a newer one of them means nothing starts (and nothing is skipped yet):
    it is seconds from admission and would overtake whatever started now.
    """
    if not pending:
        return Decision(None)
    ready = sorted((j for j in pending if j.next_attempt_at <= now), key=_order)
    if policy == "all":
        return Decision(ready[0] if ready else None)
    newest_step = max(j.checkpoint.step for j in pending)
    if any(step > newest_step for step in settling_steps):
        return Decision(None)
    overtaken = tuple(j for j in pending if j.checkpoint.step < newest_step)
    newest_ready = [j for j in ready if j.checkpoint.step == newest_step]
    return Decision(newest_ready[0] if newest_ready else None, overtaken)
