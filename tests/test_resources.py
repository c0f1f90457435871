"""Resource problems are a state, not a crash: a real full disk (a small tmpfs), a real unprivileged daemon in
front of a folder it may not read, a results dir that cannot be created, `merge` into a full disk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import ckpt_watch, results, wait_for
from watcher.sinks import read_results

NOBODY = 65534
EVAL = 'import json, sys; print(json.dumps({{"score": int(sys.argv[1]) / 10}}))'  # braces doubled: placeholders


def command_config(path: Path, python: str = sys.executable, **settings: str) -> Path:
    lines = ['wandb = "off"', 'tensorboard = "off"', "settle = 0.2", *(f"{k} = {v}" for k, v in settings.items()),
             "[presets.quick]", "[[presets.quick.evaluators]]", 'backend = "command"',
             f'command = ["{python}", "-c", \'{EVAL}\', "{{step}}"]']  # fmt: skip (a TOML literal string)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """Mount a real tmpfs of the given size (root only); unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill the filesystem to the last byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        chunk = b"\0" * 65536
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0")
        except OSError:
            pass
    return filler


class WatchdogListener:
    """A NOTIFY_SOCKET, as systemd gives a Type=notify service: counts WATCHDOG=1 pings and keeps STATUS=."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self.statuses: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            for line in data.splitlines():
                if line == "WATCHDOG=1":
                    self.pings.append(time.monotonic())
                elif line.startswith("STATUS="):
                    self.statuses.append(line[7:])

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_a_full_disk_is_one_line_and_a_wait_and_the_daemon_goes_on_when_there_is_room(copy_trainer_output, tmp_path,
                                                                                      small_disk):  # fmt: skip
    output = copy_trainer_output()
    later = tmp_path / "later"
    later.mkdir()
    for name in ("checkpoint-20", "checkpoint-30"):
        shutil.move(output / name, later / name)
    disk = small_disk("2m")
    results_dir = disk / "results"
    config = command_config(tmp_path / "c.toml")
    listener = WatchdogListener(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    log = tmp_path / "daemon.log"
    with open(log, "wb") as handle:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", output, "--config", config, "--preset", "quick",
                                   "--results-dir", results_dir, "--log-format", "plain"], env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: len(read_results(results_dir)) == 1, 60, what="the first result")
        filler = fill(disk)
        shutil.move(later / "checkpoint-20", output / "checkpoint-20")  # found while the disk is full
        wait_for(lambda: "cannot " in log.read_text(), 30, what="the disk-full line")
        pings_before = len(listener.pings)
        time.sleep(6)  # several retries
        assert daemon.poll() is None, log.read_text()
        assert len(listener.pings) - pings_before >= 6  # the loop kept running and feeding the watchdog
        text = log.read_text()
        problem_lines = [line for line in text.splitlines() if "cannot " in line]
        assert len(problem_lines) == 1, text
        assert "No space left" in problem_lines[0] or "disk is full" in problem_lines[0], text
        assert "Traceback" not in text
        assert any(status.startswith("waiting:") for status in listener.statuses), listener.statuses
        status = ckpt_watch("status", output, "--config", config, "--results-dir", results_dir)
        assert status.returncode == 0, status.stderr
        assert "full" in status.stdout, status.stdout

        filler.unlink()  # room again
        shutil.move(later / "checkpoint-30", output / "checkpoint-30")
        wait_for(lambda: len(read_results(results_dir)) == 3, 90, what="every result once there is room")
        assert "resolved" in log.read_text()
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        listener.close()
    lines = read_results(results_dir)
    assert sorted(r.step for r in lines) == [10, 20, 30]
    assert len({r.result_id for r in lines}) == 3


def test_merge_into_a_full_disk_is_one_line_and_leaves_nothing(tiny_model_dir, small_disk):
    disk = small_disk("256k")
    out = disk / "merged"
    run = ckpt_watch("merge", tiny_model_dir, "-o", out)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "No space left" in run.stderr, run.stderr
    assert not out.exists() and not list(disk.iterdir())


def test_a_results_dir_that_cannot_be_created_is_one_line_and_exit_2(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = ckpt_watch(output, "--scan", "--config", command_config(tmp_path / "c.toml"), "--preset", "quick",
                     "--results-dir", blocker / "results")  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "cannot create the results dir" in run.stderr, run.stderr


def _as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def unprivileged_python(env: dict[str, str]) -> str:
    """An interpreter the unprivileged user can run with our packages: ours, or else (ours may live in root's
    home, e.g. pyenv) the system's of the same version, given our site-packages through PYTHONPATH."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    for python in candidates:
        try:
            probe = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import watcher.daemon'], check=True)"
            done = subprocess.run(_as_nobody([python, "-c", probe]), env=env, capture_output=True, timeout=60,
                                  cwd="/")  # fmt: skip (it must be able to start the job child too)
        except OSError:
            continue
        if done.returncode == 0:
            return python
    pytest.skip("no Python interpreter that the unprivileged user may run with these packages")


def test_an_unreadable_checkpoint_is_one_line_and_the_rest_go_on(trainer_output, tmp_path):
    """The daemon runs as an unprivileged user (root reads a mode-000 folder anyway)."""
    import site

    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    root = Path(tempfile.mkdtemp(prefix="ckpt-watch-unreadable-", dir="/tmp"))  # pytest's tmp_path is root-only
    try:
        output = root / "output"
        shutil.copytree(trainer_output, output)
        home = root / "home"
        home.mkdir()
        for path in (root, home, output, *output.rglob("*")):  # the trainer's files are the daemon user's
            os.chown(path, NOBODY, NOBODY)
        root.chmod(0o755)
        (output / "checkpoint-20").chmod(0)
        env = {**os.environ, "HOME": str(home),
               "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *site.getsitepackages()])}  # fmt: skip
        python = unprivileged_python(env)
        config = command_config(root / "c.toml", python=python)
        run = subprocess.run(_as_nobody([python, "-m", "watcher", str(output), "--scan", "--config", str(config),
                                         "--preset", "quick", "--log-format", "plain"]),
                             capture_output=True, text=True, env=env, timeout=120, cwd=str(root))  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
        lines = [line for line in run.stderr.splitlines() if "checkpoint-20" in line]
        assert len(lines) == 1 and "Permission denied" in lines[0], run.stderr
        assert sorted(r["step"] for r in results(output)) == [10, 30], run.stderr
    finally:
        if (root / "output" / "checkpoint-20").exists():
            (root / "output" / "checkpoint-20").chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
