"""Jobs: start a job's child process on the pinned device, watch it, stop it, collect its outcome.

This is the one-process-per-job mode (`warm = false`; watcher/warm.py runs jobs in long-lived workers instead,
and shares the job folder, stage and outcome pieces defined here). Each job runs `python -m watcher.worker` in its own process group, as the guardian of everything it starts
(watcher/processes.py: a stop, a timeout or the daemon's death reaches every process of the job), with
CUDA_VISIBLE_DEVICES pinned, stdout/stderr appended to the job's log file. Its group is recorded in the journal
while it runs, so that a daemon started after a kill -9 can stop what is left. A child that crashes, is killed
for memory or runs past its time fails that job only.
"""

from __future__ import annotations

import json
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
from watcher.journal import Job
from watcher.ledgers import ProcessLedger
from watcher.records import JobSpec, Outcome, Preset


@dataclass(frozen=True)
class JobPaths:
    log: Path  # RESULTS_DIR/<checkpoint>/<variant>/<preset>.log, appended to by every attempt
    workdir: Path  # private scratch space, removed when the job ends
    spec: Path
    outcome: Path
    scratch: Path  # the worker's own folder inside workdir (JobSpec.scratch_dir)

    @classmethod
    def for_job(cls, results_dir: Path, scratch_dir: Path, job: Job) -> "JobPaths":
        workdir = scratch_dir / f"job-{job.id}"
        return cls(
            log=results_dir / job.checkpoint.name / job.variant / f"{job.preset}.log",
            workdir=workdir,
            spec=workdir / "spec.json",
            outcome=workdir / "outcome.json",
            scratch=workdir / "scratch",
        )


class StageReader:
    """The worker's stage reports (the protocol in watcher/worker.py), from bytes as they arrive: a pipe for a
    local job, the stage file for a Slurm job."""

    def __init__(self) -> None:
        self.stage = "preparing"
        self.progress: dict[str, Any] = {}  # the latest report's progress: done/total, or step/steps/backend
        self._reported: str | None = None  # the stage of the child's last report
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        """Stages entered in the complete lines read so far (a stage repeated with new progress is not listed
        again); progress on the way is kept in `progress` (empty for a bare stage line)."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        stages = []
        for line in lines:
            try:
                message = json.loads(line)
                stage = message["stage"]
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(stage, str):
                continue
            if stage != self._reported:
                stages.append(stage)
            self._reported = self.stage = stage
            self.progress = {k: v for k, v in message.items() if k != "stage"}
        return stages


class LocalJob:
    """What a job on this machine has, whatever process runs it: its time budget and the stages read from its
    status pipe (`_status_fd`). The daemon follows `RunningJob` and `warm.WarmJob` alike through it."""

    where = ""  # named by its slot (a Slurm job by its Slurm id: watcher/slurm_jobs.py)

    def __init__(self, job: Job, paths: JobPaths, timeout: float, status_fd: int):
        self.job = job
        self.paths = paths
        self.started = time.time()
        self.deadline = self.started + timeout
        self.timeout = timeout
        self._stages = StageReader()
        self._status_fd = status_fd

    @property
    def stage(self) -> str:
        return self._stages.stage

    @property
    def progress(self) -> dict[str, Any]:
        return self._stages.progress

    def new_stages(self) -> list[str]:
        """Stages the job entered since the last call (non-blocking; see `StageReader.feed`)."""
        return self._stages.feed(read_nonblocking(self._status_fd))

    @property
    def timed_out(self) -> bool:
        return time.time() > self.deadline


class RunningJob(LocalJob):
    """A local job: the worker as a child process of the daemon (see the module docstring)."""

    def __init__(self, job: Job, proc: subprocess.Popen, status_fd: int, paths: JobPaths, timeout: float,
                 ledger: ProcessLedger):  # fmt: skip
        super().__init__(job, paths, timeout, status_fd)
        self.proc = proc
        self.ledger = ledger

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self, why: str = "") -> None:
        """SIGTERM the job's process group and return at once (several jobs stopping share one grace period)."""
        processes.kill_group(self.proc.pid, signal.SIGTERM)

    def stop(self, grace: float = 10.0, why: str = "") -> None:
        """SIGTERM the job's whole process group, then SIGKILL whatever is left after `grace` seconds."""
        processes.stop(self.proc, grace)

    def outcome(self) -> Outcome:
        """What the child wrote, or a (transient) failure built from its exit status and the end of its log."""
        return outcome_of(self.paths, self.proc.poll())

    def close(self) -> None:
        """After the child ended (or was stopped): nothing of its group may outlive it, nor its folder."""
        processes.kill_group(self.proc.pid)
        try:
            os.close(self._status_fd)
        except OSError:
            pass
        shutil.rmtree(self.paths.workdir, ignore_errors=True)
        self.ledger.remove(self.proc.pid)


def job_spec(job: Job, preset: Preset, paths: JobPaths, devices: tuple[str, ...], base_model: Path | None,
             parent_pid: int, keep_merged: bool = False) -> JobSpec:  # fmt: skip
    """What the worker is told: the journal's facts about the job, never read again from the checkpoint.
    `parent_pid` 0: no daemon on the worker's machine to go with (a Slurm job)."""
    checkpoint = job.checkpoint
    return JobSpec(job_id=job.id, checkpoint_name=checkpoint.name, checkpoint_path=checkpoint.path,
                   step=checkpoint.step, generation=checkpoint.generation, layout=checkpoint.layout,
                   variants=checkpoint.variants, variant=job.variant, preset=preset, devices=devices,
                   base_model=base_model, scratch_dir=paths.scratch, outcome_path=paths.outcome,
                   parent_pid=parent_pid, keep_merged=keep_merged)  # fmt: skip


def launch(job: Job, spec: JobSpec, paths: JobPaths, env: dict[str, str], timeout: float,
           ledger: ProcessLedger) -> RunningJob:  # fmt: skip
    """Write the spec, start the worker and record its process group in `ledger`; returns at once."""
    prepare_folder(job, spec, paths)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    env = {**env, "CKPT_WATCH_STATUS_FD": str(write_fd), "PYTHONUNBUFFERED": "1"}
    with open(paths.log, "ab") as log:
        proc = processes.spawn(
            [sys.executable, "-m", "watcher.worker", str(paths.spec)],
            guardian=True,  # the worker calls processes.guard: it goes with us and stops its whole tree
            ledger=ledger,
            role=f"job {job.id}",
            folder=paths.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(write_fd,),
            cwd=str(paths.workdir),
        )
    os.close(write_fd)
    return RunningJob(job, proc, read_fd, paths, timeout, ledger)


def prepare_folder(job: Job, spec: JobSpec, paths: JobPaths) -> None:
    """A fresh job folder with the spec in it, and this attempt's header in the job's log."""
    shutil.rmtree(paths.workdir, ignore_errors=True)
    paths.workdir.mkdir(parents=True)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    spec.write(paths.spec)
    with open(paths.log, "ab") as log:
        log.write(f"\n===== attempt {job.attempts} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())


def read_nonblocking(fd: int) -> bytes:
    """Whatever a non-blocking pipe holds now (b"" when nothing, or when the writer is gone)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def outcome_of(paths: JobPaths, code: int | None) -> Outcome:
    """What the worker wrote for the job, or a (transient) failure built from the worker's exit status `code`
    and the end of the job's log."""
    try:
        return Outcome.read(paths.outcome)
    except (OSError, ValueError, TypeError):
        pass
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = "killed by SIGKILL (out of memory?)" if code == -signal.SIGKILL else f"killed by {name}"
    else:
        why = f"exited with status {code}"
    tail = last_log_line(paths.log)
    return Outcome.failure(f"job process {why}" + (f": {tail}" if tail else ""))


def last_log_line(log: Path, limit: int = 300) -> str:
    """The last non-empty line of a log file, shortened: usually the exception that ended the job."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, os.path.getsize(log) - 8192))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""
