"""`ckpt-watch status` shows the daemon's pool: each slot and its job, the queue per preset, why jobs wait; and
says "no daemon running" when the results dir's lock is free (the recorded pool is stale then)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ckpt_watch, job_states, sleep_preset_config, wait_for
from watcher.journal import Journal, JobState
from watcher.setup import take_lock

BUSY = "30000 of 81000 MiB used by another process"


def status(*args) -> subprocess.CompletedProcess:
    return ckpt_watch("status", *args, timeout=60)


def _journal_with_a_pool(output: Path) -> tuple[Path, int]:
    """A run "output": checkpoint-10 quick evaluating on cuda:0, the rest pending; the pool as a daemon of two runs
    records it (cuda:3 runs another run's job). Returns the journal's path and the running job's id."""
    path = output / "ckpt-watch" / "journal.sqlite"
    journal = Journal(path)
    try:
        checkpoints = [journal.add_checkpoint(f"checkpoint-{s}", s, output / f"checkpoint-{s}", f"f{s}", "hf",
                                              ["regular"]) for s in (10, 20, 30)]  # fmt: skip
        journal.ensure_jobs((c, "regular", "quick") for c in checkpoints)
        journal.ensure_jobs([(checkpoints[-1], "regular", "full")])
        running = journal.jobs("quick")[0]
        journal.start(running)
        journal.set_stage(running.id, JobState.EVALUATING)
        waiting = [{"run": "output", "job": 90 + i, "what": f"checkpoint-{s}/regular/quick",
                    "why": "no free slot: needs 1 GPU, none free"} for i, s in enumerate((20, 30, 40, 50, 60, 70))]
        waiting.insert(0, {"run": "output", "job": 99, "what": "checkpoint-30/regular/full", "why": "lower priority"})
        waiting.append({"run": "other-run", "job": 7, "what": "checkpoint-8/regular/quick", "why": "retry in 40 s"})
        journal.set_meta("pool", {
            "device": "cuda:0,1,2,3",
            "slots": [{"slot": "cuda:0", "busy": None, "job": running.id, "run": "output",
                       "what": "checkpoint-10/regular/quick"},
                      {"slot": "cuda:1", "busy": BUSY, "job": None, "run": None, "what": None},
                      {"slot": "cuda:2", "busy": None, "job": None, "run": None, "what": None},
                      {"slot": "cuda:3", "busy": None, "job": 5, "run": "other-run",
                       "what": "checkpoint-5/regular/quick"}],
            "waiting": waiting})  # fmt: skip
    finally:
        journal.close()
    return path, running.id


def test_status_shows_slots_queue_and_waiting_while_the_daemon_holds_the_lock(tmp_path):
    output = tmp_path / "output"
    path, running_id = _journal_with_a_pool(output)
    lock = take_lock(path.parent / "ckpt-watch.lock", output / "ckpt-watch")  # as the daemon holds it
    try:
        run = status(output)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        table = next(i for i, line in enumerate(lines) if line.startswith("┏"))
        block = lines[:table]  # the pool comes above the job table
        assert f"daemon running (pid {os.getpid()}), pool cuda:0,1,2,3" in block
        slots = [line.split() for line in block[block.index("slots:") + 1:block.index("queue: quick 2, full 1")]]
        assert slots[0][:3] == ["cuda:0", "checkpoint-10/regular/quick", "evaluating"]
        assert slots[0][-2:] == ["so", "far"]  # the time so far
        assert " ".join(slots[1]) == f"cuda:1 not offered: {BUSY}"
        assert " ".join(slots[2]) == "cuda:2 free"
        assert " ".join(slots[3]) == "cuda:3 other-run: checkpoint-5/regular/quick"  # no stage: not our journal
        assert len(slots) == 4
        waiting = block[block.index("waiting:") + 1:]
        assert waiting == ["  checkpoint-30/regular/full: lower priority",
                           "  checkpoint-20/regular/quick: no free slot: needs 1 GPU, none free",
                           "  checkpoint-30/regular/quick: no free slot: needs 1 GPU, none free",
                           "  checkpoint-40/regular/quick: no free slot: needs 1 GPU, none free",
                           "  checkpoint-50/regular/quick: no free slot: needs 1 GPU, none free",
                           "  ... and 3 more"]  # fmt: skip
        assert lines[-1] == "3 checkpoint(s), 4 job(s): 1 evaluating, 3 pending"  # the rest as before

        plain = json.loads(status(output, "--json").stdout)
        assert isinstance(plain, list) and len(plain) == 4  # --json alone: the list of rows, as before
        both = json.loads(status(output, "--json", "--pool").stdout)
        unclocked = [[{**row, "walltime_s": None} for row in rows] for rows in (both["jobs"], plain)]
        assert unclocked[0] == unclocked[1]  # the same rows (the running job's time so far moves on)
        pool = both["pool"]
        assert pool["daemon_running"] is True and pool["device"] == "cuda:0,1,2,3" and len(pool["waiting"]) == 8
        assert pool["slots"][1]["busy"] == BUSY and pool["queue"] == {"quick": 2, "full": 1}
        assert pool["slots"][0]["job"] == running_id and pool["slots"][0]["state"] == "evaluating"
        assert pool["slots"][0]["started_at"] and pool["slots"][3]["state"] is None  # another run's job
    finally:
        lock.close()

    # The daemon gone: one line says so, and the recorded pool is not shown as if it were live.
    run = status(output)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "no daemon running" in lines
    assert not any(line.startswith(("slots:", "queue:", "waiting:", "  cuda:")) for line in lines)
    pool = json.loads(status(output, "--json", "--pool").stdout)["pool"]
    assert pool["daemon_running"] is False and pool["slots"][1]["busy"] == BUSY  # as recorded, marked stale
    assert (path.parent / "ckpt-watch.lock").read_text() == str(os.getpid())  # the check left the lock file as is

    wrong = status(output, "--pool")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--pool" in wrong.stderr


def test_status_without_a_lock_file_says_no_daemon_and_creates_nothing(tmp_path):
    output = tmp_path / "output"
    path, _ = _journal_with_a_pool(output)
    run = status(output)
    assert run.returncode == 0 and "no daemon running" in run.stdout.splitlines()
    assert not (path.parent / "ckpt-watch.lock").exists()  # the check made none


def test_status_of_a_real_daemon_on_two_fake_gpus_one_busy(copy_trainer_output, tmp_path):
    """A real daemon over CKPT_WATCH_FAKE_GPUS (GPU 1 used by someone else) running a slow command preset."""
    output = copy_trainer_output()
    config = sleep_preset_config(tmp_path, "slow", 120, 'policy = "all"\nstop_grace = 0\n')
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--config", str(config), "--device",
                               "cuda:0,1"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "CKPT_WATCH_FAKE_GPUS": "0:81000:0,1:81000:30000"})  # fmt: skip
    try:
        states = wait_for(lambda: (got := job_states(output)) and sorted(got.values()) == [
            "evaluating", "pending", "pending"] and got, 90, what="one job running, two waiting")  # fmt: skip
        # Which one runs depends on which checkpoint was detected first; the other two wait, oldest first.
        running = next(f"{name}/slow" for name, state in states.items() if state == "evaluating")
        first, second = sorted((f"{name}/slow" for name, state in states.items() if state == "pending"),
                               key=lambda what: int(what.split("/")[0].split("-")[1]))  # fmt: skip
        seen: list[list[str]] = []

        def shown() -> list[str] | None:
            run = status(output, "--config", config)
            assert run.returncode == 0, run.stderr
            seen.append(run.stdout.splitlines())
            return seen[-1] if f"  {second}: queued behind {first}" in seen[-1] else None

        try:
            lines = wait_for(shown, 60, interval=0.5, what="the pool recorded with its waiting jobs")
        except AssertionError:
            raise AssertionError("\n".join(seen[-1] if seen else ["no output"]) + "\n---\n" +
                                 (tmp_path / "daemon.log").read_text()[-3000:]) from None
        assert f"daemon running (pid {daemon.pid}), pool cuda:0,1" in lines
        slot0 = next(line for line in lines if line.startswith("  cuda:0")).split()
        assert slot0[1:3] == [running, "evaluating"] and slot0[-2:] == ["so", "far"]
        assert f"  cuda:1  not offered: {BUSY}" in lines
        assert "queue: slow 2" in lines
        why = ("no free slot: needs 1 GPU, none free; cuda:0 runs a job; cuda:1 busy: 30000 of 81000 MiB used by "
               "another process")  # fmt: skip
        assert [line for line in lines if line.startswith("  checkpoint-")] == [
            f"  {first}: {why}", f"  {second}: queued behind {first}"]  # fmt: skip
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    lines = status(output, "--config", config).stdout.splitlines()
    assert "no daemon running" in lines and not any(line.startswith("  cuda:") for line in lines)
