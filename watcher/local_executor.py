"""The local executor: jobs on the slots of this machine's pool, in warm workers or one process each.

`warm = true` (the default): each slot keeps a long-lived worker that runs its jobs one after another
(watcher/warm.py). `warm = false`: every job is a process of its own (watcher/jobs.py). The daemon follows both
kinds of job alike (the face of jobs.RunningJob), and a reload may switch between them from the next job on.
"""

from __future__ import annotations

import os
from pathlib import Path

from watcher.devices import child_environment
from watcher.jobs import JobPaths, RunningJob, job_spec, launch
from watcher.journal import Job, Journal
from watcher.pool import Allocation
from watcher.records import Preset
from watcher.warm import WarmJob, WarmPool, WarmSettings


class LocalExecutor:
    """Jobs as child processes of the daemon, on the slots of its pool (the default `executor`)."""

    detaches = False  # a stopping daemon stops its jobs: they are its children
    cancel_on_stop = True

    def __init__(self, warm: WarmSettings | None = None, keep_merged: bool = False):
        """`keep_merged`: the daemon keeps merged copies, so every sharded checkpoint is merged."""
        self.workers = WarmPool(warm or WarmSettings())
        self.keep_merged = keep_merged

    def launch(self, run_name: str, journal: Journal, results_dir: Path, scratch_dir: Path, job: Job,
               preset: Preset, allocation: Allocation, base_model: Path | None,
               timeout: float) -> RunningJob | WarmJob:  # fmt: skip
        paths = JobPaths.for_job(results_dir, scratch_dir, job)
        spec = job_spec(job, preset, paths, allocation.child_devices, base_model, os.getpid(), self.keep_merged)
        env = child_environment(list(allocation.visible_devices))
        if self.workers.settings.enabled:
            return self.workers.launch(job, spec, paths, env, allocation, timeout, journal.processes, scratch_dir)
        return launch(job, spec, paths, env, timeout, journal.processes)

    def refresh(self) -> None:
        """A job's end is seen by its handle's `poll`; here idle warm workers that died or idled too long go."""
        self.workers.refresh()

    def configure(self, warm: WarmSettings) -> None:
        """A reload's settings, from the next job on (`warm = false`: the idle workers go now)."""
        self.workers.settings = warm
        if not warm.enabled:
            self.workers.recycle("warm = false")

    def free_slots(self, busy: dict[str, str]) -> None:
        """Slots the pool does not offer (slot name -> why): an idle warm worker there is stopped, as its memory
        may be what makes the GPU look busy, or another process needs that memory more."""
        self.workers.free_slots(busy)

    def worker_pids(self) -> set[int]:
        """The warm workers' processes (the pool does not count their GPU memory as another process's)."""
        return {worker.proc.pid for worker in self.workers.workers.values()}

    def recycle(self, why: str) -> None:
        """SIGHUP: fresh workers (new code, new packages): idle ones stop now, busy ones after their job."""
        self.workers.recycle(why)

    def shutdown(self) -> None:
        """The daemon stops: no worker outlives it (its jobs were stopped before)."""
        self.workers.shutdown()
