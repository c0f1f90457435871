"""The daemon: one loop that runs the pipeline detect -> journal -> schedule -> run -> record -> deliver.

Read `Daemon.run` top to bottom: everything else is one stage each. The loop is single-threaded (the only
other thread is watchdog's observer, which just queues folder names), and heavy work happens in job child
processes, so the daemon stays small and responsive and never touches CUDA itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import sys
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from watcher import __version__
from watcher.config import ConfigError
from watcher.detect import Detector, Ready
from watcher.devices import child_environment
from watcher.jobs import JobPaths, RunningJob, launch
from watcher.journal import ACTIVE_STATES, Job, Journal
from watcher.live_view import ResultRow, RunningView, Snapshot
from watcher.scheduler import decide
from watcher.setup import Setup, create_dir, take_lock
from watcher.notify import Notifier
from watcher.outbox import Outbox
from watcher.processes import stop_leftovers
from watcher.resources import ResourceState, out_of_space, resource_problem
from watcher.sinks.naming import checkpoint_progress
from watcher.sinks.wandb_run import DELIVERIES
from watcher.watch import InotifyFeed, PollingFeed

log = logging.getLogger("ckpt-watch")

TICK = 0.5  # seconds between looks at a running job; events wake the loop sooner
FALLBACK_POLL = 2.0  # when inotify cannot be used on a local disk
VIEW_INTERVAL = 0.25  # seconds between snapshots for the live view (it redraws 4 times a second)
RECENT_RESULTS = 8  # rows in the live view's results table
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
        self.journal = self._open_journal()
        self.detector = Detector(
            self.output_dir,
            checked_step=self.config.checked_step,
            known_fingerprint=self._known_fingerprint,
            settle=setup.settle,
            sentinel=self.config.sentinel,
            base_model=lambda: self.config.base_model,
        )
        self.outbox = Outbox(self.journal, setup.sinks)
        self.resources = ResourceState()
        self._gave_up = False  # a --scan that ended on a resource problem
        self._noted_problem: str | None = None  # the resource problem as the journal last recorded it
        self._uncommitted: tuple[Job, RunningJob, dict[str, Any]] | None = None  # an outcome the journal did not take yet
        self.running: RunningJob | None = None
        self._stop_requested = False
        self._stop_deadline = 0.0  # time.monotonic() until which a running job may still finish
        self._reload_requested = False
        self._feed: InotifyFeed | PollingFeed | None = None
        self._mode = "?"  # inotify, polling every N s, or scan (set by _announce)
        self.view = view
        self._next_view = 0.0
        self._recent: deque[dict[str, Any]] | None = None  # the latest results, for the view (loaded lazily)
        self._finished_this_session = 0  # jobs that ended (ok or failed for good) since start: the scan summary
        # What the live view says while no job runs (the demo: "training is running ..."); None: the default.
        self.idle_text: Callable[[], str] | None = None

    # --- the main loop ---------------------------------------------------------------------------------------

    def run(self, scan: bool = False, finish_when: Callable[[], bool] | None = None) -> int:
        """Watch until stopped (SIGINT/SIGTERM), or with `scan`, until every complete checkpoint is done.

        `finish_when`: also end once idle and this returns True (used by `ckpt-watch demo`).
        Returns the exit status: 1 if a job of this preset is failed (scan), else 0.
        """
        self._install_signal_handlers()
        with self.resources.guard("start up"):
            self._stop_leftovers()
            self.journal.set_meta("sinks", [sink.name for sink in self.setup.sinks])
            recovered = self.journal.recover_interrupted()
            if recovered:
                log.info("%d job(s) interrupted by the last stop are pending again", recovered)
            self.deliver_pending()
            if scan and self.config.policy == "all":
                self.journal.requeue(self.preset.name, ["skipped"])
            if self.setup.retry_failed:
                count = self.journal.requeue(self.preset.name, ["failed"])
                log.info("re-queued %d failed job(s)", count)

        if not scan:
            self._feed = self._start_feed()
        self._announce(scan)
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
        failed = [j for j in self.journal.jobs(self.preset.name, ["failed"]) if not j.checkpoint.gone] if scan else []
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
        if finished_scan:
            self._scan_summary(failed, pending)
        return 1 if failed or unwritten or self._gave_up else 0

    def _scan_summary(self, failed: list[Job], pending: dict[str, int]) -> None:
        """The last line of a finished --scan: what it did and where to look."""
        evaluated = self._finished_this_session
        deliveries = ", ".join(f"{name} {n}" for name, n in pending.items()) or "none"
        log.info("scan done: %d job(s) evaluated, %d failed, pending deliveries: %s; results in %s "
                 "(`ckpt-watch status %s`)", evaluated, len(failed), deliveries, self.results_dir,
                 self.output_dir)  # fmt: skip

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
        pending = len(self.journal.jobs(self.preset.name, ["pending"]))
        if self.running is not None:
            job, progress = self.running.job, self.running.progress
            detail = ""
            if progress.get("total"):
                detail = f" {100 * progress.get('done', 0) // progress['total']}%"
            elif progress.get("steps"):
                detail = f" (step {progress.get('step')} of {progress['steps']}: {progress.get('backend')})"
            return (f"{self.running.stage}{detail} {job.checkpoint.name}/{job.variant} ({self.preset.name}); "
                    f"{pending} more queued")  # fmt: skip
        if self._stop_requested:
            return "stopping"
        if self.resources.problem:
            return f"waiting: {self.resources.problem}; {pending} queued"
        return f"idle, watching {self.output_dir}; {pending} queued"

    # --- detect ----------------------------------------------------------------------------------------------

    def reconcile(self, thorough: bool = True) -> None:
        """Scan of the output dir: catches what events missed (inotify overflow), deletions, and under polling
        everything. Checkpoints already journaled are walked again only when `thorough` (every
        THOROUGH_RESCAN seconds) or when their folder's own stat changed."""
        names = self.detector.candidates()
        if names is None:
            return
        present = set(names)
        for checkpoint in self.journal.present_checkpoints():
            if checkpoint.name not in present:
                self._gone(checkpoint.id, checkpoint.name)
        self.admit(self.detector.check(names, thorough))
        for checkpoint in self.journal.present_checkpoints():
            self.journal.ensure_jobs(checkpoint, self._variants(checkpoint.variants), self.preset.name)

    def detect(self, changed: set[str]) -> None:
        names = {n for n in changed if self.config.step_of(n) is not None} | set(self.detector.due())
        for name in names:
            latest = self.journal.latest_checkpoint(name)
            if latest is not None and not latest.gone and not (self.output_dir / name).is_dir():
                self._gone(latest.id, name)
        self.admit(self.detector.check(names))

    def admit(self, ready: list[Ready]) -> None:
        """Journal newly complete checkpoints and create their jobs."""
        for found in ready:
            checkpoint = self.journal.add_checkpoint(
                found.name, found.step, found.path, found.fingerprint, found.verdict.layout,
                found.verdict.variants or ("regular",),
            )  # fmt: skip
            self.journal.ensure_jobs(checkpoint, self._variants(checkpoint.variants), self.preset.name)
            generation = f" (generation {checkpoint.generation})" if checkpoint.generation > 1 else ""
            log.info("%s complete%s: layout %s, variants %s", found.name, generation, found.verdict.layout,
                     ", ".join(self._variants(checkpoint.variants)))  # fmt: skip

    def _gone(self, checkpoint_id: int, name: str) -> None:
        self.journal.mark_gone(checkpoint_id)
        log.info("%s was deleted (checkpoint rotation?); its unfinished jobs are recorded as gone", name)

    # --- schedule and run --------------------------------------------------------------------------------------

    def schedule(self) -> None:
        if self.journal.jobs(states=ACTIVE_STATES):  # nothing runs: a start cut short by a full disk left it so
            self.journal.recover_interrupted()
        pending = self.journal.jobs(self.preset.name, ["pending"])
        if self.config.policy == "latest" and pending and self._newer_settling(pending):
            return  # a newer checkpoint is seconds from admission and would overtake whatever starts now
        decision = decide(pending, self.config.policy, time.time())
        if decision.skip:
            newest = max(j.checkpoint.step for j in pending)
            self.journal.skip([j.id for j in decision.skip], f"policy latest: overtaken by step {newest}")
            log.info("policy latest: skipping %s", ", ".join(sorted({j.checkpoint.name for j in decision.skip})))
        if decision.run is not None:
            self.start(decision.run)

    def _newer_settling(self, pending: list[Job]) -> bool:
        newest = max(j.checkpoint.step for j in pending)
        return any(step > newest for step in self.detector.settling_steps())

    def start(self, job: Job) -> None:
        if not job.checkpoint.path.is_dir():
            self._gone(job.checkpoint.id, job.checkpoint.name)
            return
        self.journal.start(job.id)
        job = self.journal.job(job.id)
        spec = {
            "job_id": job.id,
            "checkpoint_name": job.checkpoint.name,
            "checkpoint_path": str(job.checkpoint.path),
            "step": job.checkpoint.step,
            "variant": job.variant,
            "preset": self.preset.to_dict(),
            "device": self.setup.device.child_device,
            "parent_pid": os.getpid(),
            "base_model": str(self.config.base_model) if self.config.base_model else None,
        }
        timeout = self.preset.time_budget or self.config.job_timeout
        env = child_environment(self.setup.device, self.setup.gpu_entries)
        paths = JobPaths.for_job(self.results_dir, self.config.resolved_scratch_dir(), job)
        self.running = launch(job, spec, paths, env, timeout, self.journal.processes)
        log.info("started %s on %s (attempt %d)", self._describe(job), self.setup.device, job.attempts)

    def supervise(self) -> None:
        """Follow the running job: stage changes, its checkpoint vanishing, timeout, and its end."""
        running = self.running
        if running is None:
            return
        job = running.job
        for stage in running.new_stages():
            if stage == "evaluating":
                self.journal.set_stage(job.id, "evaluating")
        if not job.checkpoint.path.is_dir() or self.journal.job(job.id).state == "gone":
            log.info("%s: checkpoint went away during the job; stopping it", self._describe(job))
            self._end_running(stop=True)
            if not job.checkpoint.gone:
                self.journal.mark_gone(job.checkpoint.id)
            return
        if running.poll() is None:
            if running.timed_out:
                log.warning("%s: timed out after %.0f s; stopping it", self._describe(job), running.timeout)
                self._end_running(stop=True)
                self._commit(job, running, {"status": "failed", "error": f"timed out after {running.timeout:.0f} s"})
            return
        outcome = running.outcome()
        self._keep_merged(job, outcome)
        self._end_running(stop=False)
        if outcome.get("status") != "ok" and not job.checkpoint.path.is_dir():
            self._gone(job.checkpoint.id, job.checkpoint.name)
            return
        self._commit(job, running, outcome)

    def _commit(self, job: Job, running: RunningJob, outcome: dict[str, Any]) -> None:
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

    def _keep_merged(self, job: Job, outcome: dict[str, Any]) -> None:
        """Move a merged model out of the job's scratch folder (deleted next) if the newest K are to be kept."""
        merged, keep = outcome.get("merged_model"), self.config.keep_merged
        if not merged or not keep or outcome.get("status") != "ok" or not Path(merged).is_dir():
            return
        kept = self.config.resolved_scratch_dir() / "merged" / job.variant
        kept.mkdir(parents=True, exist_ok=True)
        destination = kept / job.checkpoint.name
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(merged, destination)
        by_step = sorted(kept.iterdir(), key=lambda p: self.config.step_of(p.name) or -1)
        for old in by_step[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("kept the merged model at %s", destination)

    # --- record and deliver ----------------------------------------------------------------------------------

    def record(self, job: Job, running: RunningJob, outcome: dict[str, Any]) -> None:
        """Commit the outcome to the journal first; only then deliver it to the sinks."""
        attempt = self.journal.job(job.id).attempts
        ok = outcome.get("status") == "ok"
        if not ok and attempt < self.config.max_attempts and not outcome.get("permanent"):
            delay = self.config.retry_backoff * 2 ** (attempt - 1)
            self.journal.retry_later(job.id, outcome.get("error", "failed"), delay)
            log.warning("%s failed (attempt %d of %d, retry in %.0f s): %s", self._describe(job), attempt,
                        self.config.max_attempts, delay, outcome.get("error"))  # fmt: skip
            return
        record = self._build_record(job, running, outcome, attempt)
        if not self.journal.finish(job.id, record):
            return
        self._finished_this_session += 1
        if self._recent is not None:
            self._recent.append(record)
        if ok:
            headline = self._headline_text(record["metrics"])
            log.info("%s done in %.1f s: %s", self._describe(job), record["walltime_s"], headline)
        else:
            log.error("%s failed after %d attempt(s): %s", self._describe(job), attempt, record["error"])

    @staticmethod
    def _headline_text(metrics: dict[str, float]) -> str:
        """The headline metrics (watcher/metrics.py), else the first few by name."""
        from watcher.metrics import headline_metrics

        shown = headline_metrics(metrics, fallback=5)
        more = len([k for k in metrics if not k.endswith("_stderr")]) - len(shown)
        return ", ".join(f"{k}={metrics[k]:.4g}" for k in shown) + (f" (+{more} more)" if more > 0 else "")

    def snapshot(self) -> Snapshot:
        """What the live view shows, as plain data (see watcher/live_view.py)."""
        from watcher.metrics import headline_metrics

        pending = sorted(self.journal.jobs(self.preset.name, ["pending"]), key=lambda j: (j.checkpoint.step, j.variant))
        running = None
        if self.running is not None:
            job, progress = self.running.job, self.running.progress

            def number(key: str) -> int | None:
                value = progress.get(key)
                return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

            running = RunningView(checkpoint=job.checkpoint.name, variant=job.variant, stage=self.running.stage,
                                  started_at=self.running.started, done=number("done"), total=number("total"),
                                  step=number("step"), steps=number("steps"),
                                  backend=str(progress["backend"]) if "backend" in progress else None)  # fmt: skip
        if self._recent is None:
            self._recent = deque(self.journal.results()[-RECENT_RESULTS:], maxlen=RECENT_RESULTS)
        recent = list(self._recent)
        names = {m for r in recent if r["status"] == "ok" for m in r.get("metrics", {})}
        headlines = headline_metrics(names, fallback=4)
        rows = [ResultRow(step=r["step"], checkpoint=r["checkpoint"], variant=r["variant"], preset=r["preset"],
                          status=r["status"], walltime_s=float(r.get("walltime_s") or 0.0),
                          metrics={k: v for k, v in r.get("metrics", {}).items() if k in headlines},
                          error=r.get("error")) for r in recent]  # fmt: skip
        return Snapshot(
            output_dir=str(self.output_dir),
            mode=self._mode,
            preset=self.preset.name,
            policy=self.config.policy,
            device=str(self.setup.device),
            queue=[(j.checkpoint.name, j.variant) for j in pending],
            running=running,
            results=rows,
            headlines=headlines,
            undelivered={sink.name: self.journal.undelivered_count(sink.name) for sink in self.outbox.sinks},
            undelivered_why={sink.name: self.outbox.waiting_reason(sink.name) for sink in self.outbox.sinks},
            stopping=self._stop_requested,
            idle_text=self.idle_text() if self.idle_text is not None and self.running is None else None,
        )

    def _update_view(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_view:
            self._next_view = now + VIEW_INTERVAL
            self.view.update(self.snapshot())

    def _build_record(self, job: Job, running: RunningJob, outcome: dict[str, Any], attempt: int) -> dict[str, Any]:
        finished = time.time()
        return {
            "result_id": uuid.uuid4().hex,
            "step": job.checkpoint.step,
            "checkpoint": job.checkpoint.name,
            "checkpoint_path": str(job.checkpoint.path),
            "generation": job.checkpoint.generation,
            "layout": job.checkpoint.layout,
            "variant": job.variant,
            "preset": job.preset,
            "status": "ok" if outcome.get("status") == "ok" else "failed",
            "error": outcome.get("error"),
            "metrics": outcome.get("metrics", {}),
            "raw": outcome.get("raw", {}),
            "versions": {"ckpt_watch": __version__, **outcome.get("versions", {})},
            "device": str(self.setup.device),
            "cuda_visible_devices": ",".join(self.setup.gpu_entries),
            "attempt": attempt,
            "started_at": _iso(running.started),
            "finished_at": _iso(finished),
            "walltime_s": round(finished - running.started, 3),
            "timings": outcome.get("timings", {}),
            "stages": outcome.get("stages", {}),
            "progress": checkpoint_progress(job.checkpoint.path),
            "log": str(running.paths.log.relative_to(self.results_dir)),
        }

    def deliver_pending(self) -> None:
        """Deliver every committed result a sink has not yet acknowledged (see watcher/outbox.py); a slow sink
        (W&B) in the background, so the loop goes on watching."""
        self.outbox.deliver_pending(background=True, idle=self.idle())

    # --- helpers ---------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        return (
            self.running is None
            and not self.detector.settling
            and not self.journal.jobs(self.preset.name, ["pending"])
        )

    def _variants(self, available: tuple[str, ...]) -> list[str]:
        return [v for v in self.config.variants if v in available]

    def _known_fingerprint(self, name: str) -> str | None:
        latest = self.journal.latest_checkpoint(name)
        return latest.fingerprint if latest is not None and not latest.gone else None

    def _start_feed(self) -> InotifyFeed | PollingFeed:
        if self.setup.poll is None:
            try:
                feed = InotifyFeed(self.output_dir, is_checkpoint=lambda name: self.config.step_of(name) is not None)
                feed.start()
                return feed
            except OSError as exc:  # e.g. the inotify instance or watch limit (fs.inotify.max_user_*) is reached
                log.warning("inotify unavailable (%s); polling every %g s instead", exc, FALLBACK_POLL)
                self.setup.poll = FALLBACK_POLL
        feed = PollingFeed(self.setup.poll)
        feed.start()
        return feed

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

    def _announce(self, scan: bool) -> None:
        mode = "scan" if scan else (self._feed.mode if self._feed else "?")
        where = f"polling every {self.setup.poll:g} s" if (self._feed and self._feed.mode == "polling") else mode
        self._mode = where
        log.info("ckpt-watch %s: %s (%s), preset %s, policy %s, device %s, settle %g s, results in %s",
                 __version__, self.output_dir, where, self.preset.name, self.config.policy, self.setup.device,
                 self.setup.settle, self.results_dir)  # fmt: skip
        if self.setup.journal_path.parent != self.results_dir:
            log.info("journal kept on local disk at %s", self.setup.journal_path)

    def _open_journal(self) -> Journal:
        """The journal; on a full disk, wait for room (telling systemd we are alive) rather than crash-loop."""
        waiting = ResourceState()
        while True:
            try:
                return Journal(self.setup.journal_path)
            except (OSError, sqlite3.Error) as exc:
                if not out_of_space(exc):
                    raise ConfigError(f"cannot open the journal {self.setup.journal_path}: "
                                      f"{resource_problem(exc) or exc}") from None  # fmt: skip
                first = waiting.problem is None
                waiting.failed("open the journal", resource_problem(exc) or str(exc))
                if first:
                    self.notifier.ready(f"waiting: {waiting.problem}")
            deadline = time.monotonic() + (waiting.next_try_in() or 0.0)
            while time.monotonic() < deadline:
                self.notifier.watchdog()
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _stop_leftovers(self) -> None:
        """A daemon killed with SIGKILL takes its children with it (watcher/processes.py); should any have
        survived (a guardian stuck), the journal knows their process groups: stop them before starting anew."""
        count, roles = stop_leftovers(self.journal.processes)
        shutil.rmtree(self.results_dir / DELIVERIES, ignore_errors=True)  # delivery folders of a killed daemon
        if count:
            log.warning("stopped %d process(es) left running by the previous ckpt-watch (%s)", count,
                        ", ".join(sorted(set(roles))))  # fmt: skip

    def _install_signal_handlers(self) -> None:
        def stop(signum, frame):
            if self._stop_requested:
                log.info("received %s again: stopping the running job now", signal.Signals(signum).name)
            elif self.running is not None:
                log.info("received %s: no new jobs; the running one may finish within %g s",
                         signal.Signals(signum).name, self.config.stop_grace)  # fmt: skip
            else:
                log.info("received %s: finishing up", signal.Signals(signum).name)
            self.notifier.stopping()
            self.request_stop(self.config.stop_grace)

        def reload(signum, frame):
            log.info("received SIGHUP: reloading the configuration")
            self._reload_requested = True
            if self._feed is not None:
                self._feed.wake()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        signal.signal(signal.SIGHUP, reload)

    @staticmethod
    def _describe(job: Job) -> str:
        return f"{job.checkpoint.name}/{job.variant}/{job.preset}"


def wait_for_output_dir(output_dir: Path, live: bool = False, interval: float = 1.0) -> bool:
    """Wait until the training run creates `output_dir` (a service is enabled before training starts).

    Tells systemd READY while waiting (nothing is wrong) and keeps pinging its watchdog. Returns False when
    stopped by SIGINT/SIGTERM first. Creates nothing: the folder is the trainer's to make.
    """
    message = f"waiting for {output_dir} to appear (training has not created it yet)"
    if live:  # logging is not set up before the live view starts
        print(f"ckpt-watch: {message}", file=sys.stderr, flush=True)
    else:
        log.info("%s", message)
    notifier = Notifier()
    notifier.ready(message)
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    # A reload (SIGHUP) would otherwise end the process; the config file is read afresh once the dir appears.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: notifier.ready(message))
    try:
        while not stopped and not output_dir.is_dir():
            notifier.watchdog()
            time.sleep(interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        notifier.stopping()
        log.info("received %s while waiting for %s: stopping", signal.Signals(stopped[0]).name, output_dir)
        return False
    log.info("%s appeared", output_dir)
    return True


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
