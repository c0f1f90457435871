"""The `slurm_cluster` fixture: a real one-node Slurm (tests/slurm/cluster.sh) for the tests that need one.

A cluster that already answers (SLURM_CONF set by `.ci/run` or a developer, or cluster.sh's default config) is
used as it is and left running. Otherwise the fixture starts one and stops it when the last test session using it
ends. The cluster is machine-wide (fixed ports), and pytest-xdist workers and other sessions (other worktrees) may
share it. Two locks beside its state dir: `.start` (held only while checking, starting or stopping) and `.users`
(held shared by every session for as long as it uses the cluster). At its end a session stops a cluster a fixture
started only if it can take `.users` exclusively, i.e. no other session still uses it. (One lock for both would
make a second session wait for the first one's end before it could even check.) Jobs of different tests tell
themselves apart by unique job names.

Cannot start (no root, no apt, slurmctld fails): the tests skip with one line saying why, unless
CKPT_WATCH_REQUIRE_SLURM=1 (set by `.ci/run`): then they fail, since CI must never skip them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).parent / "slurm" / "cluster.sh"
STATE_DIR = Path(os.environ.get("CKPT_WATCH_SLURM_DIR", "/tmp/ckpt-watch-slurm"))
# Beside the state dir, not in it: cluster.sh owns that folder. Its presence = "a test fixture started this one".
STARTED_BY_FIXTURE = Path(f"{STATE_DIR}.started-by-pytest")
START_LOCK, USERS_LOCK = Path(f"{STATE_DIR}.start.lock"), Path(f"{STATE_DIR}.users.lock")


def _answers(conf: str) -> bool:
    if not Path(conf).is_file():  # scontrol would look for a config server in DNS instead, for up to 30 s
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


def _start() -> str:
    """Start the cluster; its SLURM_CONF. pytest.skip/fail (CKPT_WATCH_REQUIRE_SLURM=1) with one line if it cannot."""
    try:
        started = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=600)
        problem = (started.stderr.strip().splitlines() or [f"exit status {started.returncode}"])[-1]
        ok = started.returncode == 0 and started.stdout.startswith("export SLURM_CONF=")
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, problem = False, str(e).splitlines()[0]
    if not ok:
        why = f"Slurm not available: {problem}"
        if os.environ.get("CKPT_WATCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"{why} (CKPT_WATCH_REQUIRE_SLURM=1: Slurm tests must run)", pytrace=False)
        pytest.skip(why)
    return started.stdout.strip().splitlines()[0].removeprefix("export SLURM_CONF=")


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running one-node Slurm, also put into os.environ (every Slurm command needs it)."""
    with open(START_LOCK, "a") as start_lock, open(USERS_LOCK, "a") as users_lock:
        with _locked(start_lock):
            conf = next((c for c in (os.environ.get("SLURM_CONF"), str(STATE_DIR / "slurm.conf")) if c and _answers(c)),
                        None)  # fmt: skip
            if conf is None:
                conf = _start()  # or skip/fail, releasing the lock
                STARTED_BY_FIXTURE.touch()
            fcntl.flock(users_lock, fcntl.LOCK_SH)  # in use by this session (a stopping session holds start_lock)
        os.environ["SLURM_CONF"] = conf
        yield conf
        with _locked(start_lock):
            try:  # only the last user of a cluster a fixture started stops it
                fcntl.flock(users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another session still uses it; it stops it at its end
            if STARTED_BY_FIXTURE.exists():
                subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, timeout=120)
                STARTED_BY_FIXTURE.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(lock_file):
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
