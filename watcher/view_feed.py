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
from watcher.records import Result
from watcher.regressions import Regression, find_regressions

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
        # Every result of the run (the best so far of a metric may be far back), and the regressions found in
        # them for the headline metrics: computed again only when a result has been added.
        self._all: list[Result] = []
        self._regressions: tuple[tuple[int, tuple[str, ...]], dict[str, list[Regression]]] | None = None

    def add(self, result: Result) -> None:
        """A result the daemon has just committed (the journal is not read again for it)."""
        if self._recent is not None:
            self._recent.append(result)
            self._all.append(result)

    def snapshot(self, header: Snapshot, pending: list[Job], outbox: Outbox) -> Snapshot:
        """`header` (what is watched and how: the view's header) with this run's part filled in: its queue,
        latest results and deliveries. What runs share (the running jobs, slots, why jobs wait) is the
        daemon's to add."""
        if self._recent is None:
            self._all = self._journal.results()
            self._recent = deque(self._all[-RECENT_RESULTS:], maxlen=RECENT_RESULTS)
        recent = list(self._recent)
        names = {m for r in recent if r.ok for m in r.metrics}
        headlines = headline_metrics(names, fallback=4)
        regressed = self._regressions_of(headlines)
        rows = [ResultRow(step=r.step, checkpoint=r.checkpoint, variant=r.variant, preset=r.preset, status=r.status,
                          walltime_s=float(r.walltime_s or 0.0),
                          metrics={k: v for k, v in r.metrics.items() if k in headlines}, error=r.error,
                          regressions={f.metric: f.text() for f in regressed.get(r.result_id, [])})
                for r in recent]  # fmt: skip
        pending = sorted(pending, key=lambda j: (j.checkpoint.step, j.variant))
        return replace(
            header,
            queue=[(j.checkpoint.name, j.variant, j.preset) for j in pending],
            results=rows,
            headlines=headlines,
            undelivered={sink.name: self._journal.undelivered_count(sink.name) for sink in outbox.sinks},
            undelivered_why={sink.name: outbox.waiting_reason(sink.name) for sink in outbox.sinks},
        )


    def _regressions_of(self, headlines: list[str]) -> dict[str, list[Regression]]:
        """find_regressions over every result of the run, reused until a result is added (snapshots come up to 4
        times a second; results, minutes apart)."""
        key = (len(self._all), tuple(headlines))
        if self._regressions is None or self._regressions[0] != key:
            self._regressions = (key, find_regressions(self._all, headlines))
        return self._regressions[1]


def running_views(active: Sequence[ActiveView], several: bool = False) -> list[RunningView]:
    """The running jobs for the view; with several runs, checkpoints are named "run/checkpoint-N"."""
    views = [_running_view(a) for a in active]
    return [replace(v, checkpoint=f"{a.run}/{v.checkpoint}") if several else v for a, v in zip(active, views)]


def waiting_lines(waiting: Sequence[tuple[str, Job, str]], several: bool = False) -> list[str]:
    """Why queued jobs wait, one line each: "[run/]checkpoint-20/regular/full: lower priority"."""
    return [f"{run + '/' if several else ''}{job.label}: {why}" for run, job, why in waiting]


def merge_snapshots(header: Snapshot, parts: Sequence[Snapshot], runs: Sequence[str]) -> Snapshot:
    """Several runs' snapshots as one: queues and the latest results together (named by run when several),
    undelivered results summed per sink."""
    if len(parts) == 1:
        return parts[0]
    queue = [(f"{run}/{name}", variant, preset) for run, part in zip(runs, parts) for name, variant, preset in part.queue]
    results = [replace(row, run=run) for run, part in zip(runs, parts) for row in part.results]
    undelivered: dict[str, int] = {}
    why: dict[str, str] = {}
    for part in parts:
        for sink, count in part.undelivered.items():
            undelivered[sink] = undelivered.get(sink, 0) + count
            why[sink] = why.get(sink) or part.undelivered_why.get(sink, "")
    headlines = list(dict.fromkeys(h for part in parts for h in part.headlines))[:4]
    return replace(header, queue=queue, results=results[-RECENT_RESULTS:], headlines=headlines,
                   undelivered=undelivered, undelivered_why=why)


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
