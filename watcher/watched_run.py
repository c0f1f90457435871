"""One training run the daemon watches: its output dir, journal, results dir, sinks and detector.

Everything that belongs to one run lives here, exactly as if the run had a daemon of its own: the journal
(checkpoints, jobs, results, deliveries), the lock on its results dir, the outbox to its sinks (its W&B run, its
TensorBoard dir), and the detection stage (which checkpoints are complete, which are gone, which jobs the
schedule wants). The daemon (watcher/daemon.py) shares what runs have in common: the pool of device slots, the
schedule's start order, the loop.
"""

from __future__ import annotations

import logging
from typing import Iterable

from watcher.alerts import Alerts
from watcher.detect import Detector, Ready, read_progress
from watcher.final import finished_step
from watcher.journal import Checkpoint, Job
from watcher.notify import Notifier
from watcher.outbox import Outbox
from watcher.records import ACTIVE_STATES, JobState
from watcher.retention import Retention
from watcher.schedules import final_checkpoint
from watcher.scheduler import RunQueue, wanted_jobs
from watcher.setup import RunSetup, Setup, create_dir, lock_path, take_lock
from watcher.startup import open_journal, stop_left_behind
from watcher.view_feed import ViewFeed
from watcher.watch import Feed

log = logging.getLogger("ckpt-watch")


class WatchedRun:
    def __init__(self, place: RunSetup, setup: Setup, notifier: Notifier):
        """`place`: this run's folders and sinks; `setup`: what all runs share (the schedule, its presets)."""
        self.place, self.setup = place, setup
        self.output_dir = place.output_dir
        self.name = place.name
        self.results_dir = place.results_dir
        create_dir(self.results_dir, "results dir")
        self._lock = take_lock(lock_path(place.journal_path), self.results_dir)
        self.journal = open_journal(place.journal_path, notifier)
        self.detector = Detector(self.output_dir, checked_step=place.config.checked_step,
                                 known_fingerprint=self._known_fingerprint, settle=place.settle,
                                 sentinel=place.config.sentinel, base_model=lambda: self.config.base_model)  # fmt: skip
        self.outbox = Outbox(self.journal, place.sinks)
        self.alerts = Alerts(self.journal, self.output_dir, self.results_dir, lambda: self.config.alerts,
                             f"[{self.name}] " if setup.config.several_runs else "")  # fmt: skip
        self.view_feed = ViewFeed(self.journal)
        self.feed: Feed | None = None
        self.finished_this_session = 0  # jobs that ended (ok or failed for good) since start: the scan summary
        self.final_step: int | None = None  # its final checkpoint's step, once the run is known finished
        # Log lines about this run's checkpoints name it when the daemon watches several.
        self.prefix = f"[{self.name}] " if setup.config.several_runs else ""
        # keep_best: the best checkpoints under RESULTS_DIR/best; every complete one held there until decided.
        self.retention = Retention(self.results_dir, self.journal, place.config, self.unfinished, self.prefix)

    @property
    def config(self):
        """This run's configuration (WatchConfig.for_run)."""
        return self.place.config

    def replace_setup(self, place: RunSetup, setup: Setup) -> None:
        """A reload: the new configuration from the next job on (what is watched stays: see Daemon.reload)."""
        self.place, self.setup = place, setup
        self.outbox.replace_sinks(place.sinks)
        self.retention.configure(place.config)
        self.journal.set_meta("sinks", [sink.name for sink in place.sinks])

    def start_up(self, scan: bool, retry_failed: bool, adopted: Iterable[int] = ()) -> None:
        """Before the loop: stop what a killed daemon left, put interrupted jobs back (but the `adopted` ones,
        Slurm jobs that run on), re-queue what --scan or --retry-failed asks for."""
        stop_left_behind(self.journal, self.results_dir)
        for checkpoint in self.journal.checkpoints_without_progress():  # admitted by an older version
            self.journal.set_progress(checkpoint.id, read_progress(checkpoint.path))
        self.journal.set_meta("sinks", [sink.name for sink in self.place.sinks])
        self.alerts.write_file()  # alerts.jsonl as the journal has it (a crash or full disk may have cut it short)
        recovered = self.journal.recover_interrupted(adopted)
        if recovered:
            log.info("%s%d job(s) interrupted by the last stop are pending again", self.prefix, recovered)
        if scan:  # a backfill runs what `latest` skipped before, for the entries that evaluate everything
            for entry in self.setup.schedule:
                if entry.policy == "all":
                    self.journal.requeue(entry.preset, [JobState.SKIPPED])
        if retry_failed:
            count = sum(self.journal.requeue(preset, [JobState.FAILED]) for preset in self.setup.presets)
            log.info("%sre-queued %d failed job(s)", self.prefix, count)

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
            self.gone(checkpoint, listed)
        self.admit(self.detector.check(names, thorough))
        self.ensure_jobs()
        self.retention.reconcile()

    def detect(self, changed: set[str]) -> None:
        names = {n for n in changed if self.config.step_of(n) is not None} | set(self.detector.due())
        for name in names:
            latest = self.journal.latest_checkpoint(name)
            if latest is not None and not latest.gone:
                self.gone(latest)
        self.admit(self.detector.check(names))

    def admit(self, ready: list[Ready]) -> None:
        """Journal newly complete checkpoints and create the jobs the schedule wants of them."""
        for found in ready:
            checkpoint = self.journal.add_checkpoint(
                found.name, found.step, found.path, found.fingerprint, found.verdict.layout,
                found.verdict.variants or ("regular",), found.progress,
            )  # fmt: skip
            self.retention.hold(checkpoint)
            generation = f" (generation {checkpoint.generation})" if checkpoint.generation > 1 else ""
            log.info("%s%s complete%s: layout %s, variants %s", self.prefix, found.name, generation,
                     found.verdict.layout, ", ".join(checkpoint.variants))  # fmt: skip
        if ready:
            self.ensure_jobs()

    def ensure_jobs(self) -> None:
        """Create every job the schedule asks for among present checkpoints (existing jobs stay as they are: a
        job once created runs even if a late checkpoint changes what `every` would pick now)."""
        checkpoints = self.journal.all_checkpoints()
        self.final_step = final_checkpoint([c.step for c in checkpoints], self._finished_step(),
                                           self.detector.settling)  # fmt: skip
        self.journal.ensure_jobs(wanted_jobs(self.setup.schedule, checkpoints, self.final_step))

    def _finished_step(self) -> int | None:
        """The trainer's last step once the run is known finished: its run record, or `ckpt-watch finalize`
        (watcher/final.py; read at every look at the output dir, two small files)."""
        return finished_step(self.output_dir, self.results_dir)

    def gone(self, checkpoint: Checkpoint, listed: set[str] | None = None) -> bool:
        """Whether a journaled checkpoint is gone (the one place that decides): the journal says so (a re-save,
        or deleted before), or its folder is not among `listed` (a scan's names), else not there now. The first
        time, its unfinished jobs are recorded as gone."""
        if self.journal.checkpoint_gone(checkpoint.id):
            return True
        if checkpoint.name in listed if listed is not None else checkpoint.path.is_dir():
            return False
        if self.retention.holds(checkpoint):  # deleted, but held for keep_best: evaluated from the hold
            return False
        self.journal.mark_gone(checkpoint.id)
        log.info("%s%s was deleted (checkpoint rotation?); its unfinished jobs are recorded as gone", self.prefix,
                 checkpoint.name)  # fmt: skip
        return True

    # --- what the scheduler sees -----------------------------------------------------------------------------

    def pending(self) -> list[Job]:
        """Pending jobs of the presets the schedule names (a reload may have dropped a preset: its jobs wait)."""
        return [job for job in self.journal.jobs(states=[JobState.PENDING]) if job.preset in self.setup.presets]

    def queue(self, queued: Iterable[Job] = ()) -> RunQueue:
        """`queued`: this run's jobs handed out but not begun (Slurm jobs still in Slurm's queue)."""
        return RunQueue(self.name, self.journal.all_checkpoints(), self.pending(), self.final_step,
                        tuple(self.detector.settling_steps()), tuple(queued))  # fmt: skip

    def unfinished(self) -> list[Job]:
        """Jobs still to run or running: a checkpoint with one is not decided yet (keep_best holds it)."""
        return self.pending() + self.journal.jobs(states=ACTIVE_STATES)

    def idle(self) -> bool:
        """Nothing settling, nothing pending (jobs running are the daemon's to know)."""
        return not self.detector.settling and not self.pending()

    def _known_fingerprint(self, name: str) -> str | None:
        latest = self.journal.latest_checkpoint(name)
        return latest.fingerprint if latest is not None and not latest.gone else None

    def deliver_pending(self, idle: bool) -> None:
        """Deliver every committed result a sink has not yet acknowledged (see watcher/outbox.py); a slow sink
        (W&B) in the background, so the loop goes on watching."""
        self.outbox.deliver_pending(background=True, idle=idle)
