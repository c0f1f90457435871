"""What the daemon shows of itself: its state as a `Snapshot` for the live view (plain data, see
watcher/live_view.py), and as one status line for systemd.

Kept apart from the daemon's loop (which asks for a snapshot at most 4 times a second, and only with a view) and
from the view (which knows nothing of jobs or the journal).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

from watcher.jobs import RunningJob
from watcher.journal import Job, Journal
from watcher.live_view import ResultRow, RunningView, Snapshot
from watcher.metrics import headline_metrics
from watcher.outbox import Outbox
from watcher.pool import SlotState
from watcher.records import Result

RECENT_RESULTS = 8  # rows in the live view's results table


@dataclass(frozen=True)
class ActiveView:
    """A running job as the view and the status line see it."""

    running: RunningJob
    slot: str  # "cuda:1", "cpu"
    run: str  # the run's name


class ViewFeed:
    def __init__(self, journal: Journal):
        self._journal = journal
        self._recent: deque[Result] | None = None  # the latest results (read from the journal at the first snapshot)

    def add(self, result: Result) -> None:
        """A result the daemon has just committed (the journal is not read again for it)."""
        if self._recent is not None:
            self._recent.append(result)

    def snapshot(self, header: Snapshot, pending: list[Job], active: Sequence[ActiveView], outbox: Outbox,
                 stopping: bool, idle_text: str | None, slots: Sequence[SlotState] = (),
                 waiting: Sequence[tuple[str, Job, str]] = ()) -> Snapshot:  # fmt: skip
        """`header` with the rest filled in. `header`: what is watched and how (its first fields, the view's
        header); `idle_text`: what to say while no job runs (None: the view's default)."""
        if self._recent is None:
            self._recent = deque(self._journal.results()[-RECENT_RESULTS:], maxlen=RECENT_RESULTS)
        recent = list(self._recent)
        names = {m for r in recent if r.ok for m in r.metrics}
        headlines = headline_metrics(names, fallback=4)
        rows = [ResultRow(step=r.step, checkpoint=r.checkpoint, variant=r.variant, preset=r.preset, status=r.status,
                          walltime_s=float(r.walltime_s or 0.0),
                          metrics={k: v for k, v in r.metrics.items() if k in headlines}, error=r.error)
                for r in recent]  # fmt: skip
        pending = sorted(pending, key=lambda j: (j.checkpoint.step, j.variant))
        return replace(
            header,
            queue=[(j.checkpoint.name, j.variant, j.preset) for j in pending],
            running=[_running_view(a) for a in active],
            slots=[(slot.name, slot.busy) for slot in slots],
            waiting=[f"{job.checkpoint.name}/{job.variant}/{job.preset}: {why}" for _, job, why in waiting],
            results=rows,
            headlines=headlines,
            undelivered={sink.name: self._journal.undelivered_count(sink.name) for sink in outbox.sinks},
            undelivered_why={sink.name: outbox.waiting_reason(sink.name) for sink in outbox.sinks},
            stopping=stopping,
            idle_text=idle_text,
        )


def _running_view(active: ActiveView) -> RunningView:
    running = active.running
    job, progress = running.job, running.progress

    def number(key: str) -> int | None:
        value = progress.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return RunningView(checkpoint=job.checkpoint.name, variant=job.variant, preset=job.preset, slot=active.slot,
                       stage=running.stage,
                       started_at=running.started, done=number("done"), total=number("total"), step=number("step"),
                       steps=number("steps"),
                       backend=str(progress["backend"]) if "backend" in progress else None)  # fmt: skip


def status_line(active: Sequence[ActiveView], pending: int, stopping: bool, problem: str | None,
                watched: str) -> str:  # fmt: skip
    """What the daemon does, in one line (systemd's STATUS=, `systemctl status`)."""
    if active:
        return "; ".join(_job_text(a) for a in active) + f"; {pending} more queued"
    if stopping:
        return "stopping"
    if problem:
        return f"waiting: {problem}; {pending} queued"
    return f"idle, watching {watched}; {pending} queued"


def _job_text(active: ActiveView) -> str:
    running = active.running
    job, progress = running.job, running.progress
    detail = ""
    if progress.get("total"):
        detail = f" {100 * progress.get('done', 0) // progress['total']}%"
    elif progress.get("steps"):
        detail = f" (step {progress.get('step')} of {progress['steps']}: {progress.get('backend')})"
    return f"{running.stage}{detail} {job.checkpoint.name}/{job.variant} ({job.preset}) on {active.slot}"
