"""The pool in the real daemon: several jobs at once, each pinned to its own GPUs, schedules, kill -9 recovery.

CPU-only CI has no GPUs, so these tests use the one seam for them, CKPT_WATCH_FAKE_GPUS (watcher/gpu_inventory.py):
the device check passes and the pool sees the fake GPUs' memory. The jobs' children are then pinned to GPU ids
that do not exist (CUDA_VISIBLE_DEVICES), which a `command` preset does not mind: its script sleeps a little and
writes down what it was given, so each test can check the pinning reached the program that evaluates.

Everything else is real: a real Trainer's checkpoints (copied to make more steps, as test_daemon.py does) found
by the real completion rules, the daemon and its job children as processes, real SIGKILL. Each job child spends
about 7 CPU-seconds importing transformers for the weight check (watcher/load_check.py) before the command runs,
which is what most of this file's runtime is: the tests use as few checkpoints as each claim needs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from helpers import (assert_none_left, ckpt_watch, job_states, marked, marked_env, read_journal, results,
                     wait_for, with_steps)  # fmt: skip

from watcher.gpu_inventory import FAKE_GPUS_ENV
from watcher.journal import JournalReader

FOUR_GPUS = "0:81000:0,1:81000:0,2:81000:0,3:81000:0"

# What each job runs: sleeps, then leaves SEEN/<checkpoint>-<preset>.json saying what it was pinned to, and prints
# a metric. argv: seen dir, checkpoint, preset, {device} (as the child numbers it), seconds.
JOB = """
import json, os, sys, time
seen, checkpoint, preset, device, seconds = sys.argv[1:6]
began = time.time()
time.sleep(float(seconds))
record = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device, "began": began,
          "ended": time.time(), "pid": os.getpid()}
with open(os.path.join(seen, f"{checkpoint}-{preset}.json.tmp"), "w") as handle:
    json.dump(record, handle)
os.replace(os.path.join(seen, f"{checkpoint}-{preset}.json.tmp"), os.path.join(seen, f"{checkpoint}-{preset}.json"))
print(json.dumps({"score": int(checkpoint.split("-")[1]) / 10}))
"""


def preset_table(name: str, tmp_path: Path, seconds: float = 1.0, gpus: int | None = None) -> str:
    script, seen = tmp_path / "job.py", tmp_path / "seen"
    script.write_text(JOB)
    seen.mkdir(exist_ok=True)
    command = [sys.executable, str(script), str(seen), "{checkpoint}", name, "{device}", str(seconds)]
    return (f"[presets.{name}]\n" + (f"gpus = {gpus}\n" if gpus else "") +
            f'[[presets.{name}.evaluators]]\nbackend = "command"\ncommand = {json.dumps(command)}\n')  # fmt: skip


def write_config(tmp_path: Path, body: str, name: str = "c.toml") -> Path:
    config = tmp_path / name
    config.write_text('wandb = "off"\ntensorboard = "off"\nsettle = 0\n' + body)
    return config


def fake_gpus(spec: str, **extra: str) -> dict[str, str]:
    return {**os.environ, FAKE_GPUS_ENV: spec, **extra}


def seen(tmp_path: Path) -> dict[str, dict]:
    """What each job's program wrote down, by "<checkpoint>-<preset>"."""
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in (tmp_path / "seen").glob("*.json")}


def window(record: dict) -> tuple[float, float]:
    return (datetime.fromisoformat(record["started_at"]).timestamp(),
            datetime.fromisoformat(record["finished_at"]).timestamp())  # fmt: skip


def most_at_once(records: list[dict]) -> int:
    """The most result windows [started_at, finished_at] open at one moment (one ending as another starts: not
    both)."""
    events = sorted([(end, -1) for _, end in map(window, records)] + [(start, 1) for start, _ in map(window, records)])
    open_now = most = 0
    for _, change in events:
        open_now += change
        most = max(most, open_now)
    return most


def unique_jobs(records: list[dict]) -> list[tuple[int, str, str]]:
    """(step, variant, preset) of each record, after checking no job has two."""
    keys = [(r["step"], r["variant"], r["preset"]) for r in records]
    assert len(keys) == len(set(keys)), f"a job was recorded twice: {sorted(keys)}"
    return sorted(keys)


# --- slots ------------------------------------------------------------------------------------------------------


def test_four_fake_gpus_run_four_jobs_at_once_each_pinned_to_its_own_gpu(trainer_output, tmp_path):
    output = with_steps(trainer_output, tmp_path / "output", [10, 20, 30, 40])
    config = write_config(tmp_path, 'preset = "one"\n' + preset_table("one", tmp_path))
    run = ckpt_watch(output, "--scan", "--config", config, "--device", "cuda", env=fake_gpus(FOUR_GPUS))
    assert run.returncode == 0, run.stderr
    records = results(output)
    assert unique_jobs(records) == [(step, "regular", "one") for step in (10, 20, 30, 40)]
    assert all(r["status"] == "ok" for r in records)
    assert most_at_once(records) == 4  # every window overlaps every other
    assert sorted(r["device"] for r in records) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    programs = seen(tmp_path)
    for record in records:
        gpu = record["device"].removeprefix("cuda:")
        assert record["cuda_visible_devices"] == gpu
        program = programs[f"{record['checkpoint']}-one"]
        assert program["cuda_visible_devices"] == gpu  # the pinning reached the evaluating program
        assert program["device"] == "cuda:0"  # which, pinned to one GPU, sees it as its cuda:0


def test_a_two_gpu_preset_takes_pairs_and_two_pairs_run_at_once(trainer_output, tmp_path):
    output = with_steps(trainer_output, tmp_path / "output", [10, 20])
    config = write_config(tmp_path, 'preset = "pair"\n' + preset_table("pair", tmp_path, gpus=2))
    run = ckpt_watch(output, "--scan", "--config", config, "--device", "cuda:0,1,2,3", env=fake_gpus(FOUR_GPUS))
    assert run.returncode == 0, run.stderr
    records = results(output)
    assert unique_jobs(records) == [(10, "regular", "pair"), (20, "regular", "pair")]
    assert sorted(r["device"] for r in records) == ["cuda:0,1", "cuda:2,3"]
    assert most_at_once(records) == 2
    programs = seen(tmp_path)
    for record in records:
        program = programs[f"{record['checkpoint']}-pair"]
        assert program["cuda_visible_devices"] == record["cuda_visible_devices"] == record["device"][5:]
        assert program["device"] == "cuda:0,1"  # the pair as the child numbers it


def test_a_preset_needing_more_gpus_than_the_pool_has_is_refused_at_start(trainer_output, tmp_path):
    output = with_steps(trainer_output, tmp_path / "output", [10])
    config = write_config(tmp_path, 'preset = "triple"\n' + preset_table("triple", tmp_path, gpus=3))
    run = ckpt_watch(output, "--scan", "--config", config, "--device", "cuda:0,1", env=fake_gpus(FOUR_GPUS))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpus = 3" in lines[0] and "cuda:0,1" in lines[0], run.stderr
    assert not (output / "ckpt-watch" / "results.jsonl").exists()


# --- a GPU another process uses; priority on the one slot left -------------------------------------------------

BUSY = "30000 of 81000 MiB used by another process"


@pytest.fixture(scope="module")
def one_usable_gpu_run(trainer_output, tmp_path_factory):
    """`cuda:0,1` where fake GPU 1 has 30000 MiB in use by someone else: one usable slot. One checkpoint and two
    `[[schedule]]` entries, quick (priority 0) and full (priority 10), scanned once. Returns the output dir, the
    journal's "pool" entry as it was while the second job waited, and the daemon's log."""
    tmp_path = tmp_path_factory.mktemp("busy-gpu")
    output = tmp_path / "output"
    shutil.copytree(trainer_output, output)
    for name in ("checkpoint-20", "checkpoint-30"):
        shutil.rmtree(output / name)
    body = ('[[schedule]]\npreset = "quick"\npriority = 0\n[[schedule]]\npreset = "full"\npriority = 10\n'
            + preset_table("quick", tmp_path) + preset_table("full", tmp_path))  # fmt: skip
    log = tmp_path / "daemon.log"
    with open(log, "wb") as handle:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", output, "--scan", "--config",
                                   write_config(tmp_path, body), "--device", "cuda:0,1"], stdout=handle,
                                  stderr=subprocess.STDOUT, env=fake_gpus("0:81000:0,1:81000:30000"))  # fmt: skip
    try:
        waiting = wait_for(lambda: _pool_while_waiting(output), 120, interval=0.05, what="a job waiting on cuda:1")
        assert daemon.wait(timeout=180) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    return output, waiting, log.read_text()


def _pool_while_waiting(output: Path) -> dict | None:
    """The journal's pool entry once it says why a job waits. (The first entry written while one waits says only
    "no free slot": the scheduler words the reason from the pool as it was before that round's starts. The next
    round, half a second later, words it from the pool as it is.)"""
    pool = read_journal(output, lambda reader: reader.meta("pool"), None)
    return pool if pool and any("busy" in job["why"] for job in pool["waiting"]) else None


def test_a_gpu_another_process_uses_is_not_offered_and_the_journal_says_why(one_usable_gpu_run):
    output, pool, _ = one_usable_gpu_run
    records = results(output)
    assert unique_jobs(records) == [(10, "regular", "full"), (10, "regular", "quick")]
    assert [r["device"] for r in records] == ["cuda:0", "cuda:0"]
    assert most_at_once(records) == 1  # one usable GPU: one after the other
    assert pool["device"] == "cuda:0,1"
    by_slot = {slot["slot"]: slot for slot in pool["slots"]}
    assert by_slot["cuda:1"]["busy"] == BUSY and by_slot["cuda:1"]["job"] is None
    assert by_slot["cuda:0"]["busy"] is None and by_slot["cuda:0"]["what"] == "checkpoint-10/regular/full"
    (waiting,) = pool["waiting"]
    assert waiting["what"] == "checkpoint-10/regular/quick"
    assert f"cuda:1 busy: {BUSY}" in waiting["why"] and "cuda:0 runs a job" in waiting["why"], waiting
    with JournalReader(output / "ckpt-watch" / "journal.sqlite") as reader:  # as the scan left it: still busy
        assert {s["slot"]: s["busy"] for s in reader.meta("pool")["slots"]} == {"cuda:0": None, "cuda:1": BUSY}


def test_with_one_slot_the_higher_priority_entry_starts_first(one_usable_gpu_run):
    output, _, log = one_usable_gpu_run
    started = [line.split(" started ")[1].split()[0] for line in log.splitlines()
               if " started " in line and "warm worker" not in line]  # job starts, not worker starts
    assert started == ["checkpoint-10/regular/full", "checkpoint-10/regular/quick"], log
    assert [r["preset"] for r in sorted(results(output), key=lambda r: r["started_at"])] == ["full", "quick"]


def test_the_log_says_why_a_busy_gpu_is_not_offered(one_usable_gpu_run):
    """`ckpt-watch status` says it too while the daemon runs: tests/test_status_pool.py."""
    output, _, log = one_usable_gpu_run
    assert "cuda:1 is not offered: 30000 of 81000 MiB used by another process" in log, log


# --- kill -9 with jobs in flight -------------------------------------------------------------------------------


def test_kill_9_with_four_jobs_in_flight_loses_nothing_repeats_nothing_and_leaves_no_process(
    trainer_output, tmp_path, marker
):
    output = with_steps(trainer_output, tmp_path / "output", [10, 20, 30, 40])
    slow = write_config(tmp_path, 'preset = "one"\n' + preset_table("one", tmp_path, seconds=120), "slow.toml")
    env = {**marked_env(marker), FAKE_GPUS_ENV: FOUR_GPUS}
    with open(tmp_path / "killed.log", "wb") as handle:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", output, "--scan", "--config", slow, "--device",
                                   "cuda"], stdout=handle, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        in_flight = ("preparing", "evaluating")
        wait_for(lambda: [s in in_flight for s in job_states(output).values()] == [True] * 4, 120, interval=0.05,
                 what="four jobs running")  # fmt: skip
        # Each job's child is up (it records itself in the journal's process ledger before it works).
        wait_for(lambda: len(marked(marker)) >= 5, 60, interval=0.05, what="the daemon and four job children")
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    assert_none_left(marker, "the killed daemon's jobs")
    assert not results(output)

    quick = write_config(tmp_path, 'preset = "one"\n' + preset_table("one", tmp_path, seconds=0.5), "quick.toml")
    rerun = ckpt_watch(output, "--scan", "--config", quick, "--device", "cuda", env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert_none_left(marker, "the clean run")
    lines = rerun.stderr.splitlines()
    recovered = [n for n, line in enumerate(lines) if "interrupted by the last stop are pending again" in line]
    first_start = next(n for n, line in enumerate(lines) if " started checkpoint-" in line)
    assert len(recovered) == 1 and "4 job(s)" in lines[recovered[0]] and recovered[0] < first_start, rerun.stderr
    records = results(output)
    assert unique_jobs(records) == [(step, "regular", "one") for step in (10, 20, 30, 40)]
    assert all(r["status"] == "ok" and r["attempt"] == 1 for r in records)  # the killed attempt did not count
    assert set(job_states(output).values()) == {"done"}


# --- schedules ---------------------------------------------------------------------------------------------------


def test_a_schedule_runs_each_entry_on_its_checkpoints_and_the_final_entry_only_once_finalized(
    trainer_output, tmp_path
):
    """On `--device cpu` with `cpu_jobs = 2`, which this test also checks: two jobs at once, never three."""
    steps = [10, 20, 30, 40, 50]
    output = with_steps(trainer_output, tmp_path / "output", steps)
    body = ('[[schedule]]\npreset = "a"\n[[schedule]]\npreset = "b"\nevery = 2\n[[schedule]]\npreset = "c"\n'
            'final = true\n' + "".join(preset_table(name, tmp_path, seconds=1) for name in "abc"))  # fmt: skip
    config = write_config(tmp_path, "cpu_jobs = 2\n" + body)
    expected = {(s, "a") for s in steps} | {(10, "b"), (30, "b"), (50, "b")}
    # The run is not known to be finished: no final checkpoint, so no "c" job.
    first = ckpt_watch(output, "--scan", "--config", config, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    assert {(step, preset) for step, _, preset in unique_jobs(results(output))} == expected
    assert not any(job.endswith("/c") for job in _jobs_by_preset(output))
    records = results(output)
    assert most_at_once(records) == 2  # 8 jobs on two cpu slots
    assert {r["device"] for r in records} == {"cpu"} and {r["cuda_visible_devices"] for r in records} == {""}
    assert all(program["cuda_visible_devices"] == "" for program in seen(tmp_path).values())  # no GPU for cpu jobs
    # `ckpt-watch finalize` says it is: the final entry runs on the last checkpoint, and nothing else runs again.
    finalize = ckpt_watch("finalize", output, "--config", config)
    assert finalize.returncode == 0, finalize.stderr
    second = ckpt_watch(output, "--scan", "--config", config, "--device", "cpu")
    assert second.returncode == 0, second.stderr
    assert {(step, preset) for step, _, preset in unique_jobs(results(output))} == expected | {(50, "c")}
    started = [line.split(" started ")[1].split()[0] for line in second.stderr.splitlines()
               if " started " in line and "warm worker" not in line]
    assert started == ["checkpoint-50/regular/c"], second.stderr


def _jobs_by_preset(output: Path) -> list[str]:
    return [f"{job.checkpoint.name}/{job.variant}/{job.preset}" for job in read_journal(output, JournalReader.jobs, [])]
