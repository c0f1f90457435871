"""Recording a finished job: the `Result` committed to the journal, and the merged model it may leave behind.

The one place besides watcher/records.py that builds a Result: from the journal's job (the checkpoint's facts,
its progress as read at detection), the worker's `Outcome` and the daemon's own facts (device, times).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from watcher import __version__
from watcher.journal import Job
from watcher.metrics import headline_metrics, is_spread
from watcher.records import Outcome, Result, iso_time

log = logging.getLogger("ckpt-watch")


def build_result(job: Job, outcome: Outcome, *, attempt: int, started: float, device: str,
                 cuda_visible_devices: str, log_file: str) -> Result:  # fmt: skip
    """The committed record of `job`'s last attempt, started at `started` (time.time()) and ending now.
    `log_file`: the job's log, relative to the results dir."""
    finished = time.time()
    checkpoint = job.checkpoint
    return Result(
        result_id=uuid.uuid4().hex,
        step=checkpoint.step,
        checkpoint=checkpoint.name,
        checkpoint_path=str(checkpoint.path),
        generation=checkpoint.generation,
        layout=checkpoint.layout,
        variant=job.variant,
        preset=job.preset,
        status="ok" if outcome.ok else "failed",
        error=outcome.error,
        metrics=outcome.metrics,
        nonfinite=outcome.nonfinite,
        raw=outcome.raw,
        versions={"ckpt_watch": __version__, **outcome.versions},
        device=device,
        cuda_visible_devices=cuda_visible_devices,
        attempt=attempt,
        started_at=iso_time(started),
        finished_at=iso_time(finished),
        walltime_s=round(finished - started, 3),
        timings=outcome.timings,
        stages=outcome.stages,
        progress=checkpoint.progress,
        log=log_file,
    )


def keep_merged(job: Job, outcome: Outcome, keep: int, scratch_dir: Path, step_of: Callable[[str], int | None]) -> None:
    """Move a merged model out of the job's scratch folder (deleted next) if the newest `keep` are to be kept,
    under SCRATCH_DIR/merged/<variant>/<checkpoint>; older ones there are removed."""
    merged = outcome.merged_model
    if not merged or not keep or not outcome.ok or not Path(merged).is_dir():
        return
    kept = scratch_dir / "merged" / job.variant
    kept.mkdir(parents=True, exist_ok=True)
    destination = kept / job.checkpoint.name
    shutil.rmtree(destination, ignore_errors=True)
    shutil.move(merged, destination)  # a rename; a copy when a Slurm job merged on another filesystem
    by_step = sorted(kept.iterdir(), key=lambda p: step_of(p.name) or -1)
    for old in by_step[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("kept the merged model at %s", destination)


def headline_text(metrics: dict[str, float]) -> str:
    """The "done" log line's metrics: the headline ones (watcher/metrics.py), else the first few by name."""
    shown = headline_metrics(metrics, fallback=5)
    more = len([k for k in metrics if not is_spread(k)]) - len(shown)
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in shown) + (f" (+{more} more)" if more > 0 else "")
