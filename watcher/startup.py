"""Start-up: what happens before the daemon's loop runs: waiting for the output dir, opening the journal on a
full disk, stopping what a killed daemon left running, choosing between inotify and polling.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable

from watcher import __version__
from watcher.config import ConfigError
from watcher.journal import Journal
from watcher.notify import Notifier
from watcher.processes import stop_leftovers
from watcher.resources import ResourceState, out_of_space, resource_problem
from watcher.setup import RunSetup, Setup
from watcher.sinks.wandb_run import DELIVERIES
from watcher.watch import Feed, InotifyFeed, PollingFeed

log = logging.getLogger("ckpt-watch")

FALLBACK_POLL = 2.0  # seconds between looks when inotify cannot be used on a local disk


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


def open_journal(path: Path, notifier: Notifier) -> Journal:
    """The journal; on a full disk, wait for room (telling systemd we are alive) rather than crash-loop."""
    waiting = ResourceState()
    while True:
        try:
            return Journal(path)
        except (OSError, sqlite3.Error) as exc:
            if not out_of_space(exc):
                raise ConfigError(f"cannot open the journal {path}: {resource_problem(exc) or exc}") from None
            first = waiting.problem is None
            waiting.failed("open the journal", resource_problem(exc) or str(exc))
            if first:
                notifier.ready(f"waiting: {waiting.problem}")
        deadline = time.monotonic() + (waiting.next_try_in() or 0.0)
        while time.monotonic() < deadline:
            notifier.watchdog()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def stop_left_behind(journal: Journal, results_dir: Path) -> None:
    """A daemon killed with SIGKILL takes its children with it (watcher/processes.py); should any have
    survived (a guardian stuck), the journal knows their process groups: stop them before starting anew."""
    count, roles = stop_leftovers(journal.processes)
    shutil.rmtree(results_dir / DELIVERIES, ignore_errors=True)  # delivery folders of a killed daemon
    if count:
        log.warning("stopped %d process(es) left running by the previous ckpt-watch (%s)", count,
                    ", ".join(sorted(set(roles))))  # fmt: skip


def start_feed(output_dir: Path, poll: float | None, is_checkpoint: Callable[[str], bool]) -> Feed:
    """What wakes the loop: inotify events for `output_dir`, or with `poll` a look every `poll` seconds (also
    where inotify cannot be used: every FALLBACK_POLL seconds, said once)."""
    if poll is None:
        try:
            feed = InotifyFeed(output_dir, is_checkpoint=is_checkpoint)
            feed.start()
            return feed
        except OSError as exc:  # e.g. the inotify instance or watch limit (fs.inotify.max_user_*) is reached
            log.warning("inotify unavailable (%s); polling every %g s instead", exc, FALLBACK_POLL)
            poll = FALLBACK_POLL
    polling = PollingFeed(poll)
    polling.start()
    return polling


def announce(place: RunSetup, setup: Setup, feed: Feed | None) -> str:
    """The start-up log line of a run (what is watched, how, with which schedule, where results go); returns how
    the output dir is watched, as the live view shows it: "inotify", "polling every N s", or "scan" (no feed)."""
    if feed is None:
        mode = "scan"
    else:
        mode = f"polling every {place.poll:g} s" if feed.mode == "polling" else feed.mode
    pool = f"{setup.device} x{setup.config.cpu_jobs}" if setup.device.kind == "cpu" and setup.config.cpu_jobs > 1 \
        else str(setup.device)
    if setup.config.executor == "slurm":
        slurm = setup.config.slurm
        pool = f"Slurm (up to {slurm.max_jobs} jobs" + (f", partition {slurm.partition}" if slurm.partition else "") + ")"
    log.info("ckpt-watch %s: %s (%s), %s, policy %s, device %s, settle %g s, results in %s", __version__,
             place.output_dir, mode, setup.schedule_text(), setup.config.policy, pool, place.settle,
             place.results_dir)  # fmt: skip
    if place.journal_path.parent != place.results_dir:
        log.info("journal kept on local disk at %s", place.journal_path)
    return mode


def install_signal_handlers(stop: Callable[[str], None], reload: Callable[[], None]) -> None:
    """SIGINT and SIGTERM call `stop(signal name)`, SIGHUP calls `reload()` (in the main thread, between two
    bytecodes: they only set flags and wake the loop)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop(signal.Signals(signum).name))
    signal.signal(signal.SIGHUP, lambda signum, frame: reload())
