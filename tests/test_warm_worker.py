"""Warm workers (watcher/warm.py): a slot's jobs run one after another in one long-lived process.

Real daemons, real workers, real SIGKILL. The jobs are `command` evaluators that say which process ran them (their
parent's pid: the worker), so no model is loaded except where results are compared with one-process-per-job mode.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (assert_none_left, ckpt_watch, job_states, marked_env, results, start_daemon, wait_for,
                     worker_processes)  # fmt: skip

# Appends "STEP PPID" to pids.txt (its parent is the process that runs the job), then does what plan.json says
# for its step: "ok", "nojson" (the evaluator raises: no metrics printed), "sleep:S", "sleep_once:S" (only the
# first attempt sleeps).
JOB = """
import json, os, sys, time
step, folder = sys.argv[1], sys.argv[2]
plan = json.load(open(os.path.join(folder, "plan.json"))).get(step, "ok")
with open(os.path.join(folder, "pids.txt"), "a") as handle:
    handle.write(f"{step} {os.getppid()}\\n")
if plan == "nojson":
    print("no metrics here")
    sys.exit(0)
if plan.startswith("sleep"):
    once = os.path.join(folder, "slept-" + step)
    if not (plan.startswith("sleep_once") and os.path.exists(once)):
        open(once, "w").close()
        time.sleep(float(plan.split(":")[1]))
print(json.dumps({"ppid": os.getppid()}))
"""


def job_config(tmp_path: Path, plan: dict[str, str], top: str = "", evaluators: str = "") -> Path:
    """Preset `job`: `evaluators` (TOML evaluator tables, if any), then the JOB script."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "job.py").write_text(JOB)
    (folder / "plan.json").write_text(json.dumps(plan))
    config = tmp_path / "c.toml"
    config.write_text(f'wandb = "off"\ntensorboard = "off"\nsettle = 0.2\npreset = "job"\n{top}[presets.job]\n'
                      f'{evaluators}[[presets.job.evaluators]]\nbackend = "command"\n'
                      f'command = [{json.dumps(sys.executable)}, {json.dumps(str(folder / "job.py"))}, "{{step}}", '
                      f'{json.dumps(str(folder))}]\n')  # fmt: skip
    return config


def ran_by(tmp_path: Path) -> list[tuple[int, int]]:
    """(step, pid of the process that ran it) for each job attempt so far, in order."""
    path = tmp_path / "jobs" / "pids.txt"
    lines = path.read_text().split() if path.exists() else []
    return [(int(step), int(pid)) for step, pid in zip(lines[::2], lines[1::2])]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


PROBES = '[[presets.job.evaluators]]\nbackend = "probes"\nprobes = ["parameters", "flops", "routing", "perplexity"]\n' \
         'routing_tokens = 512\n'  # fmt: skip  (the `30s` preset's evaluator)


def test_a_slots_jobs_share_one_worker_until_warm_max_jobs_and_give_the_same_results_as_cold_mode(
        copy_trainer_output, tmp_path):  # fmt: skip
    warm_dir, cold_dir = tmp_path / "warm", tmp_path / "cold"
    warm_dir.mkdir()
    cold_dir.mkdir()
    warm = ckpt_watch(copy_trainer_output("warm-run"), "--scan", "--config",
                      job_config(warm_dir, {}, "warm_max_jobs = 2\n", PROBES))  # fmt: skip
    cold_run = copy_trainer_output("cold-run")
    for name in ("checkpoint-10", "checkpoint-30"):  # checkpoint-20 was a worker's second job: compared with cold
        shutil.rmtree(cold_run / name)
    cold = ckpt_watch(cold_run, "--scan", "--config", job_config(cold_dir, {}, "warm = false\n", PROBES))
    assert warm.returncode == 0 and cold.returncode == 0, warm.stderr + cold.stderr

    by_step = dict(ran_by(warm_dir))
    assert by_step[10] == by_step[20] != by_step[30]  # reused, then recycled after 2 jobs
    assert warm.stderr.count("warm worker for cpu#0 started") == 2
    assert f"warm worker for cpu#0 (pid {by_step[10]}) recycled: after 2 jobs (warm_max_jobs = 2)" in warm.stderr
    assert "warm worker" not in cold.stderr and dict(ran_by(cold_dir))[20] not in by_step.values()

    def metrics(output: Path) -> dict[int, dict]:
        return {r["step"]: {k: v for k, v in r["metrics"].items() if k != "ppid"} for r in results(output)}

    warm_metrics, cold_metrics = metrics(tmp_path / "warm-run"), metrics(tmp_path / "cold-run")
    assert sorted(warm_metrics) == [10, 20, 30] and "perplexity" in " ".join(warm_metrics[20])
    assert warm_metrics[20] == cold_metrics[20]  # to the last bit: JSON floats are exact
    assert not list((tmp_path / "warm-run" / "ckpt-watch" / ".work").iterdir())  # job folders and the worker's: gone


def test_a_failed_job_a_killed_worker_and_a_timeout_each_fail_only_their_job_and_cost_a_fresh_worker(
        copy_trainer_output, tmp_path):  # fmt: skip
    """checkpoint-10's evaluator raises; checkpoint-20's worker is SIGKILLed mid-job; checkpoint-30 runs past its
    time budget. 20 and 30 are retried (transient) and recorded once each, in fresh workers."""
    output = copy_trainer_output()
    config = job_config(tmp_path, {"10": "nojson", "20": "sleep_once:120", "30": "sleep_once:120"},
                        "max_attempts = 2\nretry_backoff = 0.1\n")  # fmt: skip
    config.write_text(config.read_text().replace("[presets.job]\n", "[presets.job]\ntime_budget = 20\n"))
    daemon = start_daemon(tmp_path / "d.log", output, "--scan", "--config", config)
    try:
        wait_for(lambda: 20 in dict(ran_by(tmp_path)), 120, what="checkpoint-20's job to run")
        os.kill(dict(ran_by(tmp_path))[20], signal.SIGKILL)  # what the OOM killer does to the worker
        assert daemon.wait(timeout=180) == 1  # checkpoint-10 failed
    finally:
        if daemon.poll() is None:
            daemon.kill()
    text = (tmp_path / "d.log").read_text()
    records = {r["step"]: r for r in results(output)}
    assert len(results(output)) == 3  # each job recorded once
    assert records[10]["status"] == "failed" and "no JSON" in records[10]["error"] and records[10]["attempt"] == 1
    assert (records[20]["status"], records[20]["attempt"]) == ("ok", 2)
    assert (records[30]["status"], records[30]["attempt"]) == ("ok", 2)
    attempts = ran_by(tmp_path)
    pids = [pid for _, pid in attempts]
    assert [step for step, _ in attempts][:2] == [10, 20] and sorted(step for step, _ in attempts) == [10, 20, 20, 30, 30]
    first_30, second_30 = [pid for step, pid in attempts if step == 30]
    assert pids[0] != pids[1] and second_30 != first_30  # a fresh worker after the failure, and after the timeout
    assert f"(pid {pids[0]}) recycled: after a failed job" in text
    assert f"(pid {pids[1]}) recycled: it ended during its job (killed by SIGKILL)" in text
    assert "job process killed by SIGKILL" in text  # the job's (transient) failure
    assert "timed out after 20 s; stopping it" in text and f"(pid {first_30}) recycled: its job was stopped (timed out after 20 s)" in text
    assert not any(alive(pid) for pid in pids)
    assert not worker_processes(output / "ckpt-watch")


def test_sighup_recycles_idle_workers_at_once_and_busy_ones_after_their_job_and_sigterm_leaves_none(
        copy_trainer_output, tmp_path, marker):  # fmt: skip
    output = copy_trainer_output()
    shutil.move(output / "checkpoint-20", tmp_path / "checkpoint-20")
    shutil.rmtree(output / "checkpoint-30")
    config = job_config(tmp_path, {"10": "sleep:4"})
    log_path = tmp_path / "d.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, env=marked_env(marker))  # fmt: skip
    try:
        wait_for(lambda: 10 in dict(ran_by(tmp_path)), 120, what="checkpoint-10's job to run")
        busy = dict(ran_by(tmp_path))[10]
        daemon.send_signal(signal.SIGHUP)  # while its job runs: the job finishes, then the worker goes
        wait_for(lambda: results(output), 60, what="checkpoint-10's result")
        assert [(r["step"], r["status"]) for r in results(output)] == [(10, "ok")]
        assert f"(pid {busy}) recycled: SIGHUP" in log_path.read_text()  # logged as its job ended
        wait_for(lambda: not alive(busy), 15, what="the recycled worker to end")

        shutil.move(tmp_path / "checkpoint-20", output / "checkpoint-20")
        wait_for(lambda: len(results(output)) == 2, 120, what="checkpoint-20's result")
        idle = dict(ran_by(tmp_path))[20]
        assert idle != busy and alive(idle)  # a fresh worker, waiting for the next job
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: not alive(idle), 30, what="the idle worker to be recycled")
        assert f"(pid {idle}) recycled: SIGHUP" in log_path.read_text()
        assert daemon.poll() is None and not worker_processes(output / "ckpt-watch")

        shutil.copytree(output / "checkpoint-20", tmp_path / "checkpoint-40")  # a worker for SIGTERM to stop
        state = json.loads((tmp_path / "checkpoint-40" / "trainer_state.json").read_text())
        (tmp_path / "checkpoint-40" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 40}))
        shutil.move(tmp_path / "checkpoint-40", output / "checkpoint-40")
        wait_for(lambda: len(results(output)) == 3, 120, what="checkpoint-40's result")
        assert worker_processes(output / "ckpt-watch")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert_none_left(marker, "SIGTERM of the daemon")
    assert "recycled: ckpt-watch stops" in log_path.read_text()


@pytest.mark.parametrize("worker", ["busy", "idle"])
def test_kill_9_of_the_daemon_leaves_no_worker(copy_trainer_output, tmp_path, marker, worker):
    output = copy_trainer_output()
    for name in ("checkpoint-20", "checkpoint-30"):
        shutil.rmtree(output / name)
    config = job_config(tmp_path, {"10": "sleep:120" if worker == "busy" else "ok"})
    with open(tmp_path / "d.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, env=marked_env(marker))  # fmt: skip
    try:
        if worker == "busy":
            wait_for(lambda: 10 in dict(ran_by(tmp_path)), 120, what="the job to run")
        else:
            wait_for(lambda: job_states(output).get("checkpoint-10/regular") == "done", 120, what="the job to end")
        pid = dict(ran_by(tmp_path))[10]
        assert alive(pid)
        time.sleep(0.5)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    assert_none_left(marker, f"kill -9 of the daemon with a {worker} worker")


def test_idle_workers_go_from_a_slot_the_pool_finds_busy_and_after_the_idle_time(tmp_path):
    """The pool's own rules, on real worker processes (no job needed): each step stops the right one."""
    from watcher.devices import child_environment
    from watcher.journal import Journal
    from watcher.warm import WarmPool, WarmSettings, WarmWorker

    journal = Journal(tmp_path / "journal.sqlite")
    pool = WarmPool(WarmSettings(idle_s=2.0))
    workers = {}
    for gpu in (0, 1):
        key = ((f"cuda:{gpu}",), (str(gpu),))
        workers[gpu] = pool.workers[key] = WarmWorker.start(key, f"cuda:{gpu}", child_environment([]),
                                                            tmp_path / f"warm-{gpu}", journal.processes)  # fmt: skip
    try:
        assert {r.pgid for r in journal.processes.all()} == {w.proc.pid for w in workers.values()}
        pool.refresh()  # not idle for long yet: both stay
        pool.free_slots({"cuda:0": "30000 of 81000 MiB used by another process"})
        # Recycled at once, stopped without holding up the loop: SIGTERM now, cleaned up by a later refresh.
        assert list(pool.workers) == [(("cuda:1",), ("1",))] and workers[1].alive
        wait_for(lambda: pool.refresh() or not workers[0].alive, 30, what="the recycled worker to end")
        wait_for(lambda: pool.refresh() or not pool.workers, 30, what="the idle worker to be recycled")
        wait_for(lambda: pool.refresh() or (not workers[1].alive and journal.processes.all() == []), 30,
                 what="both workers gone and forgotten")  # fmt: skip
        assert not (tmp_path / "warm-0").exists() and not (tmp_path / "warm-1").exists()
    finally:
        pool.shutdown()
        journal.close()


@pytest.mark.parametrize("line, message", [("warm = \"yes\"", "warm must be true or false, got 'yes'"),
                                           ("warm_max_jobs = 0", "warm_max_jobs must be a positive integer, got 0"),
                                           ("warm_max_gpu_mb = -1", "warm_max_gpu_mb must be a non-negative integer")])
def test_a_bad_warm_setting_is_one_line_and_exit_2(trainer_output, tmp_path, line, message):
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    run = ckpt_watch(trainer_output, "--scan", "--config", config)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
