"""Jobs as Slurm batch jobs (`executor = "slurm"`): submit, follow, cancel, and adopt after a restart.

On a cluster the daemon runs on a login or service node and each job is a Slurm batch job that runs exactly what
a local job runs (`python -m watcher.worker SPEC`, the same `JobSpec`). What a local worker tells through a pipe
and its exit status, a Slurm job tells through files in its job folder on the shared filesystem: stage lines
(`status.jsonl`, the protocol of watcher/worker.py) and its outcome (`outcome.json`, written last). Slurm's own
view is read for all our jobs in one `squeue` every `[slurm] poll` seconds, and at once when an outcome appears:
a slot is given back only once Slurm has let the job go, so at most `max_jobs` of ours are ever in its queue.

The journal's `slurm_jobs` table holds each job's Slurm id from just before `sbatch` until its outcome is
recorded: a daemon started after a stop or a kill -9 adopts the jobs still queued or running instead of
submitting them again (a job whose id was lost with a kill mid-`sbatch` is found by its unique name). Slurm never
says who cancelled a job, so our own cancels are journaled before `scancel`; any other CANCELLED was someone
else's. How each final Slurm state becomes an outcome: `watcher.slurm.describe_end`.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from watcher import slurm
from watcher.config import SlurmSettings
from watcher.jobs import JobPaths, StageReader, job_spec
from watcher.journal import Job, Journal
from watcher.ledgers import SlurmRecord
from watcher.pool import Allocation
from watcher.records import ACTIVE_STATES, Outcome, OutcomeKind, Preset

log = logging.getLogger("ckpt-watch")

OUTCOME_GRACE = 10.0  # seconds an ended job's outcome file may take to show up on the shared filesystem
QUERY_SOON = 1.0  # seconds between squeue queries at the least, even when outcomes keep appearing
START_MARGIN_S = 300.0  # the default --time: the job's budget plus this (or 10 % of it, if more) for start-up
STATUS_FILE = "status.jsonl"
ATTEMPT_HEADER = "===== attempt "  # begins the line written to the job's log before each submission


class SlurmJob:
    """One of our jobs in Slurm. It has the face of `jobs.RunningJob`, so the daemon follows both alike."""

    timed_out = False  # Slurm enforces the time limit itself (TIMEOUT)

    def __init__(self, job: Job, paths: JobPaths, record: SlurmRecord, timeout: float, executor: "SlurmExecutor"):
        self.job = job
        self.paths = paths
        self.timeout = timeout
        self.started = record.submitted_at  # until Slurm says when it started running (ran_from)
        self.submitted_at = record.submitted_at
        self.name = record.name
        self.slurm_id = record.slurm_id or ""
        self.slurm_state: slurm.SlurmJobState | None = None  # as the last squeue said; None: not seen yet
        self._executor = executor
        self._stages = StageReader()
        self._offset = 0
        self._ended_at: float | None = None  # when we first saw it ended without an outcome (OUTCOME_GRACE)
        self.submit_error: str | None = None  # sbatch refused it: it ends at once with this failure
        self.uncancelled = False  # our scancel failed: its journal row stays, so the next start cancels it again

    @property
    def stage(self) -> str:
        if self._stages.progress or self._offset:  # the worker has reported: it runs
            return self._stages.stage
        state = self.slurm_state
        return "queued" if state is None or state.state == "PENDING" else self._stages.stage

    @property
    def progress(self) -> dict[str, object]:
        return self._stages.progress

    @property
    def queued(self) -> bool:
        """Still waiting in Slurm's queue (nothing of it runs yet)."""
        return not self._offset and (self.slurm_state is None or self.slurm_state.state == "PENDING")

    @property
    def where(self) -> str:
        """How logs and results name it: "slurm 1234"."""
        return f"slurm {self.slurm_id}" if self.slurm_id else "slurm (not submitted)"

    def ran_from(self, start_time: float) -> None:
        """Slurm started it at `start_time`: its result's walltime counts from there (the wait in Slurm's queue
        goes into the result's timings as queue_s)."""
        self.started = max(start_time, self.submitted_at)

    @property
    def queue_s(self) -> float:
        return round(self.started - self.submitted_at, 3)

    def new_stages(self) -> list[str]:
        """Stages the worker entered since the last call, read from its stage file (see jobs.StageReader)."""
        try:
            with open(self.paths.workdir / STATUS_FILE, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        self._offset += len(chunk)
        return self._stages.feed(chunk)

    def outcome_written(self) -> bool:
        return self.paths.outcome.exists()

    def poll(self) -> int | None:
        """None while Slurm has the job; 0 once it has let it go (ended, or forgotten) and its outcome is there
        or will not come (OUTCOME_GRACE)."""
        if self.submit_error is not None:
            return 0
        state = self.slurm_state
        if state is not None and not state.finished:
            return None
        if state is None and not self._executor.forgotten(self):
            return None
        if self.outcome_written():
            return 0
        now = time.monotonic()
        if self._ended_at is None:
            self._ended_at = now
        return 0 if now - self._ended_at >= OUTCOME_GRACE else None

    def outcome(self) -> Outcome:
        """The worker's own outcome when it wrote one, else what Slurm's final state says."""
        if self.submit_error is not None:
            return Outcome.failure(self.submit_error)
        try:
            outcome = Outcome.read(self.paths.outcome)
            outcome.timings["queue_s"] = self.queue_s
            return outcome
        except (OSError, ValueError, TypeError):
            pass
        state = self.slurm_state
        if state is None:  # Slurm no longer knows it (MinJobAge passed while we were down)
            return Outcome.failure(f"Slurm job {self.slurm_id} is no longer known to Slurm and left no outcome")
        retry, why = slurm.describe_end(state, _log_tail(self.paths.log))
        return Outcome.failure(why, OutcomeKind.TRANSIENT if retry else OutcomeKind.PERMANENT)

    def terminate(self, why: str = "ckpt-watch stopped") -> None:
        """scancel, with our reason journaled first (Slurm's KillWait does SIGTERM, then SIGKILL)."""
        self._executor.cancel(self, why)

    def stop(self, grace: float = 0.0, why: str = "ckpt-watch stopped") -> None:
        self.terminate(why)

    def close(self) -> None:
        """After Slurm let it go, or it was cancelled: forget it, remove its job folder."""
        self._executor.forget(self)


class SlurmExecutor:
    """Submits jobs to Slurm and follows them (one squeue for all; see the module docstring)."""

    detaches = True  # a stopping daemon leaves its jobs to Slurm, unless cancel_on_stop

    def __init__(self, settings: SlurmSettings, keep_merged: bool = False):
        """`keep_merged`: merge in the job folder (shared), not on the node, so the daemon can keep the copy."""
        self.settings = settings
        self.keep_merged = keep_merged
        self.jobs: dict[tuple[str, int], SlurmJob] = {}  # (run, job id) -> its Slurm job
        self._journals: dict[tuple[str, int], Journal] = {}
        self._next_query = 0.0
        self._queried: set[str] = set()  # the ids the last squeue was asked about
        self._problem: str | None = None  # Slurm not answering, as last logged

    @property
    def cancel_on_stop(self) -> bool:
        return self.settings.cancel_on_stop

    # --- submit --------------------------------------------------------------------------------------------

    def launch(self, run_name: str, journal: Journal, results_dir: Path, scratch_dir: Path, job: Job,
               preset: Preset, allocation: Allocation, base_model: Path | None, timeout: float) -> SlurmJob:  # fmt: skip
        """Write the job folder and script, journal the intent, sbatch, journal the id. (`scratch_dir` and
        `allocation` are a local job's: a Slurm job merges on its node, and Slurm picks its GPUs.) When sbatch
        refuses, the job ends at once with that failure (retried after the backoff)."""
        folder = self.job_dir(results_dir) / f"job-{job.id}"
        paths = JobPaths(log=results_dir / job.checkpoint.name / job.variant / f"{job.preset}.log", workdir=folder,
                         spec=folder / "spec.json", outcome=folder / "outcome.json", scratch=folder / "scratch")  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        paths.log.parent.mkdir(parents=True, exist_ok=True)
        gpus = self.gpus_for(preset)
        devices = tuple(f"cuda:{i}" for i in range(gpus)) or ("cpu",)
        job_spec(job, preset, paths, devices, base_model, parent_pid=0, keep_merged=self.keep_merged).write(paths.spec)
        name = _job_name(run_name, job)
        script = folder / "job.sbatch"
        script.write_text(slurm.job_script(name=name, log=paths.log, workdir=folder, settings=self.settings,
                                           gpus=gpus, time=self.time_for(timeout),
                                           commands=self._commands(paths, job)))  # fmt: skip
        with open(paths.log, "ab") as handle:
            handle.write(f"\n{ATTEMPT_HEADER}{job.attempts} at {time.strftime('%Y-%m-%d %H:%M:%S')}: Slurm job "
                         f"{name} =====\n".encode())  # fmt: skip
        journal.slurm.submitting(job.id, job.attempts, name, folder, paths.log)
        record = SlurmRecord(job.id, job.attempts, name, None, folder, paths.log, time.time(), None, None, None)
        try:
            slurm_id = slurm.submit(script, cwd=folder)
        except slurm.SlurmError as exc:  # the job's failure (retried with backoff): a wrong partition, a busy controller
            journal.slurm.forget(job.id)
            with open(paths.log, "ab") as handle:
                handle.write(f"[ckpt-watch] {exc}\n".encode())
            refused = self._follow(run_name, journal, job, paths, record, timeout)
            refused.submit_error = str(exc)
            return refused
        except BaseException:
            journal.slurm.forget(job.id)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        journal.slurm.submitted(job.id, slurm_id)
        return self._follow(run_name, journal, job, paths, replace(record, slurm_id=slurm_id, state="PENDING"),
                            timeout)  # fmt: skip

    def _commands(self, paths: JobPaths, job: Job) -> list[str]:
        """The job script's body: where to merge (the node's local disk when it has one), then the worker."""
        python = self.settings.python or sys.executable
        folder = shlex.quote(str(paths.workdir))
        keep = []
        if self.keep_merged:  # keep_merged moves the merged copy from here: it must be where the daemon sees it
            base, keep = folder, ["export CKPT_WATCH_KEEP_SCRATCH=1"]
        elif self.settings.scratch:
            base = self.settings.scratch  # shell text, expanded on the node (e.g. "$LOCAL_SCRATCH")
        else:
            base = f'${{SLURM_TMPDIR:-${{TMPDIR:-{folder}}}}}'
        return [*keep, f'export CKPT_WATCH_SCRATCH="{base}/ckpt-watch-job-{job.id}"',
                f"export CKPT_WATCH_STATUS_FILE={shlex.quote(str(paths.workdir / STATUS_FILE))}",
                "export PYTHONUNBUFFERED=1",
                f"exec {shlex.quote(python)} -m watcher.worker {shlex.quote(str(paths.spec))}"]  # fmt: skip

    def job_dir(self, results_dir: Path) -> Path:
        return Path(self.settings.job_dir) if self.settings.job_dir else results_dir / ".slurm"

    def gpus_for(self, preset: Preset) -> int:
        return preset.gpus if self.settings.gpus_per_job is None else self.settings.gpus_per_job

    def time_for(self, budget: float) -> str:
        """`--time`: the setting, else the job's time budget plus room for start-up."""
        return self.settings.time or slurm.time_limit(budget + max(START_MARGIN_S, 0.1 * budget))

    # --- follow --------------------------------------------------------------------------------------------

    def _follow(self, run_name: str, journal: Journal, job: Job, paths: JobPaths, record: SlurmRecord,
                timeout: float) -> SlurmJob:  # fmt: skip
        handle = SlurmJob(job, paths, record, timeout, self)
        self.jobs[(run_name, job.id)] = handle
        self._journals[(run_name, job.id)] = journal
        return handle

    def refresh(self) -> None:
        """Ask Slurm about every job we follow: every `poll` seconds, or sooner when an outcome appeared (so the
        slot is given back as soon as Slurm let the job go). A Slurm that does not answer is logged once and
        asked again at the next poll; the jobs stay as they are."""
        if not self.jobs:
            return
        now = time.monotonic()
        soon = any(handle.outcome_written() and not (handle.slurm_state and handle.slurm_state.finished)
                   for handle in self.jobs.values())  # fmt: skip
        if now < self._next_query - self.settings.poll + QUERY_SOON or (now < self._next_query and not soon):
            return
        self._next_query = now + self.settings.poll
        ids = {handle.slurm_id for handle in self.jobs.values() if handle.slurm_id}
        try:
            states = slurm.states(ids)
        except slurm.SlurmError as exc:
            if str(exc) != self._problem:
                log.warning("Slurm does not answer (%s); the jobs stay as they are, asking again in %g s", exc,
                            self.settings.poll)  # fmt: skip
                self._problem = str(exc)
            return
        if self._problem is not None:
            log.info("Slurm answers again")
            self._problem = None
        self._queried = ids
        for key, handle in self.jobs.items():
            state = states.get(handle.slurm_id)
            before = handle.slurm_state
            handle.slurm_state = state
            if state is not None and state.start_time is not None:
                handle.ran_from(state.start_time)
            if state is not None and (before is None or (before.state, before.reason) != (state.state, state.reason)):
                try:
                    self._journals[key].slurm.set_state(handle.job.id, state.state, state.reason)
                except Exception:  # noqa: BLE001 - only for `status`; a full disk must not stop following jobs
                    pass

    def forgotten(self, handle: SlurmJob) -> bool:
        """Slurm was asked about this job and no longer knows it (purged after MinJobAge)."""
        return handle.slurm_id in self._queried

    # --- cancel, forget, detach ----------------------------------------------------------------------------

    def cancel(self, handle: SlurmJob, why: str) -> None:
        key = self._key(handle)
        if key is not None:
            self._journals[key].slurm.cancelling(handle.job.id, why)
        if handle.slurm_id:
            try:
                slurm.cancel(handle.slurm_id)
            except slurm.SlurmError as exc:  # journaled: the next start cancels it again
                handle.uncancelled = True
                log.warning("could not cancel Slurm job %s (%s): %s; the next start tries again", handle.slurm_id,
                            why, exc)  # fmt: skip

    def forget(self, handle: SlurmJob) -> None:
        key = self._key(handle)
        if handle.uncancelled:  # its row (with `cancelling`) and folder stay for the next start's adopt()
            self.detach(handle)
            return
        if key is not None:
            journal = self._journals.pop(key)
            del self.jobs[key]
            try:
                journal.slurm.forget(handle.job.id)
            except Exception:  # noqa: BLE001 - a row left behind is dropped at the next start (its job ended)
                pass
        shutil.rmtree(handle.paths.workdir, ignore_errors=True)

    def detach(self, handle: SlurmJob) -> None:
        """A stopping daemon lets the job run on; the next start adopts it (its row and folder stay)."""
        key = self._key(handle)
        if key is not None:
            del self.jobs[key]
            del self._journals[key]

    def recycle(self, why: str) -> None:
        """Nothing to renew: each Slurm job is a fresh process (the local executor's warm workers are recycled)."""

    def shutdown(self) -> None:
        """Nothing runs here between jobs (what Slurm runs is handled by `cancel_on_stop`)."""

    def _key(self, handle: SlurmJob) -> tuple[str, int] | None:
        return next((key for key, h in self.jobs.items() if h is handle), None)

    # --- adopt ---------------------------------------------------------------------------------------------

    def adopt(self, run_name: str, journal: Journal, timeout_of: Callable[[Job], float]) -> list[SlurmJob]:
        """At start: follow again the jobs a stopped or killed daemon left with Slurm. A row whose job ended, or
        that we were cancelling, is dropped (the cancel repeated); a row without an id (killed mid-sbatch) finds
        its job by name. `timeout_of(job)`: the job's time budget. Returns the adopted jobs; their journal rows
        stay active, every other interrupted job is the caller's to put back to pending."""
        adopted = []
        for record in journal.slurm.all():
            job = _job_or_none(journal, record.job_id)
            if job is None or job.state not in ACTIVE_STATES or job.attempts != record.attempt or record.cancelling:
                if record.cancelling and record.slurm_id:
                    try:
                        slurm.cancel(record.slurm_id)
                    except slurm.SlurmError:
                        pass
                journal.slurm.forget(record.job_id)
                shutil.rmtree(record.folder, ignore_errors=True)
                continue
            if record.slurm_id is None:
                found = slurm.find_by_name(record.name)
                if not found:  # sbatch never got it: nothing runs, the job is simply pending again
                    journal.slurm.forget(record.job_id)
                    shutil.rmtree(record.folder, ignore_errors=True)
                    continue
                journal.slurm.submitted(record.job_id, found[0])
                record = replace(record, slurm_id=found[0])
            paths = JobPaths(log=record.log, workdir=record.folder, spec=record.folder / "spec.json",
                             outcome=record.folder / "outcome.json", scratch=record.folder / "scratch")  # fmt: skip
            adopted.append(self._follow(run_name, journal, job, paths, record, timeout_of(job)))
        return adopted


def _job_or_none(journal: Journal, job_id: int) -> Job | None:
    try:
        return journal.job(job_id)
    except (KeyError, IndexError, LookupError):
        return None


def _job_name(run_name: str, job: Job) -> str:
    """Unique per run, job and attempt, and readable in squeue: ckpt-watch.RUN.job12.a1."""
    run = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name)[:40]
    return f"ckpt-watch.{run}.job{job.id}.a{job.attempts}"


def _log_tail(log_path: Path) -> str:
    """The end of the job's log, this attempt's part only (the log is appended to by every attempt, and an earlier
    attempt's memory kill must not explain this one's end). Slurm's own lines, e.g. slurmstepd's, are there."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(log_path) - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    header = text.rfind(ATTEMPT_HEADER)
    if header < 0:
        return text
    return text[header:].split("\n", 1)[1] if "\n" in text[header:] else ""
