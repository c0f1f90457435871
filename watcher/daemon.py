"""The daemon: one loop that runs the pipeline detect -> journal -> schedule -> run -> record -> deliver.

Read `Daemon.run` top to bottom: everything else is one stage each. The loop is single-threaded (the only
other thread is watchdog's observer, which just queues folder names), and heavy work happens in job child
processes, so the daemon stays small and responsive and never touches CUDA itself.

Several jobs run at once, one per free slot of the pool (watcher/pool.py: the GPUs of `device`, or `cpu_jobs`
cpu slots, or with `executor = "slurm"` the `max_jobs` Slurm jobs in flight); which job takes a free slot is the
schedule's call (watcher/scheduler.py). The executor runs each job: a child process here (watcher/jobs.py) or a
Slurm batch job (watcher/slurm_jobs.py); the daemon follows both alike. Each watched run's own state (journal,
results, sinks, detection) is a `WatchedRun` (watcher/watched_run.py).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from watcher.config import ConfigError
from watcher.gpu_inventory import GpuInventory
from watcher.jobs import RunningJob
from watcher.journal import Job
from watcher.live_view import Snapshot
from watcher.local_executor import LocalExecutor
from watcher.notify import Notifier
from watcher.pool import Allocation, Pool
from watcher.recording import build_result, headline_text, keep_merged
from watcher.records import ACTIVE_STATES, JobState, Outcome, OutcomeKind
from watcher.resources import ResourceState
from watcher.scheduler import plan
from watcher.setup import Setup, resolve_run
from watcher.slurm_jobs import SlurmExecutor, SlurmJob
from watcher.startup import announce, install_signal_handlers, start_feed
from watcher.view_feed import ActiveView, merge_snapshots, running_views, status_line, waiting_lines
from watcher.watch import FeedSet, PollingFeed
from watcher.warm import WarmJob, WarmSettings
from watcher.watched_run import WatchedRun

log = logging.getLogger("ckpt-watch")

TICK = 0.5  # seconds between looks at running jobs; events wake the loop sooner
VIEW_INTERVAL = 0.25  # seconds between snapshots for the live view (it redraws 4 times a second)
THOROUGH_RESCAN = 300.0  # seconds between re-walks of every journaled checkpoint (re-saves that kept names)
SCAN_PATIENCE = 120.0  # seconds a --scan waits for a resource problem to pass before it ends with status 1
RUNS_ROOT_LOOK = 5.0  # seconds between looks for new runs under runs_root (and at every run's output dir)
STOP_GRACE = 10.0  # seconds a job's process group gets between SIGTERM and SIGKILL when it is stopped
# Settings a reload cannot change: they name what is watched and where its state lives (restart for those).
FIXED_ON_RELOAD = ("output_dir", "runs_root", "results_dir", "journal_dir", "scratch_dir", "poll", "settle", "sentinel",
                   "checkpoint_pattern", "executor")  # fmt: skip
# Settings that make a new pool on reload: it takes over once the jobs running on the old one have ended.
POOL_SETTINGS = ("device", "cpu_jobs", "gpu_busy_mib", "slurm.max_jobs")


@dataclass
class ActiveJob:
    """A job running now: its run, the journal's row, its child process or Slurm job and the slots it holds (of
    `pool`)."""

    run: WatchedRun
    job: Job
    running: RunningJob | WarmJob | SlurmJob
    allocation: Allocation
    pool: Pool

    @property
    def key(self) -> tuple[str, int]:
        return (self.run.name, self.job.id)

    @property
    def device(self) -> str:
        """Where it runs, as logs and results say it: "cuda:1", "cpu", "slurm 1234"."""
        return self.running.where or self.allocation.device


class Daemon:
    def __init__(self, setup: Setup, view: Any = None):
        """`view`: something with `update(Snapshot)` (watcher/live_view.py's LiveView), fed from the main loop."""
        self.setup = setup
        self.notifier = Notifier()
        self.runs = [WatchedRun(place, setup, self.notifier) for place in setup.runs]
        self.pool = _build_pool(setup)
        self.executor = SlurmExecutor(setup.config.slurm, keep_merged=_merges_kept(setup.config)) \
            if setup.config.executor == "slurm" \
            else LocalExecutor(WarmSettings.of(setup.config), keep_merged=_merges_kept(setup.config))  # fmt: skip
        self._next_pool: Pool | None = None  # a reload's new pool, waiting for the old one's jobs to end
        self.active: dict[tuple[str, int], ActiveJob] = {}
        self._uncommitted: list[tuple[ActiveJob, Outcome]] = []  # outcomes the journal did not take yet
        self._last_run: str | None = None  # the run of the job started last (round-robin goes on after it)
        self.waiting: list[tuple[str, Job, str]] = []  # why pending jobs wait, as the last schedule saw it
        self._noted_pool: Any = None  # the pool state as the journals last recorded it (for `status`)
        self._busy: dict[str, str | None] = {}  # GPUs another process uses, as last logged
        self._quiet_as_noted: set[tuple[str, int]] | None = None  # the jobs running when "nothing waits" was noted
        self.resources = ResourceState()
        self._gave_up = False  # a --scan that ended on a resource problem
        self._noted_problem: str | None = None  # the resource problem as the journal last recorded it
        self._stop_requested = False
        self._stop_deadline = 0.0  # time.monotonic() until which running jobs may still finish
        self._reload_requested = False
        self._feeds: FeedSet | None = None  # None for a --scan: nothing is watched
        self._mode = "?"  # inotify, polling every N s, or scan (set by startup.announce)
        self._refused: set[str] = set()  # runs_root subfolders that could not be watched (said once)
        self.view = view
        self._next_view = 0.0
        # What the live view says while no job runs (the demo: "training is running ..."); None: the default.
        self.idle_text: Callable[[], str] | None = None

    @property
    def config(self):
        return self.setup.config

    # --- the main loop ---------------------------------------------------------------------------------------

    def run(self, scan: bool = False, finish_when: Callable[[], bool] | None = None) -> int:
        """Watch until stopped (SIGINT/SIGTERM), or with `scan`, until every complete checkpoint is done.

        `finish_when`: also end once idle and this returns True (used by `ckpt-watch demo`).
        Returns the exit status: 1 if a job of this schedule is failed (scan), else 0.
        """
        install_signal_handlers(self._on_stop_signal, self._on_reload_signal)
        with self.resources.guard("start up"):
            for run in self.runs:
                self._start_up(run, scan)
            self.deliver_pending()

        if not scan:
            self._feeds = FeedSet()
        for run in self.runs:
            self._watch(run)
        if self.config.runs_root is not None:
            log.info("watching the runs under %s: %d so far (%s)", self.config.runs_root, len(self.runs),
                     ", ".join(run.name for run in self.runs) or "none yet")  # fmt: skip
        with self.resources.guard("look at the output dir"):
            self.reconcile()
        self.notifier.ready(self.status_line())
        next_reconcile = time.monotonic() + self._reconcile_interval()
        next_thorough = time.monotonic() + THOROUGH_RESCAN
        changed: dict[str, set[str]] = {}
        final_look = False
        while True:
            # Pinged from here only: if anything below wedges the loop, the pings stop and systemd restarts us.
            self.notifier.watchdog()
            if self._reload_requested:
                with self.resources.guard("reload the configuration"):
                    self.reload()
            self.run_stages(changed)
            if self._stop_requested and (not self._stop_waits() or time.monotonic() >= self._stop_deadline):
                break
            if scan and self.resources.problem and time.time() - self.resources.since > SCAN_PATIENCE:
                log.error("giving up the scan after %.0f s: %s (what is finished is kept; run it again later)",
                          SCAN_PATIENCE, self.resources.problem)  # fmt: skip
                self._gave_up = True
                break
            if self.notifier.enabled:  # status_line() queries the journal: not every tick for nobody
                self.notifier.status(self.status_line())
            if self.view is not None:
                self._update_view()
            if (scan or finish_when) and self.idle() and (finish_when is None or finish_when()):
                if final_look:
                    break
                # One more full look before ending: events for the last files may not have arrived yet.
                final_look = True
                with self.resources.guard("look at the output dir"):
                    self.reconcile()
                continue
            changed = self._wait(self._timeout(next_reconcile))
            overflowed = self._feeds is not None and self._feeds.overflowed()  # events were lost: rescan now
            if overflowed or time.monotonic() >= next_reconcile:
                thorough = overflowed or time.monotonic() >= next_thorough
                if self.resources.due():
                    with self.resources.guard("look at the output dir"):
                        self.reconcile(thorough)
                next_reconcile = time.monotonic() + self._reconcile_interval()
                if thorough:
                    next_thorough = time.monotonic() + THOROUGH_RESCAN
        return self.shutdown(scan, deliver_all=finish_when is not None)

    def _watch(self, run: WatchedRun) -> None:
        """Start watching a run's output dir (not for a --scan), and say so in the start-up line."""
        if self._feeds is not None:
            run.feed = start_feed(run.output_dir, run.place.poll, lambda name: self.config.step_of(name) is not None)
            if isinstance(run.feed, PollingFeed):
                run.place.poll = run.feed.interval  # FALLBACK_POLL where inotify could not be used
            self._feeds.add(run.name, run.feed)
        self._mode = announce(run.place, self.setup, run.feed)

    def _find_runs(self, scan: bool) -> None:
        """runs_root: a subfolder whose first checkpoint folder appeared is a new run, watched from now on."""
        for folder in self.setup.new_runs({run.name for run in self.runs} | self._refused):
            try:
                run = WatchedRun(resolve_run(self.config, folder), self.setup, self.notifier)
            except ConfigError as exc:  # e.g. another daemon holds it: say so once, leave it alone
                log.error("not watching %s: %s", folder, exc)
                self._refused.add(folder.name)
                continue
            self._start_up(run, scan)
            self.runs.append(run)
            self._watch(run)
            log.info("new run %s: watching it", run.name)

    def _start_up(self, run: WatchedRun, scan: bool) -> None:
        """A run's start: Slurm jobs a stopped or killed daemon left running are followed again (adopted, never
        submitted twice); every other interrupted job is pending again."""
        adopted = []
        if isinstance(self.executor, SlurmExecutor):
            timeout_of = lambda job: self._timeout_of(job.preset)  # noqa: E731
            adopted = self.executor.adopt(run.name, run.journal, timeout_of)
        else:
            for record in run.journal.slurm.all():  # left by a daemon with executor = "slurm"
                log.warning("%sSlurm job %s (%s) of an earlier executor = \"slurm\" is not followed by the local "
                            "executor: its job runs again here (scancel %s if it still runs)", run.prefix,
                            record.slurm_id, record.name, record.slurm_id)  # fmt: skip
                run.journal.slurm.forget(record.job_id)
        run.start_up(scan, self.setup.retry_failed, [handle.job.id for handle in adopted])
        for handle in adopted:
            allocation = self.pool.offer(1) or self.pool.hold_beyond()
            self.active[(run.name, handle.job.id)] = ActiveJob(run, handle.job, handle, allocation, self.pool)
            log.info("%sfollowing %s again: %s, left running by the last stop", run.prefix, handle.job.label,
                     handle.where)  # fmt: skip

    def run_stages(self, changed: dict[str, set[str]]) -> None:
        """One round of the pipeline after the watchdog ping. A full disk, a quota or a folder we may not write
        is a state, not a crash (watcher/resources.py): the stage is tried again after a backoff while the loop
        goes on; the running jobs are followed every round regardless."""
        resources, failures = self.resources, self.resources.failures
        with resources.guard("follow the running jobs"):
            self.supervise()
        if not resources.due():
            return
        with resources.guard("look at new checkpoints"):
            for run in self.runs:
                run.detect(changed.get(run.name, set()))
        with resources.guard("commit a result to the journal"):
            self._commit_pending()
        with resources.guard("deliver results"):
            idle = self.idle()
            for run in self.runs:
                run.outbox.poll()
                # A sink that was down is due for another try, or one that batches waits for the jobs to be done.
                if run.outbox.next_attempt_in() == 0 or (run.outbox.waiting_for_idle and idle):
                    run.deliver_pending(idle)
        if not self._uncommitted and not self._stop_requested:
            with resources.guard("start a job"):
                self.schedule()
        if resources.problem and resources.failures == failures:
            # A quiet round may simply not have written anything. Over only once a full look at the output dir
            # (which also admits what events told of while we waited) goes through as well.
            with resources.guard("look at the output dir"):
                self.reconcile()
            if resources.failures == failures:
                resources.succeeded()
        self._note_resources()

    def _note_resources(self) -> None:
        """Keep the journal's "resources" entry (shown by `ckpt-watch status`) in step, once it can be written."""
        problem = self.resources.problem
        if problem == self._noted_problem:
            return
        try:
            for run in self.runs:
                run.journal.set_meta("resources", {"problem": problem, "since": self.resources.since} if problem
                                     else None)  # fmt: skip
        except (sqlite3.Error, OSError):
            return  # the disk is full: `status` sees that itself; noted at a later round
        self._noted_problem = problem

    def shutdown(self, scan: bool, deliver_all: bool = False) -> int:
        """`deliver_all`: end like a finished scan, every sink delivered to (the demo), unless a signal stopped it."""
        self.notifier.stopping()
        if self.active and self.executor.detaches and not self.executor.cancel_on_stop:
            self._leave_running()
        elif self.active:
            log.info("stopping %d running job(s) (%s); they will run again at the next start", len(self.active),
                     ", ".join(a.job.label for a in self.active.values()))  # fmt: skip
            self._stop_all()
            with self.resources.guard("stop"):
                for run in self.runs:
                    run.journal.recover_interrupted()
        self.executor.shutdown()  # warm workers between jobs (local executor); their ledger rows are in the journals
        if self._feeds is not None:
            self._feeds.stop()
        failed = {run.name: [j for j in run.journal.jobs(states=[JobState.FAILED])
                             if j.preset in self.setup.presets and not j.checkpoint.gone] if scan else []
                  for run in self.runs}  # fmt: skip
        # A backfill (--scan) ends with every sink delivered to; a stop asked for by a signal waits for a delivery
        # already on its way (briefly) but starts no slow one: those results stay in the journal for the next start.
        finished_scan = scan and not self._stop_requested
        deliver_everything = (scan or deliver_all) and not self._stop_requested
        unwritten = False
        for run in self.runs:
            pending = {sink.name: run.journal.undelivered_count(sink.name) for sink in run.outbox.sinks}  # if it fails
            pending = {name: n for name, n in pending.items() if n}
            with self.resources.guard("deliver results"):
                run.outbox.wait(None if deliver_everything else STOP_GRACE)
                # The demo's trainer has just ended: a sink that waited for that (W&B defer) is asked again now,
                # not after its backoff.
                force = deliver_all and deliver_everything
                pending = {name: n for name, n in run.outbox.deliver_pending(force=force,
                                                                             include_slow=deliver_everything).items()
                           if n}  # fmt: skip
            if pending:
                log.warning("results not yet delivered (they stay in the journal; `ckpt-watch sync %s` delivers "
                            "them): %s", run.output_dir, ", ".join(f"{name} {n}" for name, n in pending.items()))  # fmt: skip
            run.outbox.close()
            # The files sink is local and always on: a backfill that could not write its results did not finish
            # (W&B waiting for a live run, by contrast, is the normal `defer` case).
            unwritten = unwritten or (finished_scan and pending.get("files", 0) > 0)
            if failed[run.name]:
                log.error("%s%d job(s) failed; see the logs under %s (use --retry-failed to run them again)",
                          run.prefix, len(failed[run.name]), run.results_dir)  # fmt: skip
            if finished_scan:  # its last line: what it did and where to look
                deliveries = ", ".join(f"{name} {n}" for name, n in pending.items()) or "none"
                log.info("%sscan done: %d job(s) evaluated, %d failed, pending deliveries: %s; results in %s "
                         "(`ckpt-watch status %s`)", run.prefix, run.finished_this_session, len(failed[run.name]), deliveries,
                         run.results_dir, run.output_dir)  # fmt: skip
        if self.view is not None:
            self._update_view(force=True)
        for run in self.runs:
            run.journal.close()
        return 1 if any(failed.values()) or unwritten or self._gave_up else 0

    def _stop_waits(self) -> bool:
        """Whether a stop waits (up to stop_grace) for running jobs: not for Slurm jobs that are left running."""
        return bool(self.active) and not (self.executor.detaches and not self.executor.cancel_on_stop)

    def _leave_running(self) -> None:
        """Slurm jobs run on after the daemon stops; the next start follows them again (their journal rows stay)."""
        assert isinstance(self.executor, SlurmExecutor)
        log.info("leaving %d Slurm job(s) running (%s); the next start collects their results (cancel_on_stop = "
                 "true cancels them instead)", len(self.active),
                 ", ".join(f"{a.job.label} as {a.device}" for a in self.active.values()))  # fmt: skip
        for active in list(self.active.values()):
            assert isinstance(active.running, SlurmJob)
            self.executor.detach(active.running)
            active.pool.release(active.allocation)
            del self.active[active.key]

    def _stop_all(self) -> None:
        """Stop every running job: all are sent SIGTERM at once and share one grace period."""
        for active in self.active.values():
            active.running.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for active in list(self.active.values()):
            self._end(active, stop=True, grace=max(0.5, deadline - time.monotonic()))

    def request_stop(self, grace: float = 0.0) -> None:
        """Take no new job; running ones may finish within `grace` seconds. A second request stops them now."""
        now = time.monotonic()
        self._stop_deadline = now if self._stop_requested else now + grace
        self._stop_requested = True
        if self._feeds is not None:
            self._feeds.wake()

    def reload(self) -> None:
        """SIGHUP: build the set-up again from the config file and use it from the next job on; the queue stays.

        A config that does not load (bad TOML, unknown preset, unavailable device) or that changes what is watched
        is rejected with a log line, and the old one stays. A new schedule entry gets its jobs on every present
        checkpoint at once (a backfill at its priority).
        """
        self._reload_requested = False
        self.notifier.reloading()
        self.executor.recycle("SIGHUP")  # fresh warm workers pick up new code and packages, whatever the config
        try:
            if self.setup.reload is None:
                raise ConfigError("this daemon was not started from a config it can reload")
            new = self.setup.reload()
            changed = [name for name in FIXED_ON_RELOAD if getattr(new.config, name) != getattr(self.config, name)]
            if changed:
                raise ConfigError(f"{', '.join(changed)} cannot change while running; restart for that")
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.notifier.ready(self.status_line())
            return
        new.retry_failed = False
        if any(_setting(new.config, name) != _setting(self.config, name) for name in POOL_SETTINGS):
            self._next_pool = _build_pool(new)
        if isinstance(self.executor, SlurmExecutor):
            self.executor.settings = new.config.slurm  # from the next submission on
        else:
            self.executor.configure(WarmSettings.of(new.config))
            self.executor.keep_merged = _merges_kept(new.config)  # from the next job on
        places = {place.name: place for place in new.runs}
        for run in self.runs:
            run.replace_setup(places.get(run.name) or resolve_run(new.config, run.output_dir), new)
        self.setup = new
        log.info("configuration reloaded: %s, device %s", new.schedule_text(), new.device)
        self.reconcile()  # every present checkpoint gets the jobs of the (new) schedule
        self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """What the daemon does, in one line (systemd's STATUS=, `systemctl status`)."""
        pending = sum(len(run.pending()) for run in self.runs)
        return status_line(self._active_views(), pending, self._stop_requested, self.resources.problem,
                           ", ".join(str(run.output_dir) for run in self.runs))  # fmt: skip

    # --- detect ----------------------------------------------------------------------------------------------

    def reconcile(self, thorough: bool = True) -> None:
        self._find_runs(scan=self._feeds is None)
        for run in self.runs:
            run.reconcile(thorough)

    # --- schedule and run --------------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Start what the schedule wants on the free slots; skip what `latest` gave up on; note why the rest
        waits."""
        if self._next_pool is not None and not self.active:
            self.pool, self._next_pool = self._next_pool, None
            log.info("the pool is now %s", self.pool.describe())
        if isinstance(self.executor, LocalExecutor):  # before any reading: an idle warm worker's memory is ours
            self.pool.discount(self.executor.worker_pids())
        queues = []
        for run in self.runs:
            running = [job_id for (name, job_id) in self.active if name == run.name]
            if len(run.journal.jobs(states=ACTIVE_STATES)) > len(running):
                # Active in the journal but not running: a start cut short (a full disk) left it so.
                run.journal.recover_interrupted(running)
            queued = [a.job for a in self.active.values() if a.run is run and getattr(a.running, "queued", False)]
            queues.append(run.queue(queued))
        if not any(queue.pending or queue.queued for queue in queues):
            self._note_waiting([])
            return
        pool = self.pool if self._next_pool is None else None  # a new pool waits for the old one's jobs
        if pool is not None and isinstance(self.executor, LocalExecutor):
            # Another process took an idle warm worker's GPU: the worker goes (its memory may be what is missing).
            self.executor.free_slots({slot.name: slot.busy for slot in pool.slots() if slot.busy})
        decided = plan(queues, self.setup.schedule, time.time(), pool.free() if pool else 0, self._slots_of,
                       self._last_run)  # fmt: skip
        by_name = {run.name: run for run in self.runs}
        for reason in sorted({why for _, _, why in decided.skip}):
            for run in self.runs:
                jobs = [job for name, job, why in decided.skip if why == reason and name == run.name]
                if jobs:
                    run.journal.skip([job.id for job in jobs], reason)
                    log.info("%s%s: skipping %s", run.prefix, reason, ", ".join(job.label for job in jobs))
        for name, job, why in decided.cancel:  # Slurm jobs still queued, for checkpoints a newer one overtook
            active = self.active[(name, job.id)]
            log.info("%s%s: cancelling %s, still queued: %s", active.run.prefix, job.label, active.device, why)
            self._end(active, stop=True, why=why)
            active.run.journal.skip([job.id], why, started=True)
        started = set()
        for name, job in decided.start:
            allocation = pool.offer(self._slots_of(job.preset)) if pool else None
            if allocation is None:  # the GPUs changed since `free()` (another process took one): next round
                break
            self.start(by_name[name], job, allocation, pool)
            started.add((name, job.id))
        waiting = [(name, job, why) for name, job, why in decided.waiting if (name, job.id) not in started]
        if decided.blocked is not None and waiting and waiting[0][:2] == decided.blocked[:2]:
            # Worded now that this round's starts hold their slots (before them the pool had them free).
            why = pool.why_waiting(decided.blocked[2]) if pool else "the pool changes (reload): waiting for " \
                "running jobs to end"
            waiting[0] = (waiting[0][0], waiting[0][1], why or "no free slot")
        self._note_waiting(waiting)

    def _slots_of(self, preset: str) -> int:
        """Slots one job of `preset` takes: its `gpus` in a GPU pool, one in a cpu pool."""
        return 1 if self.pool.is_cpu else self.setup.presets[preset].gpus

    def start(self, run: WatchedRun, job: Job, allocation: Allocation, pool: Pool) -> None:
        if run.gone(job.checkpoint):
            pool.release(allocation)
            return
        started = run.journal.start(job)
        if started is None:  # not pending any more: nothing to run
            pool.release(allocation)
            return
        job = started
        base_model = Path(self.config.base_model) if self.config.base_model else None
        try:
            running = self.executor.launch(run.name, run.journal, run.results_dir, run.config.resolved_scratch_dir(),
                                           run.retention.evaluable(job), self.setup.presets[job.preset], allocation,
                                           base_model, self._timeout_of(job.preset))  # fmt: skip
        except BaseException:
            pool.release(allocation)  # the job stays "preparing" in the journal: the next round puts it back
            raise
        active = ActiveJob(run, job, running, allocation, pool)
        self.active[active.key] = active
        self._last_run = run.name
        log.info("%sstarted %s on %s (attempt %d)", run.prefix, job.label, active.device, job.attempts)

    def _timeout_of(self, preset: str) -> float:
        """A job's time budget: its preset's, else job_timeout (a Slurm job's --time adds a margin to it)."""
        known = self.setup.presets.get(preset)
        return (known.time_budget if known else None) or self.config.job_timeout

    def supervise(self) -> None:
        """Follow the running jobs: stage changes, their checkpoint vanishing, timeouts, and their end."""
        self.executor.refresh()
        for active in list(self.active.values()):
            run, job, running = active.run, active.job, active.running
            for stage in running.new_stages():
                if stage == JobState.EVALUATING:
                    run.journal.set_stage(job.id, JobState.EVALUATING)
            if run.gone(job.checkpoint):
                log.info("%s%s: checkpoint went away during the job; stopping it", run.prefix, job.label)
                self._end(active, stop=True, why="checkpoint deleted")
                continue
            if running.poll() is None:
                if run.retention.lost_original(job):
                    self._end(active, stop=True, why="checkpoint deleted: starting again from the copy keep_best holds")
                    self._again_from_hold(active)
                    continue
                if running.timed_out:
                    log.warning("%s%s: timed out after %.0f s; stopping it", run.prefix, job.label,
                                running.timeout)  # fmt: skip
                    why = f"timed out after {running.timeout:.0f} s"
                    self._end(active, stop=True, why=why)
                    self._commit(active, Outcome.failure(why))
                continue
            outcome = running.outcome()
            run.retention.take_merged(job, outcome)  # before keep_merged moves it, or the job's folder goes
            keep_merged(job, outcome, self.config.keep_merged, run.config.resolved_scratch_dir(), self.config.step_of)
            self._end(active, stop=False)
            if not outcome.ok and run.gone(job.checkpoint):
                continue
            if not outcome.ok and run.retention.lost_original(job):
                self._again_from_hold(active)
                continue
            self._commit(active, outcome)

    def _again_from_hold(self, active: ActiveJob) -> None:
        """The trainer deleted a checkpoint that keep_best holds while its job ran: the job is pending again at
        once, the attempt not counted, and starts from the hold (Retention.evaluable)."""
        log.info("%s%s: the trainer deleted the checkpoint during the job; it starts again from the copy keep_best "
                 "holds", active.run.prefix, active.job.label)  # fmt: skip
        active.run.journal.put_back(active.job.id, "checkpoint deleted during the job: again from its hold")

    def _commit(self, active: ActiveJob, outcome: Outcome) -> None:
        """Record a job's outcome; kept in memory until the journal can take it (a full disk), so that nothing
        finished is lost, and no other job starts meanwhile."""
        self._uncommitted.append((active, outcome))
        self._commit_pending()

    def _commit_pending(self) -> None:
        while self._uncommitted:
            active, outcome = self._uncommitted[0]
            self.record(active, outcome)
            self._uncommitted.pop(0)
            active.run.deliver_pending(self.idle())

    def _end(self, active: ActiveJob, stop: bool, grace: float = STOP_GRACE, why: str = "ckpt-watch stopped") -> None:
        if stop:
            active.running.stop(grace, why)
        active.running.close()
        active.pool.release(active.allocation)
        del self.active[active.key]

    # --- record and deliver ----------------------------------------------------------------------------------

    def record(self, active: ActiveJob, outcome: Outcome) -> None:
        """Commit the outcome to the journal first; only then deliver it to the sinks."""
        run, job, running = active.run, active.job, active.running
        attempt = job.attempts  # as journal.start left it (`job` is the running one)
        if not outcome.ok and attempt < self.config.max_attempts and outcome.kind is not OutcomeKind.PERMANENT:
            delay = self.config.retry_backoff * 2 ** (attempt - 1)
            run.journal.retry_later(job.id, outcome.error or "failed", delay)
            log.warning("%s%s failed (attempt %d of %d, retry in %.0f s): %s", run.prefix, job.label, attempt,
                        self.config.max_attempts, delay, outcome.error)  # fmt: skip
            return
        result = build_result(job, outcome, attempt=attempt, started=running.started,
                              device=active.device,
                              cuda_visible_devices=active.allocation.cuda_visible_devices,
                              log_file=str(running.paths.log.relative_to(run.results_dir)))  # fmt: skip
        if not run.journal.finish(job.id, result):
            return
        run.alerts.result_recorded(result)
        run.retention.result_recorded(result)
        run.finished_this_session += 1
        run.view_feed.add(result)
        if result.ok:
            log.info("%s%s done in %.1f s: %s", run.prefix, job.label, result.walltime_s,
                     headline_text(result.metrics))  # fmt: skip
        else:
            log.error("%s%s failed after %d attempt(s): %s", run.prefix, job.label, attempt, result.error)

    def _active_views(self) -> list[ActiveView]:
        return [ActiveView(a.running, a.device, a.run.name) for a in self.active.values()]

    def snapshot(self) -> Snapshot:
        """What the live view shows, as plain data (see watcher/view_feed.py); with several runs, theirs
        together (queue and results named by run)."""
        watched = str(self.runs[0].output_dir) if len(self.runs) == 1 else (
            f"{len(self.runs)} runs under {self.config.runs_root}" if self.config.runs_root is not None
            else f"{len(self.runs)} runs: " + ", ".join(run.name for run in self.runs))  # fmt: skip
        header = Snapshot(watched, self._mode, ", ".join(self.setup.presets), self.config.policy,
                          self.pool.describe())  # fmt: skip
        idle_text = self.idle_text() if self.idle_text is not None and not self.active else None
        parts = [run.view_feed.snapshot(header, run.pending(), run.outbox) for run in self.runs]
        merged = merge_snapshots(header, parts, [run.name for run in self.runs]) if parts else header
        return replace(merged, running=running_views(self._active_views(), several=len(self.runs) > 1),
                       slots=[(slot.name, slot.busy) for slot in self.pool.slots()],
                       waiting=waiting_lines(self.waiting, several=len(self.runs) > 1),
                       stopping=self._stop_requested, idle_text=idle_text)  # fmt: skip

    def _update_view(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_view:
            self._next_view = now + VIEW_INTERVAL
            self.view.update(self.snapshot())

    def _note_waiting(self, waiting: list[tuple[str, Job, str]]) -> None:
        """Keep why jobs wait, and the slots, for the live view and (in each run's journal) for `status`."""
        self.waiting = waiting
        if not waiting and self._quiet_as_noted == set(self.active):
            return  # nothing waits, as noted with these jobs: no nvidia-smi query (the pool's readings) for nothing
        slots = []
        for slot in self.pool.slots():
            if (slot.busy is None) != (self._busy.get(slot.name) is None):  # a GPU starts or stops being offered
                if slot.busy:
                    log.warning("%s is not offered: %s (gpu_busy_mib = %d)", slot.name, slot.busy,
                                self.config.gpu_busy_mib)  # fmt: skip
                else:
                    log.info("%s is offered again", slot.name)
            self._busy[slot.name] = slot.busy
            holder = next((a for a in self.active.values() if slot.name in a.allocation.slot_names), None)
            slots.append({"slot": slot.name, "busy": slot.busy,
                          "job": holder.job.id if holder else None, "run": holder.run.name if holder else None,
                          "what": holder.job.label if holder else None})  # fmt: skip
        state = {"device": self.pool.describe(), "slots": slots,
                 "waiting": [{"run": name, "job": job.id, "what": job.label, "why": why}
                             for name, job, why in waiting[:50]]}  # fmt: skip
        if state != self._noted_pool:
            for run in self.runs:
                run.journal.set_meta("pool", state)
            self._noted_pool = state
        self._quiet_as_noted = None if waiting else set(self.active)

    def deliver_pending(self) -> None:
        idle = self.idle()
        for run in self.runs:
            run.deliver_pending(idle)

    # --- helpers ---------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.active and all(run.idle() for run in self.runs)

    def _reconcile_interval(self) -> float:
        polls = [run.place.poll for run in self.runs if run.place.poll is not None]
        interval = min(polls) if polls else self.config.rescan_interval
        # New runs under runs_root are found by this look too: soon, but a listing of the root is all it costs.
        return min(interval, RUNS_ROOT_LOOK) if self.config.runs_root is not None else interval

    def _timeout(self, next_reconcile: float) -> float:
        candidates = [TICK, max(0.0, next_reconcile - time.monotonic())]
        for run in self.runs:
            due = run.detector.next_due()
            if due is not None:
                candidates.append(due)
        return min(candidates)

    def _wait(self, timeout: float) -> dict[str, set[str]]:
        if self._feeds is None:
            time.sleep(timeout)
            return {}
        return self._feeds.wait(timeout)

    def _on_stop_signal(self, name: str) -> None:
        """SIGINT/SIGTERM: no new jobs; running ones may finish within stop_grace. A second one stops them now."""
        if self._stop_requested:
            log.info("received %s again: stopping the running jobs now", name)
        elif self.active:
            log.info("received %s: no new jobs; the running one(s) may finish within %g s", name,
                     self.config.stop_grace)  # fmt: skip
        else:
            log.info("received %s: finishing up", name)
        self.notifier.stopping()
        self.request_stop(self.config.stop_grace)

    def _on_reload_signal(self) -> None:
        log.info("received SIGHUP: reloading the configuration")
        self._reload_requested = True  # done by the loop, between two stages
        if self._feeds is not None:
            self._feeds.wake()


def _setting(config: Any, name: str) -> Any:
    for part in name.split("."):
        config = getattr(config, part)
    return config


def _merges_kept(config: Any) -> bool:
    """Whether jobs must leave their merged model (keep_merged, keep_merged_best): a sharded checkpoint evaluated
    in-process is then merged all the same."""
    return config.keep_merged > 0 or bool(config.keep_best and config.keep_merged_best)


def _build_pool(setup: Setup) -> Pool:
    config = setup.config
    if config.executor == "slurm":  # Slurm places the jobs: the pool only counts them
        return Pool(cpu_jobs=config.slurm.max_jobs, label="slurm")
    return Pool.for_device(setup.device, setup.gpu_entries, GpuInventory() if setup.device.kind == "cuda" else None,
                           busy_mib=config.gpu_busy_mib, cpu_jobs=config.cpu_jobs)  # fmt: skip
