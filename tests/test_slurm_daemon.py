"""The daemon with `executor = "slurm"` against a real one-node Slurm (tests/slurm/cluster.sh; the `slurm_cluster`
fixture starts it, or CI has).

Everything is real: the Trainer's checkpoints, the daemon as a process, sbatch/squeue/scancel/scontrol, Slurm
running the worker as a batch job, SIGKILL. Each test's run folder has a unique name, so its Slurm jobs
(named ckpt-watch.<run>.job<N>.a<attempt>) are told apart from other tests' on the shared cluster. A job here
costs a few seconds: the worker imports transformers for its weight check before the preset runs.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from helpers import ckpt_watch, read_journal, results, sleep_preset_config, wait_for, with_steps

from watcher.journal import JournalReader

pytestmark = pytest.mark.slurm

def slurm_config(tmp_path: Path, slurm: str = "", top: str = "", seconds: float = 1.0, preset: str = "sleepy",
                 max_jobs: int = 2) -> Path:  # fmt: skip
    """A config running `preset` (default `sleepy`: helpers.sleep_preset_config's command that sleeps `seconds`)
    through Slurm, at most `max_jobs` at once, asking Slurm every second."""
    config = sleep_preset_config(tmp_path, "sleepy", seconds, top=f'settle = 0\nexecutor = "slurm"\n{top}[slurm]\n'
                                 f"gpus_per_job = 0\npoll = 1\nmax_jobs = {max_jobs}\n{slurm}")  # fmt: skip
    config.write_text(config.read_text().replace('preset = "sleepy"', f'preset = "{preset}"', 1))
    return config


def run_folder(trainer_output: Path, tmp_path: Path, steps: list[int]) -> Path:
    """The Trainer's output dir with these checkpoint steps, under a unique name (see the module docstring)."""
    return with_steps(trainer_output, tmp_path / f"run-{uuid.uuid4().hex[:8]}", steps)


def our_slurm_jobs(output: Path) -> list[dict]:
    """Every Slurm job of this run that Slurm knows (queued, running or ended): id, name, state."""
    listed = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%j|%T"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    jobs = [dict(zip(("id", "name", "state"), line.split("|"))) for line in listed.split()]
    return [job for job in jobs if job["name"].startswith(f"ckpt-watch.{output.name}.")]


def slurm_rows(output: Path) -> list:
    return read_journal(output, JournalReader.slurm_jobs, [])


def journal_job(output: Path, step: int):
    return next(job for job in read_journal(output, JournalReader.jobs, []) if job.checkpoint.step == step)


def start(output: Path, config: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--config", str(config), *args],
                                stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip


def stop(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()


def running_in_slurm(output: Path, count: int) -> list[dict]:
    jobs = [job for job in our_slurm_jobs(output) if job["state"] == "RUNNING"]
    return jobs if len(jobs) >= count else []


# --- same results as local ----------------------------------------------------------------------------------


def test_a_scan_through_slurm_gives_the_same_results_as_a_local_scan(slurm_cluster, trainer_output, tmp_path):
    output = run_folder(trainer_output, tmp_path, [10, 20, 30])
    local = tmp_path / "local" / output.name
    shutil.copytree(output, local)
    config = slurm_config(tmp_path, preset="30s")
    through_slurm = ckpt_watch(output, "--scan", "--config", config, timeout=600)
    assert through_slurm.returncode == 0, through_slurm.stderr
    local_config = tmp_path / "local.toml"
    local_config.write_text(config.read_text().replace('executor = "slurm"', 'executor = "local"'))
    on_this_machine = ckpt_watch(local, "--scan", "--config", local_config, timeout=600)
    assert on_this_machine.returncode == 0, on_this_machine.stderr

    remote, here = results(output), results(local)
    assert sorted(r["step"] for r in remote) == [10, 20, 30]
    by_step = {r["step"]: r for r in here}
    for record in remote:
        assert record["status"] == "ok", record
        assert record["metrics"] == by_step[record["step"]]["metrics"]  # to the last bit: the same worker and model
        assert record["device"].startswith("slurm "), record["device"]
        log = (output / "ckpt-watch" / record["log"]).read_text()
        assert "[ckpt-watch] stage: evaluating" in log  # the Slurm job's own output went to the job's log
    assert {job["state"] for job in our_slurm_jobs(output)} == {"COMPLETED"}
    assert len(our_slurm_jobs(output)) == 3
    assert slurm_rows(output) == []  # every Slurm job forgotten once its result was recorded
    assert not any((output / "ckpt-watch" / ".slurm").iterdir())  # and its job folder removed


# --- the daemon's life is its own ---------------------------------------------------------------------------


def test_kill_9_with_two_slurm_jobs_running_then_a_restart_adopts_them(slurm_cluster, trainer_output, tmp_path):
    output = run_folder(trainer_output, tmp_path, [10, 20])
    config = slurm_config(tmp_path, seconds=15)
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log)
    try:
        running = wait_for(lambda: running_in_slurm(output, 2), 120, interval=0.2, what="two Slurm jobs running")
        daemon.kill()  # SIGKILL: no goodbye, the Slurm jobs are not ours to stop any more
        daemon.wait()
        assert {job["state"] for job in our_slurm_jobs(output)} == {"RUNNING"}
        daemon = start(output, config, log, "--scan")
        assert daemon.wait(timeout=300) == 0, log.read_text()
    finally:
        stop(daemon)
    text = log.read_text()
    assert text.count("following ") == 2 and "left running by the last stop" in text, text
    assert sorted(job["id"] for job in our_slurm_jobs(output)) == sorted(job["id"] for job in running)  # none again
    records = results(output)
    assert sorted(r["step"] for r in records) == [10, 20]  # one result each
    assert {r["device"] for r in records} == {f"slurm {job['id']}" for job in running}
    assert all(r["status"] == "ok" and r["attempt"] == 1 for r in records)


def test_sigterm_leaves_the_slurm_job_running_and_the_next_start_collects_it(slurm_cluster, trainer_output,
                                                                           tmp_path):  # fmt: skip
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, seconds=10)
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log)
    try:
        wait_for(lambda: running_in_slurm(output, 1), 120, interval=0.2, what="the Slurm job running")
        began = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert time.monotonic() - began < 10  # it did not wait for the job (stop_grace is 60 s)
        assert {job["state"] for job in our_slurm_jobs(output)} == {"RUNNING"}
        assert "leaving 1 Slurm job(s) running" in log.read_text()
        assert journal_job(output, 10).state in ("preparing", "evaluating")  # not put back to pending
        shown = ckpt_watch("status", output, "--config", config).stdout
        assert "no daemon running" in shown and "Slurm jobs left running" in shown, shown
        assert f"checkpoint-10/regular/sleepy  slurm {running_in_slurm(output, 1)[0]['id']} " in shown, shown
        wait_for(lambda: {j["state"] for j in our_slurm_jobs(output)} == {"COMPLETED"}, 120, what="job done")
        daemon = start(output, config, log, "--scan")
        assert daemon.wait(timeout=120) == 0, log.read_text()
    finally:
        stop(daemon)
    records = results(output)
    assert [(r["step"], r["status"], r["attempt"]) for r in records] == [(10, "ok", 1)]
    assert len(our_slurm_jobs(output)) == 1


def test_cancel_on_stop_cancels_the_slurm_jobs_and_their_jobs_run_again_next_time(slurm_cluster, trainer_output,
                                                                                tmp_path):  # fmt: skip
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, slurm="cancel_on_stop = true\n", seconds=120, top="stop_grace = 0\n")
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log)
    try:
        wait_for(lambda: running_in_slurm(output, 1), 120, interval=0.2, what="the Slurm job running")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        stop(daemon)
    wait_for(lambda: {j["state"] for j in our_slurm_jobs(output)} == {"CANCELLED"}, 60, what="Slurm job cancelled")
    job = journal_job(output, 10)
    assert job.state == "pending" and job.attempts == 0, job
    assert slurm_rows(output) == []


# --- Slurm's final states -----------------------------------------------------------------------------------


def one_job_ending_by(trainer_output: Path, tmp_path: Path, end) -> tuple[Path, str, subprocess.CompletedProcess]:
    """Scan one checkpoint with a job that would sleep 5 minutes; `end(slurm_id)` is done to it once it runs.
    Returns the output dir, the daemon's log and how the scan ended."""
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, seconds=300)
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log, "--scan")
    try:
        job = wait_for(lambda: running_in_slurm(output, 1), 120, interval=0.2, what="the Slurm job running")[0]
        wait_for(lambda: "[ckpt-watch] stage: evaluating" in (output / "ckpt-watch" / "checkpoint-10" / "regular" /
                                                              "sleepy.log").read_text(), 120, what="evaluating")  # fmt: skip
        end(job["id"])
        code = daemon.wait(timeout=120)
    finally:
        stop(daemon)
    return output, log.read_text(), code


def test_a_job_past_its_slurm_time_limit_fails_with_timeout_and_is_not_retried(slurm_cluster, trainer_output,
                                                                             tmp_path):  # fmt: skip
    def time_limit_now(slurm_id: str) -> None:  # Slurm's own TIMEOUT path, in a second instead of a minute
        subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "TimeLimit=0"], check=True)

    output, log, code = one_job_ending_by(trainer_output, tmp_path, time_limit_now)
    assert code == 1, log  # a scan with a failed job ends with status 1
    job = journal_job(output, 10)
    assert job.state == "failed" and job.attempts == 1, job
    assert "TIMEOUT" in job.error, job.error
    assert [r["status"] for r in results(output)] == ["failed"]


def test_a_job_cancelled_from_outside_fails_naming_it(slurm_cluster, trainer_output, tmp_path):
    output, log, code = one_job_ending_by(trainer_output, tmp_path,
                                          lambda slurm_id: subprocess.run(["scancel", slurm_id], check=True))  # fmt: skip
    assert code == 1, log
    job = journal_job(output, 10)
    assert job.state == "failed" and job.attempts == 1, job
    assert "cancelled outside ckpt-watch" in job.error and "scancel" in job.error, job.error


# --- queued jobs: deleted checkpoints, overtaken ones, max_jobs ---------------------------------------------


def held_job(output: Path) -> dict:
    jobs = [job for job in our_slurm_jobs(output) if job["state"] == "PENDING"]
    return jobs[0] if jobs else {}


def test_a_checkpoint_deleted_while_its_job_is_queued_is_gone_and_the_job_cancelled(slurm_cluster, trainer_output,
                                                                                  tmp_path):  # fmt: skip
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, slurm='extra = ["--hold"]\n')  # held: it stays in Slurm's queue
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log)
    try:
        queued = wait_for(lambda: held_job(output), 120, interval=0.2, what="a queued Slurm job")
        shutil.rmtree(output / "checkpoint-10")
        wait_for(lambda: journal_job(output, 10).state == "gone", 60, what="the job gone")
        wait_for(lambda: {j["state"] for j in our_slurm_jobs(output)} == {"CANCELLED"}, 60, what="cancelled")
    finally:
        stop(daemon)
    assert [job["id"] for job in our_slurm_jobs(output)] == [queued["id"]]
    assert results(output) == []
    assert slurm_rows(output) == []


def test_latest_cancels_a_queued_slurm_job_a_newer_checkpoint_overtook(slurm_cluster, trainer_output, tmp_path):
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, slurm='extra = ["--hold"]\n', max_jobs=1, top='policy = "latest"\n')
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log)
    try:
        first = wait_for(lambda: held_job(output), 120, interval=0.2, what="a queued Slurm job")
        shutil.copytree(trainer_output / "checkpoint-20", output / "checkpoint-20")
        wait_for(lambda: journal_job(output, 10).state == "skipped", 60, what="the queued job skipped")
        second = wait_for(lambda: [j for j in our_slurm_jobs(output) if j["state"] == "PENDING"], 60,
                          what="the newer checkpoint's job queued")  # fmt: skip
    finally:
        stop(daemon)
    states = {job["id"]: job["state"] for job in our_slurm_jobs(output)}
    assert states[first["id"]] == "CANCELLED"
    assert second[0]["name"].endswith(f"job{journal_job(output, 20).id}.a1")
    assert "overtaken by step 20" in journal_job(output, 10).error
    for job in our_slurm_jobs(output):  # leave nothing held on the shared cluster
        subprocess.run(["scancel", job["id"]], check=False)


def test_max_jobs_2_never_has_more_than_two_in_slurms_queue(slurm_cluster, trainer_output, tmp_path):
    output = run_folder(trainer_output, tmp_path, [10, 20, 30, 40, 50])
    config = slurm_config(tmp_path, seconds=1)
    most, done = [0], threading.Event()

    def watch_squeue() -> None:
        while not done.is_set():
            live = [j for j in our_slurm_jobs(output) if j["state"] in ("PENDING", "CONFIGURING", "RUNNING",
                                                                         "COMPLETING")]  # fmt: skip
            most[0] = max(most[0], len(live))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_squeue)
    watcher.start()
    try:
        scan = ckpt_watch(output, "--scan", "--config", config, timeout=600)
    finally:
        done.set()
        watcher.join()
    assert scan.returncode == 0, scan.stderr
    assert sorted(r["step"] for r in results(output)) == [10, 20, 30, 40, 50]
    assert most[0] == 2
    assert len(our_slurm_jobs(output)) == 5


def test_status_shows_the_slurm_job_id_and_state(slurm_cluster, trainer_output, tmp_path):
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, slurm='extra = ["--hold"]\n')
    log = tmp_path / "daemon.log"
    daemon = start(output, config, log)
    try:
        queued = wait_for(lambda: held_job(output), 120, interval=0.2, what="a queued Slurm job")
        shown = wait_for(lambda: (lambda s: s if "JobHeldUser" in s.stdout else None)(
            ckpt_watch("status", output, "--config", config)), 30, interval=0.5, what="status with the state")  # fmt: skip
        as_json = json.loads(ckpt_watch("status", output, "--config", config, "--json", "--pool").stdout)
    finally:
        stop(daemon)
        subprocess.run(["scancel", queued["id"]], check=False)
    assert f"slurm {queued['id']}" in shown.stdout and "PENDING" in shown.stdout, shown.stdout
    assert as_json["pool"]["slurm"][0]["slurm_id"] == queued["id"], as_json


def test_a_results_walltime_counts_from_when_slurm_started_it_and_the_queue_wait_is_timed(slurm_cluster,
                                                                                         trainer_output, tmp_path):  # fmt: skip
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, slurm='extra = ["--hold"]\n')
    daemon = start(output, config, tmp_path / "daemon.log")
    try:
        queued = wait_for(lambda: held_job(output), 120, interval=0.2, what="a queued Slurm job")
        time.sleep(4)
        released = time.time()
        subprocess.run(["scontrol", "release", queued["id"]], check=True)
        (result,) = wait_for(lambda: results(output), 120, what="the result")
    finally:
        stop(daemon)
    assert result["status"] == "ok", result
    assert result["timings"]["queue_s"] >= 3, result["timings"]  # Slurm's start time is in whole seconds
    started = datetime.fromisoformat(result["started_at"]).timestamp()
    assert started >= released - 1.0, (result["started_at"], released)


def test_a_job_over_its_slurm_memory_fails_out_of_memory_and_is_not_retried(slurm_cluster, trainer_output, tmp_path):
    output = run_folder(trainer_output, tmp_path, [10])
    config = slurm_config(tmp_path, slurm='mem = "1500M"\n', seconds=60)
    # The preset's command takes 2.5 GB (written, so resident) where the job may have 1.5 GB: slurmstepd kills it.
    (tmp_path / "sleep_job.py").write_text("import time\nheld = b'x' * (2500 << 20)\ntime.sleep(60)\n")
    scan = subprocess.run([sys.executable, "-m", "watcher", str(output), "--config", str(config), "--scan"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert scan.returncode == 1, scan.stderr[-3000:]  # a scan with a failed job
    job = journal_job(output, 10)
    assert job.state == "failed" and job.attempts == 1, job
    assert "out of memory" in job.error and "raise [slurm] mem" in job.error, job.error
