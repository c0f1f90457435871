"""Warm workers: one long-lived job process per slot that runs its jobs one after another (`warm = true`).

A job in a process of its own pays a fresh interpreter and the imports of torch and transformers every time
(about 5 s of a 6-8 s demo job on a CPU VM). A warm worker (`python -m watcher.worker --serve`, the worker side
is `serve` in watcher/worker.py) pays them once: the daemon writes one request per line to its stdin, and it
answers each on a reply pipe once the job's outcome is written. Each job is still isolated the way it matters:
its own folder (spec, outcome, scratch; removed afterwards), its own log (the worker's fds 1 and 2 point at it
while it runs), its cwd, the environment restored after it, the same stage reports (one status pipe per worker,
read by the job's handle while the job runs) and the same time budget and stops (past the budget, or on a stop,
the worker's whole process group is stopped; the next job gets a fresh worker).

The pool keeps one worker per slot key (the allocation's slots and their CUDA_VISIBLE_DEVICES), so a GPU's jobs
reuse the process that already holds its CUDA context; a job on another GPU set gets a worker of its own, and an
idle worker on any of its GPUs is stopped first (it would hold memory there). A worker is recycled (stopped; the
next job on its slot starts a fresh one, which is all a crash costs too):

- after `warm_max_jobs` jobs, after any failed job, and when what it holds after a job (resident memory, or GPU
  memory torch keeps reserved) is over `warm_max_rss_mb` / `warm_max_gpu_mb`: a leak in a backend is bounded;
- on SIGHUP (`Daemon.reload`: new code or packages take effect): idle workers at once, busy ones after their job;
- when idle for IDLE_RECYCLE seconds, so that a daemon with nothing to do holds no GPU memory;
- when idle on a GPU the pool finds busy (`gpu_busy_mib`): its own memory may be what tips the reading over
  (then the GPU is offered again), or another process needs the memory.

A worker that dies mid-job (a crash, the OOM killer) fails only that job, as a transient failure retried later.
Processes: a worker is spawned like a one-shot job child (its own group, a guardian that dies with the daemon
and takes its tree along) and is recorded in the process ledger of the journal of the run whose job it runs
(with the job's folder) or ran last (with its own folder), so that a daemon started after a kill -9 stops it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher import processes
from watcher.jobs import JobPaths, LocalJob, outcome_of, prepare_folder, read_nonblocking
from watcher.journal import Job
from watcher.ledgers import ProcessLedger
from watcher.pool import Allocation
from watcher.records import JobSpec, Outcome

log = logging.getLogger("ckpt-watch")

IDLE_RECYCLE = 600.0  # seconds an idle worker is kept: then its memory (and CUDA context) is given back
WORKER_STOP_GRACE = 5.0  # seconds a worker stopped between jobs gets (it exits at once on SIGTERM: nothing runs)
LOG_TAIL = 8192  # bytes of a dead worker's own output copied into its job's log

# Defaults of the leak guards (see WarmSettings).
DEFAULT_MAX_JOBS = 20
DEFAULT_MAX_RSS_MB = 8192
DEFAULT_MAX_GPU_MB = 256


@dataclass(frozen=True)
class WarmSettings:
    """The `warm*` settings of watcher/config.py (documented there), plus the idle time."""

    enabled: bool = True
    max_jobs: int = DEFAULT_MAX_JOBS
    max_rss_mb: int = DEFAULT_MAX_RSS_MB
    max_gpu_mb: int = DEFAULT_MAX_GPU_MB
    idle_s: float = IDLE_RECYCLE

    @classmethod
    def of(cls, config: Any) -> "WarmSettings":
        return cls(config.warm, config.warm_max_jobs, config.warm_max_rss_mb, config.warm_max_gpu_mb)


class WarmWorker:
    """One warm worker process and the daemon's ends of its pipes."""

    def __init__(self, key: tuple, label: str, proc: subprocess.Popen, reply_fd: int, status_fd: int, home: Path,
                 ledger: ProcessLedger):  # fmt: skip
        self.key = key
        self.label = label  # its slots as the user names them: "cuda:1", "cuda:1,2", "cpu#0"
        self.proc = proc
        self.reply_fd = reply_fd
        self.status_fd = status_fd
        self.home = home  # its own folder: cwd between jobs, and worker.log (its output outside jobs)
        self.ledger = ledger  # the one ledger it is recorded in now
        self.jobs = 0  # jobs handed to it
        self.busy = False
        self.retire: str | None = None  # why it is recycled once its job ends (SIGHUP while busy)
        self.idle_since = time.monotonic()
        self._replies = b""

    @classmethod
    def start(cls, key: tuple, label: str, env: dict[str, str], home: Path, ledger: ProcessLedger) -> "WarmWorker":
        shutil.rmtree(home, ignore_errors=True)  # what a killed daemon's worker of this slot left
        home.mkdir(parents=True)
        status_read, status_write = os.pipe()
        reply_read, reply_write = os.pipe()
        for fd in (status_read, reply_read):
            os.set_blocking(fd, False)
        env = {**env, "CKPT_WATCH_STATUS_FD": str(status_write), "CKPT_WATCH_REPLY_FD": str(reply_write),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        # Without expandable segments, the one block cuBLAS keeps (its 32 MiB workspace) pins a whole segment of
        # torch's cache, so empty_cache() gave nothing back: measured on an H100 after a 1.1B bf16 job, 1852 MiB
        # stayed reserved (and the worker was recycled for it every job); with them, 60 MiB.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        try:
            with open(home / "worker.log", "ab") as output:
                proc = processes.spawn(
                    [sys.executable, "-m", "watcher.worker", "--serve", "--parent", str(os.getpid()), "--home", str(home)],
                    guardian=True,  # it calls processes.guard: it goes with us and stops its whole tree
                    ledger=ledger,
                    role=f"warm worker for {label}",
                    folder=home,
                    stdin=subprocess.PIPE,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(status_write, reply_write),
                    cwd=str(home),
                )
        except BaseException:
            os.close(status_read)
            os.close(reply_read)
            raise
        finally:
            os.close(status_write)
            os.close(reply_write)
        log.info("warm worker for %s started (pid %d)", label, proc.pid)
        return cls(key, label, proc, reply_read, status_read, home, ledger)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: dict[str, str]) -> None:
        """One request line; a worker that died meanwhile is seen by its job's `poll`, not here."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it is gone
            pass

    def replies(self) -> list[dict[str, Any]]:
        """The reply lines that arrived since the last call."""
        self._replies += read_nonblocking(self.reply_fd)
        *lines, self._replies = self._replies.split(b"\n")
        found = []
        for line in lines:
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict):
                found.append(reply)
        return found

    def record(self, ledger: ProcessLedger, role: str, folder: Path) -> None:
        """Be recorded in `ledger` (only there) as `role` owning `folder`."""
        identity = processes.Identity.of(self.proc.pid)
        if identity is None:  # already ended: nothing a later daemon could stop
            return
        if ledger is not self.ledger:
            self.ledger.remove(self.proc.pid)
            self.ledger = ledger
        ledger.add(self.proc.pid, identity.start_time, role, folder)

    def stop(self, grace: float) -> None:
        """Stop its whole process group and forget it: pipes, folder, ledger row."""
        processes.stop(self.proc, grace)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:  # the flush of a request it never read
                pass
        for fd in (self.reply_fd, self.status_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.home, ignore_errors=True)
        self.ledger.remove(self.proc.pid)

    def output_tail(self) -> bytes:
        """The end of what it printed outside any job (e.g. an import that failed at its start)."""
        path = self.home / "worker.log"
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, os.path.getsize(path) - LOG_TAIL))
                return handle.read()
        except OSError:
            return b""


class WarmJob(LocalJob):
    """A job running in a warm worker. The worker's status pipe carries only this job's lines while it runs: the
    previous job's were read before that job was answered."""

    def __init__(self, job: Job, paths: JobPaths, timeout: float, worker: WarmWorker, pool: "WarmPool"):
        super().__init__(job, paths, timeout, worker.status_fd)
        self.worker = worker
        self.reply: dict[str, Any] | None = None  # the worker's answer, once the job is over
        self._pool = pool

    def poll(self) -> int | None:
        """None while the job runs; 0 (3 for a failed job, as a one-shot worker exits) once the worker answered;
        the worker's exit status if it died first."""
        if self.reply is None:
            for reply in self.worker.replies():
                if reply.get("done") == self.job.id:
                    self.reply = reply
                    self._stages.feed(read_nonblocking(self.worker.status_fd))  # its last lines, before the next job's
        if self.reply is not None:
            return 0 if self.reply.get("ok") else 3
        return self.worker.proc.poll()

    def terminate(self, why: str = "") -> None:
        """SIGTERM the worker's group and return at once: the job cannot be stopped without its worker."""
        processes.kill_group(self.worker.proc.pid, signal.SIGTERM)

    def stop(self, grace: float = 10.0, why: str = "") -> None:
        """Stop the worker's whole process group (SIGTERM, then SIGKILL after `grace`); the next job on this slot
        starts a fresh worker."""
        self._pool.drop(self.worker, grace, "its job was stopped" + (f" ({why})" if why else ""), wait=True)

    def outcome(self) -> Outcome:
        """What the worker wrote, or a (transient) failure from how it ended, with its own last output."""
        code = self.poll()
        if self.reply is None and not self.paths.outcome.exists():
            tail = self.worker.output_tail().strip()
            if tail:
                with open(self.paths.log, "ab") as handle:
                    handle.write(b"[ckpt-watch] the warm worker's own output:\n" + tail + b"\n")
        return outcome_of(self.paths, code)

    def close(self) -> None:
        """After the job ended (or was stopped): the worker waits for the next job or is recycled; the job's
        folder goes."""
        self._pool.finished(self)
        shutil.rmtree(self.paths.workdir, ignore_errors=True)


class WarmPool:
    """The warm workers of the local executor, one per slot key (see the module docstring)."""

    def __init__(self, settings: WarmSettings):
        self.settings = settings
        self.workers: dict[tuple, WarmWorker] = {}
        # Workers sent SIGTERM and not yet gone, with when to SIGKILL them: a recycle never holds up the loop (a
        # worker's own stop waits for its children, and Python's multiprocessing resource tracker ignores
        # SIGTERM: measured, 5 s between a job's end and its result while the worker was stopped in line).
        self._stopping: list[tuple[WarmWorker, float]] = []
        self._started = 0  # workers started so far (names their folders)

    def launch(self, job: Job, spec: JobSpec, paths: JobPaths, env: dict[str, str], allocation: Allocation,
               timeout: float, ledger: ProcessLedger, scratch_dir: Path) -> WarmJob:  # fmt: skip
        """Hand the job to its slot's worker (started first if there is none); returns at once."""
        prepare_folder(job, spec, paths)
        key = (allocation.slot_names, allocation.visible_devices)
        label = str(allocation)
        for other in list(self.workers.values()):
            if other.key != key and not other.busy and set(other.key[0]) & set(allocation.slot_names):
                self.drop(other, WORKER_STOP_GRACE, f"a job on {label} needs its slots", wait=True)
        worker = self.workers.get(key)
        if worker is not None and not worker.alive:
            self.drop(worker, WORKER_STOP_GRACE, f"it ended while idle ({_ended(worker.proc.returncode)})")
            worker = None
        if worker is None:
            slug = "".join(char if char.isalnum() else "-" for char in label)
            # A folder of its own: the worker it replaces may still be stopping, and removes its folder when gone.
            in_use = {w.home for w in self.workers.values()} | {w.home for w, _ in self._stopping}
            for left in scratch_dir.glob(f"warm-{slug}-*"):  # what a killed daemon's workers of this slot left
                if left not in in_use:
                    shutil.rmtree(left, ignore_errors=True)
            self._started += 1
            home = scratch_dir / f"warm-{slug}-{os.getpid()}-{self._started}"
            worker = WarmWorker.start(key, label, env, home, ledger)
            self.workers[key] = worker
        worker.jobs += 1
        worker.busy = True
        worker.record(ledger, f"job {job.id} (warm worker for {label})", paths.workdir)
        worker.send({"spec": str(paths.spec), "log": str(paths.log)})
        return WarmJob(job, paths, timeout, worker, self)

    def finished(self, handle: WarmJob) -> None:
        """A job's end: its worker waits for the next job, or is recycled (and says why)."""
        worker = handle.worker
        if self.workers.get(worker.key) is not worker:  # already stopped with its job
            return
        worker.busy = False
        why = self._why_recycle(worker, handle.reply)
        if why is not None:
            self.drop(worker, WORKER_STOP_GRACE, why)
            return
        worker.idle_since = time.monotonic()
        worker.record(worker.ledger, f"warm worker for {worker.label}", worker.home)

    def _why_recycle(self, worker: WarmWorker, reply: dict[str, Any] | None) -> str | None:
        settings = self.settings
        if reply is None:
            code = worker.proc.poll()
            return f"it ended during its job ({_ended(code)})" if code is not None else "its job ended unanswered"
        if not reply.get("ok"):
            return "after a failed job"
        if worker.retire is not None:
            return worker.retire
        if not settings.enabled:
            return "warm = false"
        if worker.jobs >= settings.max_jobs:
            return f"after {worker.jobs} jobs (warm_max_jobs = {settings.max_jobs})"
        rss, gpu = float(reply.get("rss_mb", 0)), float(reply.get("gpu_mb", 0))
        if rss > settings.max_rss_mb:
            return f"it holds {rss:.0f} MiB of memory after its job (warm_max_rss_mb = {settings.max_rss_mb})"
        if gpu > settings.max_gpu_mb:
            return f"it holds {gpu:.0f} MiB of GPU memory after its job (warm_max_gpu_mb = {settings.max_gpu_mb})"
        return None

    def drop(self, worker: WarmWorker, grace: float, why: str, wait: bool = False) -> None:
        """Stop `worker` (its whole group) and forget it, logging why: SIGTERM now, the rest (SIGKILL after
        `grace`, its pipes and folder) at a later `refresh`, or before returning with `wait`."""
        log.info("warm worker for %s (pid %d) recycled: %s", worker.label, worker.proc.pid, why)
        if self.workers.get(worker.key) is worker:
            del self.workers[worker.key]
        if wait:
            worker.stop(grace)
            return
        processes.kill_group(worker.proc.pid, signal.SIGTERM)
        self._stopping.append((worker, time.monotonic() + grace))

    def _finish_stopping(self, block: bool = False) -> None:
        """Workers that ended since their SIGTERM are cleaned up, those past their grace killed; `block`: all of
        them now (each waits out what is left of its grace)."""
        now = time.monotonic()
        for entry in list(self._stopping):
            worker, deadline = entry
            if block or worker.proc.poll() is not None or now >= deadline:
                self._stopping.remove(entry)
                worker.stop(max(0.0, deadline - time.monotonic()) if block else 0.0)

    def refresh(self) -> None:
        """Idle workers that died go (logged); those idle for `idle_s` are stopped; recycled ones are finished."""
        self._finish_stopping()
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.busy:
                continue
            if not worker.alive:
                self.drop(worker, WORKER_STOP_GRACE, f"it ended while idle ({_ended(worker.proc.returncode)})")
            elif now - worker.idle_since >= self.settings.idle_s:
                self.drop(worker, WORKER_STOP_GRACE, f"idle for {self.settings.idle_s:.0f} s")

    def free_slots(self, busy: dict[str, str]) -> None:
        """Stop idle workers on slots the pool found busy (slot name -> the pool's reason)."""
        for worker in list(self.workers.values()):
            taken = [name for name in worker.key[0] if name in busy]
            if taken and not worker.busy:
                self.drop(worker, WORKER_STOP_GRACE, f"{taken[0]} is not offered ({busy[taken[0]]})")

    def recycle(self, why: str) -> None:
        """Idle workers are stopped now, busy ones once their job ends."""
        for worker in list(self.workers.values()):
            if worker.busy:
                worker.retire = why
            else:
                self.drop(worker, WORKER_STOP_GRACE, why)

    def shutdown(self) -> None:
        """Stop every worker, all at once (one shared grace period)."""
        for worker in self.workers.values():
            processes.kill_group(worker.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_GRACE
        for worker in list(self.workers.values()):
            self.drop(worker, max(0.5, deadline - time.monotonic()), "ckpt-watch stops", wait=True)
        self._finish_stopping(block=True)


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
