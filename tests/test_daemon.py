"""The daemon end to end: real Trainer checkpoints, real child processes, real lm-eval, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from helpers import ckpt_watch, job_states, journal_checkpoints, results, sleep_preset_config, start_daemon, wait_for, worker_processes

# A probe reads only safetensors headers: for tests of the daemon's mechanics, where lm-eval is not what is
# being checked. The lm_eval presets make the real evaluator run where it is.
CONFIG = """
[presets.params]
description = "parameter count only"
[[presets.params.evaluators]]
backend = "probes"
probes = ["parameters"]

[presets.quick]
description = "bundled multiple-choice task, 8 questions"
[[presets.quick.evaluators]]
backend = "lm_eval"
tasks = ["ckpt_watch_smoke_mc"]
limit = 8
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "ckpt-watch.toml"
    path.write_text(CONFIG)
    return path


# --- --scan ----------------------------------------------------------------------------------------------------


def test_scan_evaluates_each_complete_checkpoint_once_with_lm_eval(copy_trainer_output, config_file):
    output = copy_trainer_output()
    # A fourth folder that is not complete (its weights are truncated) must never be evaluated.
    broken = output / "checkpoint-40"
    shutil.copytree(output / "checkpoint-30", broken)
    state = json.loads((broken / "trainer_state.json").read_text())
    (broken / "trainer_state.json").write_text(json.dumps({**state, "global_step": 40}))
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.truncate(os.path.getsize(broken / "model.safetensors") - 100)

    first = ckpt_watch(output, "--scan", "--config", config_file, "--preset", "quick")
    assert first.returncode == 0, first.stderr
    records = results(output)
    assert sorted((r["step"], r["variant"], r["preset"], r["status"]) for r in records) == [
        (10, "regular", "quick", "ok"), (20, "regular", "quick", "ok"), (30, "regular", "quick", "ok")]  # fmt: skip
    for record in records:
        assert record["checkpoint"] == f"checkpoint-{record['step']}"
        assert 0.0 <= record["metrics"]["ckpt_watch_smoke_mc/acc"] <= 1.0
        assert record["device"] == "cpu" and record["walltime_s"] > 0
        per_job = json.loads((output / "ckpt-watch" / record["checkpoint"] / "regular" / "quick.json").read_text())
        assert per_job["result_id"] == record["result_id"] and "lm_eval" in per_job["raw"]
        assert "lm_eval" in per_job["versions"]
    assert "checkpoint-40" not in job_states(output)
    # Nothing was written inside the trainer's folders, and no new top-level name a trainer globs.
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30",
                                                         "checkpoint-40", "ckpt-watch"]  # fmt: skip
    assert not any(p.name.startswith(".") or "ckpt" in p.name for p in (output / "checkpoint-10").iterdir())

    second = ckpt_watch(output, "--scan", "--config", config_file, "--preset", "quick")
    assert second.returncode == 0, second.stderr
    assert len(results(output)) == 3
    assert "started" not in second.stderr


def test_scan_reports_a_failing_job_with_exit_1_and_keeps_the_others(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    config = tmp_path / "c.toml"
    config.write_text("max_attempts = 2\nretry_backoff = 0.1\n" + CONFIG)
    # One tensor renamed: its weights would not all load, so this one job cannot run (see test_load_check.py).
    weights = output / "checkpoint-20" / "model.safetensors"
    original = weights.read_bytes()
    state = load_file(weights)
    state["model.norm.renamed"] = state.pop("model.norm.weight")
    save_file(state, weights, metadata={"format": "pt"})
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "params")
    assert run.returncode == 1, run.stderr
    by_step = {r["step"]: r for r in results(output)}
    assert by_step[10]["status"] == "ok" and by_step[30]["status"] == "ok"
    assert by_step[20]["status"] == "failed" and "missing (first: model.norm.weight)" in by_step[20]["error"]
    assert by_step[20]["attempt"] == 1  # retrying would not make the weights load
    assert by_step[10]["metrics"]["params/total"] > 0
    assert "Traceback" not in run.stderr

    # Failed jobs stay failed (a second scan does nothing and still says 1) until --retry-failed.
    again = ckpt_watch(output, "--scan", "--config", config, "--preset", "params")
    assert again.returncode == 1 and len(results(output)) == 3
    weights.write_bytes(original)
    retried = ckpt_watch(output, "--scan", "--config", config, "--preset", "params", "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert [(r["step"], r["status"]) for r in results(output)][-1] == (20, "ok")


def test_an_evaluator_error_fails_the_job_with_its_message(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-10")
    shutil.rmtree(output / "checkpoint-20")
    config = tmp_path / "c.toml"
    config.write_text('[presets.bad]\n[[presets.bad.evaluators]]\nbackend = "lm_eval"\n'
                      'tasks = ["no_such_task"]\n')  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "bad")
    assert run.returncode == 1
    (record,) = results(output)
    assert record["status"] == "failed" and "no_such_task" in record["error"]
    assert record["attempt"] == 1  # an unknown task is not retried
    assert "Traceback" not in run.stderr
    log = output / "ckpt-watch" / record["log"]
    assert "no_such_task" in log.read_text()


# --- crash safety ---------------------------------------------------------------------------------------------


def test_sigkill_mid_job_loses_nothing_and_redoes_only_the_interrupted_job(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    # Jobs of a known length (a command that sleeps 3 s): a warm lm-eval job is over in a second, before the kill.
    config = sleep_preset_config(tmp_path, "sleepy", 3)
    daemon = start_daemon(tmp_path / "first.log", output, "--scan", "--config", config)
    try:
        wait_for(lambda: job_states(output).get("checkpoint-20/regular") in ("preparing", "evaluating"), 240,
                 what="the second job to start")  # fmt: skip
        assert len(results(output)) == 1
        time.sleep(1.0)  # let the worker get going
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # The job's child dies with the daemon (PR_SET_PDEATHSIG): nothing keeps the GPU busy.
    wait_for(lambda: not worker_processes(output / "ckpt-watch"), 15, what="the orphaned worker to die")

    rerun = ckpt_watch(output, "--scan", "--config", config)
    assert rerun.returncode == 0, rerun.stderr
    records = results(output)
    assert sorted(r["step"] for r in records) == [10, 20, 30]
    assert len({r["result_id"] for r in records}) == 3
    assert "1 job(s) interrupted" in rerun.stderr
    assert "started checkpoint-10" not in rerun.stderr  # the finished job was not redone
    log = (output / "ckpt-watch" / "checkpoint-20" / "regular" / "sleepy.log").read_text()
    assert log.count("===== attempt 1") == 2  # the interrupted attempt did not count against the job


def test_a_checkpoint_deleted_mid_job_is_gone_not_failed(copy_trainer_output, config_file, tmp_path):
    output = copy_trainer_output()
    daemon = start_daemon(tmp_path / "d.log", output, "--scan", "--config", config_file, "--preset", "quick")
    try:
        wait_for(lambda: job_states(output).get("checkpoint-10/regular") in ("preparing", "evaluating"), 120,
                 interval=0.02, what="the first job to start")  # fmt: skip
        shutil.rmtree(output / "checkpoint-10")  # the trainer's save_total_limit rotation
        assert daemon.wait(timeout=300) == 0, (tmp_path / "d.log").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    states = job_states(output)
    assert states == {"checkpoint-10/regular": "gone", "checkpoint-20/regular": "done", "checkpoint-30/regular": "done"}
    assert sorted(r["step"] for r in results(output)) == [20, 30]


def test_a_resaved_checkpoint_is_a_new_generation_and_is_evaluated_again(copy_trainer_output, config_file):
    output = copy_trainer_output()
    assert ckpt_watch(output, "--scan", "--config", config_file, "--preset", "params").returncode == 0
    # The run restarted from step 10 and saved checkpoint-20 again: new weights (here the same bytes), new state.
    for name in ("model.safetensors", "trainer_state.json"):
        path = output / "checkpoint-20" / name
        path.write_bytes(path.read_bytes())
    again = ckpt_watch(output, "--scan", "--config", config_file, "--preset", "params")
    assert again.returncode == 0, again.stderr
    records = results(output)
    assert sorted((r["step"], r["generation"]) for r in records) == [(10, 1), (20, 1), (20, 2), (30, 1)]


# --- watching -------------------------------------------------------------------------------------------------

TRAINER_ORDER = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json"]  # fmt: skip


def slow_copy(source: Path, dest: Path, pause: float) -> float:
    """Write a checkpoint file by file, each file in two halves, like a slow disk. Returns the completion time."""
    dest.mkdir()
    names = [n for n in TRAINER_ORDER if (source / n).exists()]
    names += sorted(p.name for p in source.iterdir() if p.name not in names)
    names.remove("trainer_state.json")
    names.append("trainer_state.json")  # the Trainer's last write
    for index, name in enumerate(names):
        if index:
            time.sleep(pause / 2)
        data = (source / name).read_bytes()
        with open(dest / name, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(pause / 2)
            handle.write(data[len(data) // 2 :])
    return time.time()  # the moment the last file was closed


@pytest.mark.serial  # measures a latency of under 2 s
def test_the_daemon_picks_up_a_slowly_written_checkpoint_only_when_complete_and_within_2_s(
    trainer_output, config_file, tmp_path
):
    output = tmp_path / "output"
    output.mkdir()
    log = tmp_path / "daemon.log"
    daemon = start_daemon(log, output, "--config", config_file, "--preset", "params", "-v")
    latencies = []
    try:
        wait_for(lambda: b"inotify" in log.read_bytes(), 60, what="the daemon to start watching")
        for step in (10, 20):
            done_at = slow_copy(trainer_output / f"checkpoint-{step}", output / f"checkpoint-{step}", pause=0.4)
            rows = wait_for(lambda: [c for c in journal_checkpoints(output) if c.step == step],
                            30, interval=0.02, what=f"checkpoint-{step} to be detected")  # fmt: skip
            assert len(rows) == 1, "picked up before it was complete"
            completed_at = rows[0].completed_at
            assert completed_at >= done_at, "picked up before the last file was written"
            latencies.append(completed_at - done_at)
        wait_for(lambda: len(results(output)) == 2, 180, what="both results")  # two jobs on a loaded machine
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    print(f"\ndetection latency after the last write: {', '.join(f'{x:.2f} s' for x in latencies)}")
    assert max(latencies) < 2.0
    assert [r["step"] for r in results(output)] == [10, 20]
    assert all(r["status"] == "ok" for r in results(output))


def test_policy_latest_skips_overtaken_checkpoints_but_never_the_last(copy_trainer_output, config_file):
    output = copy_trainer_output()
    run = ckpt_watch(output, "--scan", "--config", config_file, "--preset", "params", "--policy", "latest")
    assert run.returncode == 0, run.stderr
    assert [r["step"] for r in results(output)] == [30]
    assert job_states(output) == {"checkpoint-10/regular": "skipped", "checkpoint-20/regular": "skipped",
                                  "checkpoint-30/regular": "done"}  # fmt: skip
    # A later scan with policy `all` backfills what `latest` skipped.
    assert ckpt_watch(output, "--scan", "--config", config_file, "--preset", "params").returncode == 0
    assert sorted(r["step"] for r in results(output)) == [10, 20, 30]


def test_a_job_over_its_time_budget_is_stopped_and_failed_and_the_daemon_carries_on(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-10")
    config = tmp_path / "c.toml"
    config.write_text("max_attempts = 1\n" + CONFIG + '[presets.slow]\ntime_budget = 1\n[[presets.slow.evaluators]]\n'
                      'backend = "lm_eval"\ntasks = ["ckpt_watch_smoke_mc"]\n')  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "slow")
    assert run.returncode == 1
    assert [(r["step"], r["status"], r["error"]) for r in results(output)] == [
        (20, "failed", "timed out after 1 s"), (30, "failed", "timed out after 1 s")]  # fmt: skip
    assert all(r["walltime_s"] < 15 for r in results(output))
    assert not worker_processes(output / "ckpt-watch")


def test_a_job_child_killed_by_the_kernel_fails_that_attempt_only(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-10")
    shutil.rmtree(output / "checkpoint-20")
    config = tmp_path / "c.toml"
    config.write_text("max_attempts = 2\nretry_backoff = 0.1\n" + CONFIG)
    # `params`: the child is killed seconds before any evaluator starts, and the retry need not run lm-eval.
    daemon = start_daemon(tmp_path / "d.log", output, "--scan", "--config", config, "--preset", "params")
    try:
        pids = wait_for(lambda: worker_processes(output / "ckpt-watch"), 120, interval=0.05, what="a job child")
        os.kill(pids[0], signal.SIGKILL)  # what the OOM killer does
        assert daemon.wait(timeout=300) == 0, (tmp_path / "d.log").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (record,) = results(output)
    assert (record["status"], record["attempt"]) == ("ok", 2)
    assert "killed by SIGKILL" in (tmp_path / "d.log").read_text()
