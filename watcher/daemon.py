"""The daemon: one loop that runs the pipeline detect -> journal -> schedule -> run -> record -> deliver.

Read `Daemon.run` top to bottom: everything else is one stage each. The loop is single-threaded (the only
other thread is watchdog's observer, which just queues folder names), and heavy work happens in job child
processes, so the daemon stays small and responsive and never touches CUDA itself.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from watcher.config import ConfigError
from watcher.detect import Detector, Ready, read_progress
from watcher.devices import child_environment
from watcher.jobs import JobPaths, RunningJob, launch
from watcher.journal import Checkpoint, Job
from watcher.live_view import Snapshot
from watcher.notify import Notifier
from watcher.outbox import Outbox
from watcher.recording import build_result, headline_text, keep_merged
from watcher.records import ACTIVE_STATES, JobSpec, JobState, Outcome, OutcomeKind
from watcher.resources import ResourceState
from watcher.scheduler import decide
from watcher.setup import Setup, create_dir, take_lock
from watcher.startup import announce, install_signal_handlers, open_journal, start_feed, stop_left_behind
from watcher.view_feed import ViewFeed, status_line
from watcher.watch import Feed, PollingFeed

log = logging.getLogger("ckpt-watch")

TICK = 0.5  # seconds between looks at a running job; events wake the loop sooner
VIEW_INTERVAL = 0.25  # seconds between snapshots for the live view (it redraws 4 times a second)
THOROUGH_RESCAN = 300.0  # seconds between re-walks of every journaled checkpoint (re-saves that kept names)
SCAN_PATIENCE = 120.0  # seconds a --scan waits for a resource problem to pass before it ends with status 1
STOP_GRACE = 10.0  # seconds a job's process group gets between SIGTERM and SIGKILL when it is stopped
# Settings a reload cannot change: they name what is watched and where its state lives (restart for those).
FIXED_ON_RELOAD = ("output_dir", "results_dir", "journal_dir", "scratch_dir", "poll", "settle", "sentinel",
                   "checkpoint_pattern")  # fmt: skip


class Daemon:
    def __init__(self, setup: Setup, view: Any = None):
        """`view`: something with `update(Snapshot)` (watcher/live_view.py's LiveView), fed from the main loop."""
        self.setup = setup
        self.config = setup.config
        self.preset = setup.preset
        self.output_dir = Path(self.config.output_dir)
        self.results_dir = setup.results_dir
        create_dir(self.results_dir, "results dir")
        self._lock = take_lock(setup.journal_path.parent / "ckpt-watch.lock", self.results_dir)
        self.notifier = Notifier()
        self.journal = open_journal(setup.journal_path, self.notifier)
        self.detector = Detector(self.output_dir, checked_step=self.config.checked_step,
                                 known_fingerprint=self._known_fingerprint, settle=setup.settle,
                                 sentinel=self.config.sentinel, base_model=lambda: self.config.base_model)  # fmt: skip
        self.outbox = Outbox(self.journal, setup.sinks)
        self.resources = ResourceState()
        self._gave_up = False  # a --scan that ended on a resource problem
        self._noted_problem: str | None = None  # the resource problem as the journal last recorded it
        self._uncommitted: tuple[Job, RunningJob, Outcome] | None = None  # an outcome the journal did not take yet
        self.running: RunningJob | None = None
        self._stop_requested = False
        self._stop_deadline = 0.0  # time.monotonic() until which a running job may still finish
        self._reload_requested = False
        self._feed: Feed | None = None
        self._mode = "?"  # inotify, polling every N s, or scan (set by startup.announce)
        self.view = view
        self._next_view = 0.0
        self._view_feed = ViewFeed(self.journal)
        self._finished_this_session = 0  # jobs that ended (ok or failed for good) since start: the scan summary
        # What the live view says while no job runs (the demo: "training is running ..."); None: the default.
        self.idle_text: Callable[[], str] | None = None

    # --- the main loop ---------------------------------------------------------------------------------------

    def run(self, scan: bool = False, finish_when: Callable[[], bool] | None = None) -> int:
        """Watch until stopped (SIGINT/SIGTERM), or with `scan`, until every complete checkpoint is done.

        `finish_when`: also end once idle and this returns True (used by `ckpt-watch demo`).
        Returns the exit status: 1 if a job of this preset is failed (scan), else 0.
        """
        install_signal_handlers(self._on_stop_signal, self._on_reload_signal)
        with self.resources.guard("start up"):
            stop_left_behind(self.journal, self.results_dir)
            for checkpoint in self.journal.checkpoints_without_progress():  # admitted by an older version
                self.journal.set_progress(checkpoint.id, read_progress(checkpoint.path))
            self.journal.set_meta("sinks", [sink.name for sink in self.setup.sinks])
            recovered = self.journal.recover_interrupted()
            if recovered:
                log.info("%d job(s) interrupted by the last stop are pending again", recovered)
            self.deliver_pending()
            if scan and self.config.policy == "all":
                self.journal.requeue(self.preset.name, [JobState.SKIPPED])
            if self.setup.retry_failed:
                count = self.journal.requeue(self.preset.name, [JobState.FAILED])
                log.info("re-queued %d failed job(s)", count)

        if not scan:
            self._feed = start_feed(self.output_dir, self.setup.poll,
                                    lambda name: self.config.step_of(name) is not None)  # fmt: skip
            if isinstance(self._feed, PollingFeed):
                self.setup.poll = self._feed.interval  # FALLBACK_POLL where inotify could not be used
        self._mode = announce(self.setup, self._feed)
        with self.resources.guard("look at the output dir"):
            self.reconcile()
        self.notifier.ready(self.status_line())
        next_reconcile = time.monotonic() + self._reconcile_interval()
        next_thorough = time.monotonic() + THOROUGH_RESCAN
        changed: set[str] = set()
        final_look = False
        while True:
            # Pinged from here only: if anything below wedges the loop, the pings stop and systemd restarts us.
            self.notifier.watchdog()
            if self._reload_requested:
                with self.resources.guard("reload the configuration"):
                    self.reload()
            self.run_stages(changed)
            if self._stop_requested and (self.running is None or time.monotonic() >= self._stop_deadline):
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
            overflowed = self._feed is not None and self._feed.overflowed()  # events were lost: rescan now
            if overflowed or time.monotonic() >= next_reconcile:
                thorough = overflowed or time.monotonic() >= next_thorough
                if self.resources.due():
                    with self.resources.guard("look at the output dir"):
                        self.reconcile(thorough)
                next_reconcile = time.monotonic() + self._reconcile_interval()
                if thorough:
                    next_thorough = time.monotonic() + THOROUGH_RESCAN
        return self.shutdown(scan)

    def run_stages(self, changed: set[str]) -> None:
        """One round of the pipeline after the watchdog ping. A full disk, a quota or a folder we may not write
        is a state, not a crash (watcher/resources.py): the stage is tried again after a backoff while the loop
        goes on; the running job is followed every round regardless."""
        resources, failures = self.resources, self.resources.failures
        with resources.guard("follow the running job"):
            self.supervise()
        if not resources.due():
            return
        with resources.guard("look at new checkpoints"):
            self.detect(changed)
        with resources.guard("commit a result to the journal"):
            self._commit_pending()
        with resources.guard("deliver results"):
            self.outbox.poll()
            # A sink that was down is due for another try, or one that batches waits for the jobs to be done.
            if self.outbox.next_attempt_in() == 0 or (self.outbox.waiting_for_idle and self.idle()):
                self.deliver_pending()
        if self.running is None and self._uncommitted is None and not self._stop_requested:
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
            self.journal.set_meta("resources", {"problem": problem, "since": self.resources.since} if problem else None)
        except (sqlite3.Error, OSError):
            return  # the disk is full: `status` sees that itself; noted at a later round
        self._noted_problem = problem

    def shutdown(self, scan: bool) -> int:
        self.notifier.stopping()
        if self.running is not None:
            log.info("stopping the running job (%s); it will run again at the next start", self._describe(self.running.job))
            self.running.stop(STOP_GRACE)
            self.running.close()
            self.running = None
            with self.resources.guard("stop"):
                self.journal.recover_interrupted()
        if self._feed is not None:
            self._feed.stop()
        failed = [j for j in self.journal.jobs(self.preset.name, [JobState.FAILED])
                  if not j.checkpoint.gone] if scan else []  # fmt: skip
        # A backfill (--scan) ends with every sink delivered to; a stop asked for by a signal waits for a delivery
        # already on its way (briefly) but starts no slow one: those results stay in the journal for the next start.
        finished_scan = scan and not self._stop_requested
        pending = {sink.name: self.journal.undelivered_count(sink.name) for sink in self.outbox.sinks}  # if it fails
        pending = {name: n for name, n in pending.items() if n}
        with self.resources.guard("deliver results"):
            self.outbox.wait(None if finished_scan else STOP_GRACE)
            pending = {name: n for name, n in self.outbox.deliver_pending(include_slow=finished_scan).items() if n}
        if pending:
            log.warning("results not yet delivered (they stay in the journal; `ckpt-watch sync %s` delivers them): %s",
                        self.output_dir, ", ".join(f"{name} {n}" for name, n in pending.items()))  # fmt: skip
        self.outbox.close()
        if self.view is not None:
            self._update_view(force=True)
        self.journal.close()
        if failed:
            log.error("%d job(s) failed; see the logs under %s (use --retry-failed to run them again)",
                      len(failed), self.results_dir)  # fmt: skip
        # The files sink is local and always on: a backfill that could not write its results did not finish
        # (W&B waiting for a live run, by contrast, is the normal `defer` case).
        unwritten = finished_scan and pending.get("files", 0) > 0
        if finished_scan:  # its last line: what it did and where to look
            deliveries = ", ".join(f"{name} {n}" for name, n in pending.items()) or "none"
            log.info("scan done: %d job(s) evaluated, %d failed, pending deliveries: %s; results in %s "
                     "(`ckpt-watch status %s`)", self._finished_this_session, len(failed), deliveries,
                     self.results_dir, self.output_dir)  # fmt: skip
        return 1 if failed or unwritten or self._gave_up else 0

    def request_stop(self, grace: float = 0.0) -> None:
        """Take no new job; a running one may finish within `grace` seconds. A second request stops it now."""
        now = time.monotonic()
        self._stop_deadline = now if self._stop_requested else now + grace
        self._stop_requested = True
        if self._feed is not None:
            self._feed.wake()

    def reload(self) -> None:
        """SIGHUP: build the set-up again from the config file and use it from the next job on; the queue stays.

        A config that does not load (bad TOML, unknown preset, unavailable device) or that changes what is watched
        is rejected with a log line, and the old one stays.
        """
        self._reload_requested = False
        self.notifier.reloading()
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
        self.setup, self.config, self.preset = new, new.config, new.preset
        self.outbox.replace_sinks(new.sinks)
        self.journal.set_meta("sinks", [sink.name for sink in new.sinks])
        log.info("configuration reloaded: preset %s, policy %s, device %s", self.preset.name, self.config.policy,
                 self.setup.device)  # fmt: skip
        self.reconcile()  # every present checkpoint gets its job of the (new) preset
        self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """What the daemon does, in one line (systemd's STATUS=, `systemctl status`)."""
        pending = len(self.journal.jobs(self.preset.name, [JobState.PENDING]))
        return status_line(self.running, pending, self.preset.name, self._stop_requested, self.resources.problem,
                           self.output_dir)  # fmt: skip

    # --- detect ----------------------------------------------------------------------------------------------

    def reconcile(self, thorough: bool = True) -> None:
        """Scan of the output dir: catches what events missed (inotify overflow), deletions, and under polling
        everything. Checkpoints already journaled are walked again only when `thorough` (every
        THOROUGH_RESCAN seconds) or when their folder's own stat changed."""
        names = self.detector.candidates()
        if names is None:
            return
        listed = set(names)
        for checkpoint in self.journal.present_checkpoints():
            self._gone(checkpoint, listed)
        self.admit(self.detector.check(names, thorough))
        for checkpoint in self.journal.present_checkpoints():
            self.journal.ensure_jobs(checkpoint, self._variants(checkpoint.variants), self.preset.name)

    def detect(self, changed: set[str]) -> None:
        names = {n for n in changed if self.config.step_of(n) is not None} | set(self.detector.due())
        for name in names:
            latest = self.journal.latest_checkpoint(name)
            if latest is not None and not latest.gone:
                self._gone(latest)
        self.admit(self.detector.check(names))

    def admit(self, ready: list[Ready]) -> None:
        """Journal newly complete checkpoints and create their jobs."""
        for found in ready:
            checkpoint = self.journal.add_checkpoint(
                found.name, found.step, found.path, found.fingerprint, found.verdict.layout,
                found.verdict.variants or ("regular",), found.progress,
            )  # fmt: skip
            self.journal.ensure_jobs(checkpoint, self._variants(checkpoint.variants), self.preset.name)
            generation = f" (generation {checkpoint.generation})" if checkpoint.generation > 1 else ""
            log.info("%s complete%s: layout %s, variants %s", found.name, generation, found.verdict.layout,
                     ", ".join(self._variants(checkpoint.variants)))  # fmt: skip

    def _gone(self, checkpoint: Checkpoint, listed: set[str] | None = None) -> bool:
        """Whether a journaled checkpoint is gone (the one place that decides): the journal says so (a re-save,
        or deleted before), or its folder is not among `listed` (a scan's names), else not there now. The first
        time, its unfinished jobs are recorded as gone."""
        if self.journal.checkpoint_gone(checkpoint.id):
            return True
        if checkpoint.name in listed if listed is not None else checkpoint.path.is_dir():
            return False
        self.journal.mark_gone(checkpoint.id)
        log.info("%s was deleted (checkpoint rotation?); its unfinished jobs are recorded as gone", checkpoint.name)
        return True

    # --- schedule and run --------------------------------------------------------------------------------------

    def schedule(self) -> None:
        if self.journal.jobs(states=ACTIVE_STATES):  # nothing runs: a start cut short by a full disk left it so
            self.journal.recover_interrupted()
        pending = self.journal.jobs(self.preset.name, [JobState.PENDING])
        decision = decide(pending, self.config.policy, time.time(), settling_steps=self.detector.settling_steps())
        if decision.skip:
            newest = max(j.checkpoint.step for j in pending)
            self.journal.skip([j.id for j in decision.skip], f"policy latest: overtaken by step {newest}")
            log.info("policy latest: skipping %s", ", ".join(sorted({j.checkpoint.name for j in decision.skip})))
        if decision.run is not None:
            self.start(decision.run)

    def start(self, job: Job) -> None:
        if self._gone(job.checkpoint):
            return
        started = self.journal.start(job)
        if started is None:  # not pending any more: nothing to run
            return
        job, checkpoint = started, started.checkpoint
        paths = JobPaths.for_job(self.results_dir, self.config.resolved_scratch_dir(), job)
        spec = JobSpec(job_id=job.id, checkpoint_name=checkpoint.name, checkpoint_path=checkpoint.path,
                       step=checkpoint.step, generation=checkpoint.generation, layout=checkpoint.layout,
                       variants=checkpoint.variants, variant=job.variant, preset=self.preset,
                       devices=self.setup.device.child_devices,
                       base_model=Path(self.config.base_model) if self.config.base_model else None,
                       scratch_dir=paths.scratch, outcome_path=paths.outcome, parent_pid=os.getpid())  # fmt: skip
        timeout = self.preset.time_budget or self.config.job_timeout
        env = child_environment(self.setup.gpu_entries)
        self.running = launch(job, spec, paths, env, timeout, self.journal.processes)
        log.info("started %s on %s (attempt %d)", self._describe(job), self.setup.device, job.attempts)

    def supervise(self) -> None:
        """Follow the running job: stage changes, its checkpoint vanishing, timeout, and its end."""
        running = self.running
        if running is None:
            return
        job = running.job
        for stage in running.new_stages():
            if stage == JobState.EVALUATING:
                self.journal.set_stage(job.id, JobState.EVALUATING)
        if self._gone(job.checkpoint):
            log.info("%s: checkpoint went away during the job; stopping it", self._describe(job))
            self._end_running(stop=True)
            return
        if running.poll() is None:
            if running.timed_out:
                log.warning("%s: timed out after %.0f s; stopping it", self._describe(job), running.timeout)
                self._end_running(stop=True)
                self._commit(job, running, Outcome.failure(f"timed out after {running.timeout:.0f} s"))
            return
        outcome = running.outcome()
        keep_merged(job, outcome, self.config.keep_merged, self.config.resolved_scratch_dir(), self.config.step_of)
        self._end_running(stop=False)
        if not outcome.ok and self._gone(job.checkpoint):
            return
        self._commit(job, running, outcome)

    def _commit(self, job: Job, running: RunningJob, outcome: Outcome) -> None:
        """Record a job's outcome; kept in memory until the journal can take it (a full disk), so that nothing
        finished is lost, and no other job starts meanwhile."""
        self._uncommitted = (job, running, outcome)
        self._commit_pending()

    def _commit_pending(self) -> None:
        if self._uncommitted is not None:
            self.record(*self._uncommitted)
            self._uncommitted = None
            self.deliver_pending()

    def _end_running(self, stop: bool) -> None:
        assert self.running is not None
        if stop:
            self.running.stop(STOP_GRACE)
        self.running.close()
        self.running = None

    # --- record and deliver ----------------------------------------------------------------------------------

    def record(self, job: Job, running: RunningJob, outcome: Outcome) -> None:
        """Commit the outcome to the journal first; only then deliver it to the sinks."""
        attempt = job.attempts  # as journal.start left it (`job` is the running one)
        if not outcome.ok and attempt < self.config.max_attempts and outcome.kind is not OutcomeKind.PERMANENT:
            delay = self.config.retry_backoff * 2 ** (attempt - 1)
            self.journal.retry_later(job.id, outcome.error or "failed", delay)
            log.warning("%s failed (attempt %d of %d, retry in %.0f s): %s", self._describe(job), attempt,
                        self.config.max_attempts, delay, outcome.error)  # fmt: skip
            return
        result = build_result(job, outcome, attempt=attempt, started=running.started, device=str(self.setup.device),
                              cuda_visible_devices=",".join(self.setup.gpu_entries),
                              log_file=str(running.paths.log.relative_to(self.results_dir)))  # fmt: skip
        if not self.journal.finish(job.id, result):
            return
        self._finished_this_session += 1
        self._view_feed.add(result)
        if result.ok:
            log.info("%s done in %.1f s: %s", self._describe(job), result.walltime_s, headline_text(result.metrics))
        else:
            log.error("%s failed after %d attempt(s): %s", self._describe(job), attempt, result.error)

    def snapshot(self) -> Snapshot:
        """What the live view shows, as plain data (see watcher/view_feed.py)."""
        header = Snapshot(str(self.output_dir), self._mode, self.preset.name, self.config.policy,
                          str(self.setup.device))  # fmt: skip
        idle_text = self.idle_text() if self.idle_text is not None and self.running is None else None
        return self._view_feed.snapshot(header, self.journal.jobs(self.preset.name, [JobState.PENDING]),
                                        self.running, self.outbox, self._stop_requested, idle_text)  # fmt: skip

    def _update_view(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_view:
            self._next_view = now + VIEW_INTERVAL
            self.view.update(self.snapshot())

    def deliver_pending(self) -> None:
        """Deliver every committed result a sink has not yet acknowledged (see watcher/outbox.py); a slow sink
        (W&B) in the background, so the loop goes on watching."""
        self.outbox.deliver_pending(background=True, idle=self.idle())

    # --- helpers ---------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        return (
            self.running is None
            and not self.detector.settling
            and not self.journal.jobs(self.preset.name, [JobState.PENDING])
        )

    def _variants(self, available: tuple[str, ...]) -> list[str]:
        return [v for v in self.config.variants if v in available]

    def _known_fingerprint(self, name: str) -> str | None:
        latest = self.journal.latest_checkpoint(name)
        return latest.fingerprint if latest is not None and not latest.gone else None

    def _reconcile_interval(self) -> float:
        return self.setup.poll if self.setup.poll is not None else self.config.rescan_interval

    def _timeout(self, next_reconcile: float) -> float:
        candidates = [TICK, max(0.0, next_reconcile - time.monotonic())]
        due = self.detector.next_due()
        if due is not None:
            candidates.append(due)
        return min(candidates)

    def _wait(self, timeout: float) -> set[str]:
        if self._feed is None:
            time.sleep(timeout)
            return set()
        return self._feed.wait(timeout)

    def _on_stop_signal(self, name: str) -> None:
        """SIGINT/SIGTERM: no new jobs; the running one may finish within stop_grace. A second one stops it now."""
        if self._stop_requested:
            log.info("received %s again: stopping the running job now", name)
        elif self.running is not None:
            log.info("received %s: no new jobs; the running one may finish within %g s", name, self.config.stop_grace)
        else:
            log.info("received %s: finishing up", name)
        self.notifier.stopping()
        self.request_stop(self.config.stop_grace)

    def _on_reload_signal(self) -> None:
        log.info("received SIGHUP: reloading the configuration")
        self._reload_requested = True  # done by the loop, between two stages
        if self._feed is not None:
            self._feed.wake()

    @staticmethod
    def _describe(job: Job) -> str:
        return f"{job.checkpoint.name}/{job.variant}/{job.preset}"

