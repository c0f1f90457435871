"""No process outlives the daemon: real process trees, real SIGKILL, a marker in each process's environment.

Every daemon here is started with a unique CKPT_WATCH_TEST_MARKER in its environment; every process it starts,
at any depth (the job child, a `command` evaluator's program and its background grandchild, the W&B delivery
child and its `wandb-core`), inherits it, so /proc/<pid>/environ shows what is left of an incarnation.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MARKER, assert_none_left, ckpt_watch, describe, marked, marked_env, results, wait_for

from watcher import processes
from watcher.journal import Journal

# An evaluator that starts a background grandchild in its own session (out of reach of any group kill) and one
# in its group, then works a while: what an eval script that launches a server or a data loader does.
SLOW_EVAL = """
import json, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
time.sleep(float(sys.argv[2]))
print(json.dumps({"score": int(sys.argv[1]) / 10}))
"""


def slow_config(tmp_path: Path, seconds: float, timeout: float | None = None) -> Path:
    script = tmp_path / "slow_eval.py"
    script.write_text(SLOW_EVAL)
    config = tmp_path / "c.toml"
    extra = f"\ntimeout = {timeout}" if timeout else ""
    config.write_text(f'wandb = "off"\ntensorboard = "off"\nsettle = 0.2\n[presets.slow]\n[[presets.slow.evaluators]]\n'
                      f'backend = "command"\ncommand = [{json.dumps(sys.executable)}, {json.dumps(str(script))}, '
                      f'"{{step}}", "{seconds}"]{extra}\n')  # fmt: skip
    return config


# --- the mechanism ----------------------------------------------------------------------------------------


def test_identity_tells_a_recycled_pid_apart(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        me = processes.Identity.of(proc.pid)
        assert me is not None
        impostor = processes.Identity(proc.pid, me.start_time - 1)  # the same pid, started at another time
        assert processes.stop_leftover(impostor) == 0 and proc.poll() is None  # never killed
        assert processes.stop_leftover(me) >= 1
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()


def test_a_command_timeout_stops_everything_the_command_started(tiny_model_dir, tmp_path, marker, monkeypatch):
    """Before: only the direct child was killed, its background grandchild ran on."""
    from watcher.evaluators import get_evaluator

    monkeypatch.setenv(MARKER, marker)  # the command and its children inherit it
    script = tmp_path / "eval.py"
    script.write_text(SLOW_EVAL.replace("start_new_session=True", "start_new_session=False"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        get_evaluator("command").run(tiny_model_dir, ("cpu",), {"command": [sys.executable, str(script), "1", "60"],
                                                             "timeout": 1}, tmp_path)  # fmt: skip
    assert time.monotonic() - start < 15
    left = [pid for pid in marked(marker) if pid != os.getpid()]
    assert not left, describe(left)


def test_startup_stops_the_recorded_leftovers_of_a_killed_daemon_and_spares_a_recycled_pid(copy_trainer_output,
                                                                                         tmp_path, marker):  # fmt: skip
    output = copy_trainer_output()
    for name in ("checkpoint-10", "checkpoint-20"):
        (output / name).rename(tmp_path / name)  # one checkpoint, one job: the start-up is what is checked
    results_dir = output / "ckpt-watch"
    env = marked_env(marker)
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    leftover = subprocess.Popen(sleeper, start_new_session=True, env=env)
    stranger = subprocess.Popen(sleeper, start_new_session=True, env=env)
    folder = results_dir / ".work" / "job-99"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text("{}")
    try:
        journal = Journal(results_dir / "journal.sqlite")
        mine = processes.Identity.of(leftover.pid)
        journal.processes.add(leftover.pid, mine.start_time, "job 99", folder)
        # A recorded group whose pid now belongs to another process (started at another time): never touched.
        journal.processes.add(stranger.pid, processes.Identity.of(stranger.pid).start_time + 7, "job 98", None)
        journal.close()
        run = ckpt_watch(output, "--scan", "--config", slow_config(tmp_path, 0), "--preset", "slow", env=env)
        assert run.returncode == 0, run.stderr
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert stranger.poll() is None
        assert not folder.exists()
        lines = [line for line in run.stderr.splitlines() if "left running by the previous" in line]
        assert len(lines) == 1 and "job 99" in lines[0], run.stderr
        with sqlite3.connect(results_dir / "journal.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM processes").fetchone()[0] == 0
    finally:
        for proc in (leftover, stranger):
            proc.kill()
            proc.wait()


def test_an_old_journal_without_the_processes_table_still_opens(tmp_path):
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE processes")
    journal = Journal(path)
    assert journal.processes.all() == []
    journal.close()


# --- kill -9 ----------------------------------------------------------------------------------------------


def test_the_wandb_delivery_child_and_its_wandb_core_go_with_a_killed_daemon(tmp_path, marker):
    """A stand-in daemon (only the W&B sink, as the outbox's background thread runs it) is SIGKILLed while the
    delivery child is running."""
    script = tmp_path / "deliver.py"
    script.write_text(f"""
import threading, sys
from pathlib import Path
from watcher.journal import Journal
from watcher.records import Result
from watcher.sinks.wandb_run import WandbSink
results = Path({str(tmp_path / 'results')!r})
journal = Journal(results / "journal.sqlite")
sink = WandbSink("proj/run42", "defer", Path({str(tmp_path)!r}), results, force=True, ledger=journal.processes)  # as sync
record = Result(result_id="a", step=10, checkpoint="checkpoint-10", variant="regular", preset="smoke", status="ok",
                metrics={{"x/acc": 0.5}})
thread = threading.Thread(target=sink.deliver, args=([record],))  # as watcher/outbox.py does
thread.start()
thread.join()
""")
    env = {**marked_env(marker), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    daemon = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        wait_for(lambda: any(b"wandb-core" in Path(f"/proc/{p}/cmdline").read_bytes() for p in marked(marker)
                             if Path(f"/proc/{p}").exists()), 60, interval=0.02, what="wandb-core to start")  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    assert_none_left(marker, "W&B delivery")
    assert list((tmp_path / "results" / ".deliveries").iterdir()), "the killed delivery's folder is still there"
    # The next daemon removes it (and would stop the group, were it still alive).
    assert not list((tmp_path / "results").glob("tmp*.json"))


def test_random_kill_9_leaves_no_process_and_loses_or_repeats_no_result(copy_trainer_output, tmp_path, marker):
    # os.urandom: the test process's `random` may have been seeded by a fixture (the Trainer seeds it)
    seed = int(os.environ.get("CKPT_WATCH_KILL_SEED", int.from_bytes(os.urandom(4), "big")))
    rng = random.Random(seed)
    # Seconds of kills (about 4 at 0.5-4 s each; CI runs it every time, so the moments vary run by run); raise it
    # for a longer hunt.
    budget = float(os.environ.get("CKPT_WATCH_KILL_BUDGET", "12"))
    output = copy_trainer_output()
    config = slow_config(tmp_path, 1.0)
    env = marked_env(marker)
    results_dir = output / "ckpt-watch"
    kills, end = 0, time.monotonic() + budget
    try:
        while time.monotonic() < end:
            with open(tmp_path / f"daemon-{kills}.log", "wb") as log:
                daemon = subprocess.Popen([sys.executable, "-m", "watcher", output, "--scan", "--config", config,
                                           "--preset", "slow"], env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            try:
                daemon.wait(timeout=rng.uniform(0.5, 4.0))
            except subprocess.TimeoutExpired:
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                kills += 1
                assert_none_left(marker, f"kill {kills}")
            else:
                break  # it finished everything before the kill: the run is complete
        final = ckpt_watch(output, "--scan", "--config", config, "--preset", "slow", env=env)
        assert final.returncode == 0, final.stderr
        assert_none_left(marker, "the last, clean run")
        lines = results(output)
        assert sorted(r["step"] for r in lines) == [10, 20, 30]  # none lost, none repeated
        assert len({r["result_id"] for r in lines}) == 3
        with sqlite3.connect(results_dir / "journal.sqlite") as db:
            assert db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall() == [("done", 3)]
            assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 3
            assert db.execute("SELECT COUNT(*) FROM deliveries WHERE sink = 'files'").fetchone()[0] == 3
            assert db.execute("SELECT COUNT(*) FROM processes").fetchone()[0] == 0
        assert not list(results_dir.glob("tmp*.json")) and not list(results_dir.glob(".work/job-*"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n(seed {seed}, after {kills} kills; rerun with CKPT_WATCH_KILL_SEED={seed})") from None
    print(f"random kill -9: {kills} kills, seed {seed}")
