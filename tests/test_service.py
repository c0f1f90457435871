"""The daemon as a systemd service: sd_notify over a real AF_UNIX datagram socket, signals, config reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import job_states, journal_jobs, sleep_preset_config, wait_for, worker_processes
from watcher.notify import Notifier

QUICK = ('wandb = "off"\ntensorboard = "off"\npreset = "quick"\n'
         '[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "probes"\nprobes = ["parameters"]\n')  # fmt: skip


class NotifySocket:
    """What systemd would receive: a bound datagram socket, messages with their arrival times."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[tuple[float, list[str]]] = []

    def collect(self, seconds: float) -> list[tuple[float, list[str]]]:
        end = time.monotonic() + seconds
        got = []
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode().splitlines()))
        self.messages += got
        return got

    def wait_for(self, line: str, seconds: float) -> list[str]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _, lines in self.collect(min(0.5, end - time.monotonic())):
                if any(item.startswith(line) for item in lines):
                    return lines
        raise AssertionError(f"no {line!r} within {seconds} s; got {self.messages[-5:]}")

    def close(self):
        self.sock.close()


def _start(output: Path, config: Path, log: Path, **env) -> subprocess.Popen:
    handle = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--config", str(config)],
                            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env})  # fmt: skip


def _states(output: Path) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for job in journal_jobs(output):
        states.setdefault(job.preset, []).append(str(job.state))
    return states


def _pings(messages) -> list[float]:
    return [at for at, lines in messages if "WATCHDOG=1" in lines]


@pytest.mark.serial  # measures the watchdog's ping intervals
def test_notify_ready_status_watchdog_and_stopping_and_a_wedged_loop_stops_pinging(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    for name in ("checkpoint-10", "checkpoint-20"):
        (output / name).rename(tmp_path / name)  # one job is enough to see a STATUS= line naming it
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = _start(output, config, tmp_path / "daemon.log", NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    try:
        ready = notify.wait_for("READY=1", 60)
        assert any(line.startswith("STATUS=") for line in ready)
        wait_for(lambda: set(job_states(output).values()) == {"done"}, 120, what="the job")
        notify.collect(1.0)
        statuses = [line for _, lines in notify.messages for line in lines if line.startswith("STATUS=")]
        assert any("checkpoint-" in s for s in statuses), statuses  # what it was doing, job by job
        # Pings every WATCHDOG_USEC/2 = 1 s from the main loop.
        pings = _pings(notify.collect(4.0))
        assert 3 <= len(pings) <= 6 and all(0.8 <= b - a <= 1.6 for a, b in zip(pings, pings[1:])), pings
        # Wedge the loop as a hung network filesystem would: a checkpoint whose sentinel is a FIFO with no writer
        # blocks the completion check's read.
        wedge = output / "checkpoint-40"
        wedge.mkdir()
        os.mkfifo(wedge / "ckpt-watch-complete.json")
        time.sleep(3.0)  # detection (inotify or the next reconciliation) reaches the read
        assert _pings(notify.collect(4.0)) == []  # wedged: no pings, so systemd would restart it
        # Unblock it: the path becomes a regular file (a manifest naming a file that never comes, so no job), then
        # the reader still waiting on the FIFO gets its end of file through a second name of that FIFO.
        os.link(wedge / "ckpt-watch-complete.json", tmp_path / "fifo")
        (tmp_path / "manifest").write_text('{"format": 1, "step": 40, "files": {"model.safetensors": 10}}')
        os.replace(tmp_path / "manifest", wedge / "ckpt-watch-complete.json")
        with open(tmp_path / "fifo", "w"):
            pass
        assert len(_pings(notify.collect(3.0))) >= 2  # healthy again
        daemon.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 30)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()


def test_sigterm_lets_the_running_job_finish_within_the_grace_period_then_stops_it(copy_trainer_output, tmp_path):
    """A job that would take 60 s, grace 3 s: exit 0 soon after, no orphan, the job pending again and done next time."""
    output = copy_trainer_output()
    for name in ("checkpoint-10", "checkpoint-20"):
        (output / name).rename(tmp_path / name)  # one checkpoint: one job
    config = sleep_preset_config(tmp_path, "slow", 60, "stop_grace = 3\n")
    daemon = _start(output, config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: "evaluating" in job_states(output).values(), 60, what="the job to start")
        children = worker_processes(output / "ckpt-watch")
        assert children
        began = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert 2.5 <= time.monotonic() - began <= 15  # waited for the grace period, then stopped the job
        assert not worker_processes(output / "ckpt-watch") and all(not Path(f"/proc/{pid}").exists() for pid in children)
        assert set(job_states(output).values()) == {"pending"}
    finally:
        if daemon.poll() is None:
            daemon.kill()
    # A job that finishes inside the grace period is recorded, not interrupted.
    config.write_text(config.read_text().replace('"60"]', '"2"]').replace("stop_grace = 3", "stop_grace = 30"))
    daemon = _start(output, config, tmp_path / "daemon2.log")
    try:
        wait_for(lambda: "evaluating" in job_states(output).values(), 60, what="the job to start again")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        assert set(job_states(output).values()) == {"done"}
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_when_the_new_is_broken(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    (output / "checkpoint-10").rename(tmp_path / "checkpoint-10")  # two checkpoints: "every present one" is plural
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    log = tmp_path / "daemon.log"
    daemon = _start(output, config, log)
    try:
        wait_for(lambda: _states(output) == {"quick": ["done"] * 2}, 120, what="the quick jobs")
        config.write_text(QUICK + "[presets.second]\n[[presets.second.evaluators]]\nbackend = \"probes\"\n"
                          "probes = [\"parameters\", \"flops\"]\n")  # fmt: skip
        config.write_text(config.read_text().replace('preset = "quick"', 'preset = "second"'))
        daemon.send_signal(signal.SIGHUP)
        # The queue is kept and carried over: every present checkpoint gets a job of the new preset.
        wait_for(lambda: _states(output) == {"quick": ["done"] * 2, "second": ["done"] * 2}, 120,
                 what="the reloaded preset's jobs")  # fmt: skip
        config.write_text("preset = \"no-such-preset\"\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in log.read_text(), 30, what="the rejection")
        assert "unknown preset 'no-such-preset'" in log.read_text()
        assert daemon.poll() is None  # still running, on the old config
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_notifier_without_systemd_does_nothing_and_parses_the_watchdog(tmp_path):
    assert not Notifier({}).enabled and Notifier({}).ping_interval is None
    Notifier({}).ready("x")  # no socket: nothing happens
    both = Notifier({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert both.address == "\0abstract" and both.ping_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).ping_interval is None  # not for us
