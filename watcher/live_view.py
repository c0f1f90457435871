"""The live view at a terminal: what is watched, the queue, the running job's stage and progress, the latest results.

The daemon hands `LiveView.update` a `Snapshot` (plain data, built by `Daemon.snapshot`) at most 4 times a second,
and only when a view is active; this module knows nothing else about the daemon. `rich.live.Live` redraws from the
newest snapshot 4 times a second in its own thread, and log records go through the same console (see
watcher/logs.py), so they scroll above the view instead of tearing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from watcher.formatting import human_bytes

REFRESH_PER_SECOND = 4


@dataclass(frozen=True)
class RunningView:
    checkpoint: str
    variant: str
    preset: str
    slot: str  # where it runs: "cuda:1", "cuda:2,3", "cpu"
    stage: str  # preparing | evaluating, or queued (a Slurm job still in Slurm's queue)
    started_at: float  # time.time() when the job started; elapsed = now - started_at
    done: int | None = None  # preparing (a merge): bytes written so far ...
    total: int | None = None  # ... of this many
    step: int | None = None  # evaluating: evaluator step (1-based) ...
    steps: int | None = None  # ... of this many
    backend: str | None = None  # the step's backend

    def elapsed(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.started_at)


@dataclass(frozen=True)
class ResultRow:
    step: int
    checkpoint: str
    variant: str
    preset: str
    status: str  # ok | failed
    walltime_s: float
    metrics: dict[str, float] = field(default_factory=dict)  # the headline metrics only
    error: str | None = None
    run: str = ""  # the run it belongs to, when the daemon watches several
    # Headline metrics significantly worse than the best earlier checkpoint: metric -> "▼ ... (p=...)" (see
    # watcher/regressions.py); the cell gets a red ▼ and the row a "regression" note
    regressions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    output_dir: str
    mode: str  # "inotify", "polling every 10 s" or "scan"
    preset: str  # the preset, or the schedule's presets ("quick, full")
    policy: str
    device: str  # the pool: "cuda:1,2,3", "cpu x2"
    queue: list[tuple[str, str, str]] = field(default_factory=list)  # pending (checkpoint, variant, preset)
    running: list[RunningView] = field(default_factory=list)  # one per job running now
    slots: list[tuple[str, str | None]] = field(default_factory=list)  # each slot of the pool: (name, busy reason)
    waiting: list[str] = field(default_factory=list)  # why queued jobs wait ("checkpoint-20/regular/full: ...")
    results: list[ResultRow] = field(default_factory=list)  # the latest few, oldest first
    headlines: list[str] = field(default_factory=list)  # metric columns of the results table
    undelivered: dict[str, int] = field(default_factory=dict)  # results a sink has not yet taken, per sink
    undelivered_why: dict[str, str] = field(default_factory=dict)  # per sink: why they wait ("" if not known)
    stopping: bool = False
    idle_text: str | None = None  # what to say while no job runs (default: waiting for a checkpoint)


class LiveView:
    """`with LiveView() as view: ... view.update(snapshot)`; `view.console` is where log records must go."""

    def __init__(self, console: Any = None):
        from rich.console import Console
        from rich.live import Live

        self.console = console if console is not None else Console()
        self._snapshot: Snapshot | None = None
        self._live = Live(console=self.console, refresh_per_second=REFRESH_PER_SECOND, transient=False,
                          get_renderable=lambda: render(self._snapshot))  # fmt: skip

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # drawn by Live's refresh thread; replacing the reference is atomic

    def __enter__(self) -> "LiveView":
        self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.stop()  # draws once more: the last state stays on the screen


def _running_line(job: RunningView, now: float, with_slot: bool):
    from rich.progress_bar import ProgressBar
    from rich.spinner import Spinner
    from rich.table import Table
    from rich.text import Text

    line = Table.grid(padding=(0, 1))
    for _ in range(6 if with_slot else 5):
        line.add_column(no_wrap=True)
    # Only a measured fraction is drawn as a bar; rich's "unknown total" bar pulses across its whole width,
    # which at a glance reads as a full bar at the start of a job.
    if job.stage == "preparing" and job.total:
        bar = ProgressBar(total=job.total, completed=min(job.done or 0, job.total), width=30)
        detail = f"merging {human_bytes(job.done or 0)} of {human_bytes(job.total)}"
    elif job.stage == "evaluating" and job.steps:
        # Evaluator steps finished, as a bar only when there are several: one step is 0 % until it is done.
        done = max(0, (job.step or 1) - 1)
        bar = ProgressBar(total=job.steps, completed=done, width=30) if job.steps > 1 else Spinner("dots")
        detail = f"step {job.step} of {job.steps}: {job.backend}"
    else:
        bar = Spinner("dots", style="yellow")
        detail = ""
    cells = [Text(job.slot, style="cyan")] if with_slot else []
    line.add_row(*cells, Text(f"{job.checkpoint}/{job.variant}", style="bold"), Text(job.stage, style="yellow"), bar,
                 detail, f"{job.elapsed(now):.0f} s")  # fmt: skip
    return line


def _metric_cell(row: ResultRow, name: str):
    from rich.text import Text

    if name not in row.metrics:
        return ""
    if name in row.regressions:
        return Text.assemble(f"{row.metrics[name]:.4g} ", ("▼", "bold red"))
    return f"{row.metrics[name]:.4g}"


def render(snapshot: Snapshot | None, now: float | None = None):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if snapshot is None:
        return Text("ckpt-watch: starting ...", style="dim")
    now = time.time() if now is None else now
    head = Table.grid(padding=(0, 1))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row("watching", Text.assemble(snapshot.output_dir, " (", (snapshot.mode, "cyan"), ")"))
    head.add_row("schedule" if "," in snapshot.preset else "preset", f"{snapshot.preset}, policy {snapshot.policy}, device {snapshot.device}")

    if snapshot.running:
        several = len(snapshot.slots) > 1
        for job in snapshot.running:
            head.add_row("running", _running_line(job, now, several))
    else:
        if snapshot.stopping:
            idle = "stopping"
        elif snapshot.idle_text:
            idle = snapshot.idle_text
        else:
            idle = "nothing (idle): waiting for the " + ("next checkpoint" if snapshot.results else "first checkpoint")
        head.add_row("running", Text(idle, style="dim"))
    for name, busy in snapshot.slots:
        if busy:
            head.add_row("not offered", Text(f"{name}: {busy}", style="yellow"))
    presets = len({preset for _, _, preset in snapshot.queue}) > 1
    queued = ", ".join(f"{name}/{variant}" + (f"/{preset}" if presets else "")
                       for name, variant, preset in snapshot.queue[:6])  # fmt: skip
    more = f" and {len(snapshot.queue) - 6} more" if len(snapshot.queue) > 6 else ""
    head.add_row("queue", f"{len(snapshot.queue)}" + (f": {queued}{more}" if queued else ""))
    if snapshot.waiting:
        head.add_row("waiting", Text(snapshot.waiting[0], style="dim"))
    waiting = {name: n for name, n in snapshot.undelivered.items() if n}
    if waiting:
        parts = [f"{name} {n} result(s)" + (f" ({snapshot.undelivered_why[name]})" if snapshot.undelivered_why.get(name)
                                             else "") for name, n in waiting.items()]  # fmt: skip
        head.add_row("undelivered", Text.assemble(
            "; ".join(parts), (" - they stay in the journal until delivered; `ckpt-watch sync OUTPUT_DIR` "
                               "delivers them now", "dim")))  # fmt: skip

    results = Table(title="latest results", title_justify="left", expand=False)
    runs = any(r.run for r in snapshot.results)
    if runs:
        results.add_column("run")
    results.add_column("step", justify="right")
    results.add_column("variant")
    if len({r.preset for r in snapshot.results}) > 1:
        results.add_column("preset")
    results.add_column("status")
    for name in snapshot.headlines:
        results.add_column(name, justify="right")
    results.add_column("time (s)", justify="right")
    regressed = any(r.regressions for r in snapshot.results)
    if regressed:
        results.add_column("vs best so far")
    several = len({r.preset for r in snapshot.results}) > 1
    for row in snapshot.results:
        status = Text(row.status, style="green" if row.status == "ok" else "red")
        cells = [_metric_cell(row, n) for n in snapshot.headlines]
        if row.status != "ok" and row.error and snapshot.headlines:
            cells[0] = Text(row.error[:60], style="red")
        note = [Text("; ".join(row.regressions.values()), style="red")] if regressed else []
        results.add_row(*([row.run] if runs else []), str(row.step), row.variant, *([row.preset] if several else []), status, *cells,
                        f"{row.walltime_s:.1f}", *note)  # fmt: skip
    if not snapshot.results:
        return Group(head, Text("no results yet", style="dim"))
    return Group(head, results)
