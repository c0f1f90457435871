"""watcher/slurm.py against a real one-node Slurm (tests/slurm/cluster.sh, the `slurm_cluster` fixture).

Jobs here take about a second each. Every test names its jobs uniquely: the cluster is shared by the session
(and by other sessions on this machine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from watcher import slurm
from watcher.config import SlurmSettings
from watcher.slurm import SlurmError, SlurmJobState

SETTINGS = SlurmSettings()


def unique(label: str) -> str:
    return f"ckpt-watch-test:{label}:{uuid.uuid4().hex[:8]}"


def write_job(folder: Path, label: str, *commands: str, time_text: str = "00:02:00",
              settings: SlurmSettings = SETTINGS) -> tuple[Path, Path, str]:  # fmt: skip
    """A job script in `folder` (run there, logging to folder/job.log): (script, log, job name)."""
    name, log = unique(label), folder / "job.log"
    script = folder / "job.sh"
    script.write_text(slurm.job_script(name=name, log=log, workdir=folder, settings=settings, gpus=0,
                                       time=time_text, commands=list(commands)))  # fmt: skip
    return script, log, name


def wait_for(slurm_id: str, done=lambda s: s.finished, timeout: float = 120) -> SlurmJobState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = slurm.states([slurm_id]).get(slurm_id)
        if state is not None and done(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"Slurm job {slurm_id} not there within {timeout} s: {slurm.states([slurm_id])}")


# --- pure: no Slurm needed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (1, "00:01:00"), (60, "00:01:00"), (60.5, "00:02:00"), (0, "00:01:00"), (3600, "01:00:00"),
    (23 * 3600 + 59 * 60 + 1, "1-00:00:00"), (86400, "1-00:00:00"), (86401, "1-00:01:00"),
    (3 * 86400 + 5 * 3600 + 7 * 60, "3-05:07:00"),
])  # fmt: skip
def test_time_limit_rounds_up_to_whole_minutes(seconds, text):
    assert slurm.time_limit(seconds) == text


def test_job_script_renders_every_option(tmp_path):
    settings = SlurmSettings(partition="gpu", account="evals", qos="high", gpu_type="h100", cpus_per_task=8, mem="64G",
                             constraint="h100&ib", setup=("module load cuda/12.4", "source /env/bin/activate"),
                             extra=("--reservation=eval", "#SBATCH --nice=10"))  # fmt: skip
    log = tmp_path / "run 1" / "it's 100%.log"
    text = slurm.job_script(name="ckpt-watch:run:checkpoint-10", log=log, workdir=tmp_path / "run 1",
                            settings=settings, gpus=2, time="01:10:00",
                            commands=["python -m watcher.worker spec.json"])  # fmt: skip
    quoted_log = "'" + str(log).replace("'", "'\"'\"'").replace("%", "%%") + "'"
    assert text.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=ckpt-watch:run:checkpoint-10",
        f"#SBATCH --output={quoted_log}",
        f"#SBATCH --error={quoted_log}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir='{tmp_path}/run 1'",
        "#SBATCH --no-requeue",
        "#SBATCH --time=01:10:00",
        "#SBATCH --gres=gpu:h100:2",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=evals",
        "#SBATCH --qos=high",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --constraint='h100&ib'",
        "#SBATCH --reservation=eval",
        "#SBATCH --nice=10",
        "",
        "# [slurm] setup",
        "module load cuda/12.4",
        "source /env/bin/activate",
        "",
        "python -m watcher.worker spec.json",
    ]
    # Unset options are the cluster's defaults; no GPU asked for with gpus=0.
    plain = slurm.job_script(name="n", log=log, workdir=tmp_path, settings=SETTINGS, gpus=0, time="00:05:00",
                             commands=["true"])  # fmt: skip
    assert not any(opt in plain for opt in ("--gres", "--partition", "--account", "--qos", "--mem", "--constraint"))
    with pytest.raises(ValueError, match="line break"):
        slurm.job_script(name="a\nb", log=log, workdir=tmp_path, settings=SETTINGS, gpus=0, time="1", commands=[])


@pytest.mark.parametrize("state, reason, log_tail, retry, words", [
    ("FAILED", "NonZeroExitCode", "Traceback ...\nModuleNotFoundError: No module named 'watcher'\n", True,
     ["FAILED", "NonZeroExitCode", "No module named 'watcher'"]),
    ("NODE_FAIL", "None", "", True, ["NODE_FAIL"]),
    ("PREEMPTED", "None", "", True, ["PREEMPTED"]),
    ("BOOT_FAIL", "None", "", True, ["BOOT_FAIL"]),
    ("SPECIAL_EXIT", "None", "", True, ["SPECIAL_EXIT"]),  # a state we do not know: worth another try
    ("COMPLETED", "None", "", True, ["COMPLETED", "no outcome"]),
    ("TIMEOUT", "TimeLimit", "", False, ["TIMEOUT", "time limit"]),
    ("OUT_OF_MEMORY", "OutOfMemory", "", False, ["OUT_OF_MEMORY", "out of memory"]),
    ("FAILED", "JobLaunchFailure", "slurmstepd-vm: error: Exceeded job memory limit\n", False,
     ["FAILED", "out of memory"]),
    ("FAILED", "NonZeroExitCode", "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=8.batch\n", False,
     ["out of memory"]),
    ("DEADLINE", "DeadLine", "", False, ["DEADLINE"]),
    ("CANCELLED", "None", "", False, ["CANCELLED", "outside ckpt-watch", "scancel"]),
])  # fmt: skip
def test_describe_end_maps_each_state(state, reason, log_tail, retry, words):
    got_retry, text = slurm.describe_end(SlurmJobState("12", state, reason), log_tail)
    assert got_retry is retry
    assert text.startswith("Slurm job 12 ") and "\n" not in text
    for word in words:
        assert word in text


def test_finished_is_every_state_outside_the_pending_running_family():
    for state in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "STOPPED"):
        assert not SlurmJobState("1", state, "None").finished
    for state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                  "BOOT_FAIL", "DEADLINE"):  # fmt: skip
        assert SlurmJobState("1", state, "None").finished


def test_missing_tools_names_them(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.missing_tools() == (
        'sbatch, squeue, scancel not found on PATH (executor = "slurm" needs Slurm\'s command-line tools)')
    with pytest.raises(SlurmError, match="^squeue: not found on PATH"):
        slurm.states(["1"])


# --- against the real cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_past_its_time_limit(slurm_cluster, tmp_path_factory) -> tuple[str, Path]:
    """A running job whose time limit is cut to zero: (its id, its log). The real time-limit path, but slurmctld
    ends such a job only at its next time-limit sweep, every 30 s (measured: 0 to 30 s after the update). So the
    first cluster test asks for this, the other tests run meanwhile, and the last test checks the job's end."""
    folder = tmp_path_factory.mktemp("timeout")
    script, log, _ = write_job(folder, "timeout", "echo started", "sleep 120", time_text=slurm.time_limit(300))
    slurm_id = slurm.submit(script)
    wait_for(slurm_id, lambda s: s.state == "RUNNING")
    subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "TimeLimit=0"], check=True, timeout=30)
    return slurm_id, log


def test_a_job_runs_and_appends_to_its_log(slurm_cluster, job_past_its_time_limit, tmp_path):
    """(Asks for job_past_its_time_limit only to start its 30 s wait early.)"""
    assert slurm.missing_tools() is None
    script, log, name = write_job(tmp_path, "ok", "echo from-the-job", "pwd > where.txt", "echo done > result.txt")
    log.write_text("earlier attempt\n")
    slurm_id = slurm.submit(script)
    assert slurm_id.isdigit()
    assert slurm.find_by_name(name) == [slurm_id]
    assert wait_for(slurm_id) == SlurmJobState(slurm_id, "COMPLETED", "None")
    assert (tmp_path / "result.txt").read_text() == "done\n"
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path)  # --chdir
    assert log.read_text() == "earlier attempt\nfrom-the-job\n"  # --open-mode=append: a retry keeps the earlier log
    assert slurm.find_by_name(name) == [slurm_id]  # finished jobs are still found (MinJobAge)
    assert slurm.find_by_name(unique("never-submitted")) == []


def test_states_answers_for_several_jobs_in_one_call(slurm_cluster, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    ok = slurm.submit(write_job(tmp_path / "a", "ok", "true")[0])
    failing_script, failing_log, _ = write_job(tmp_path / "b", "exit3", "echo about to fail", "exit 3")
    failing = slurm.submit(failing_script)
    wait_for(ok), wait_for(failing)
    unknown = "99999999"
    assert slurm.states([ok, failing, unknown, ok]) == {
        ok: SlurmJobState(ok, "COMPLETED", "None"),
        failing: SlurmJobState(failing, "FAILED", "NonZeroExitCode"),
    }  # an id Slurm does not know (purged) is absent
    monkeypatch.setattr(slurm, "SQUEUE_CHUNK", 2)  # hundreds of ids go in several calls: [ok, failing], [unknown]
    assert slurm.states([ok, failing, unknown]) == {
        ok: SlurmJobState(ok, "COMPLETED", "None"),
        failing: SlurmJobState(failing, "FAILED", "NonZeroExitCode"),
    }
    assert slurm.states([unknown]) == {}  # squeue exits 1 "Invalid job id specified" for a lone unknown id
    assert slurm.states([unknown, "99999998"]) == {}
    assert slurm.states([]) == {}
    retry, reason = slurm.describe_end(slurm.states([failing])[failing], failing_log.read_text())
    assert retry is True
    assert reason == f"Slurm job {failing} ended FAILED (NonZeroExitCode): about to fail"


def test_cancel(slurm_cluster, tmp_path):
    script, log, _ = write_job(tmp_path, "cancel", "sleep 120")
    slurm_id = slurm.submit(script)
    wait_for(slurm_id, lambda s: s.state == "RUNNING")
    slurm.cancel(slurm_id)
    state = wait_for(slurm_id)
    assert state.state == "CANCELLED"
    slurm.cancel(slurm_id)  # already over: no error
    slurm.cancel("99999999")  # unknown: no error
    retry, reason = slurm.describe_end(state, log.read_text())
    assert retry is False and "CANCELLED" in reason


def test_a_job_over_its_memory_is_out_of_memory(slurm_cluster, tmp_path):
    """slurmstepd's own words in the log map to "out of memory" (task/none: FAILED; task/cgroup: OUT_OF_MEMORY)."""
    script, log, _ = write_job(tmp_path, "memory", "python3 -c 'import time; b = bytearray(300 << 20); time.sleep(5)'",
                               settings=SlurmSettings(mem="20M"))  # fmt: skip
    state = wait_for(slurm.submit(script))
    assert state.state in ("FAILED", "OUT_OF_MEMORY")
    retry, reason = slurm.describe_end(state, log.read_text())
    assert retry is False and state.state in reason and "out of memory" in reason


def test_slurm_refusing_a_job_gives_its_own_message(slurm_cluster, tmp_path):
    script, _, _ = write_job(tmp_path, "nopart", "true", settings=SlurmSettings(partition="no-such-partition"))
    with pytest.raises(SlurmError) as refused:
        slurm.submit(script)
    assert str(refused.value) == (f"sbatch --parsable {script} failed (exit status 1): "
                                  "sbatch: error: invalid partition specified: no-such-partition")  # fmt: skip
    with pytest.raises(SlurmError, match=r"^sbatch --parsable .* could not be run: \[Errno 2\] No such file"):
        slurm.submit(script, cwd=tmp_path / "gone")


def test_sbatch_accepts_every_rendered_option(slurm_cluster, tmp_path):
    """sbatch --test-only parses the script's #SBATCH lines (quoted paths with spaces, a quote and a %) and
    checks them with the controller, without running anything. Options this cluster has not got (GPUs,
    features, reservations) are left out."""
    folder = tmp_path / "it's a 100% folder"
    folder.mkdir()
    settings = SlurmSettings(partition="debug", account="evals", qos="normal", cpus_per_task=1, mem="100M",
                             extra=("--comment='ckpt watch'", "#SBATCH --nice=10"), setup=("echo set up",))  # fmt: skip
    script, _, name = write_job(folder, "test-only", "true", settings=settings)
    checked = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "to start at" in checked.stderr
    # and it does check: the same with an option the cluster refuses
    (folder / "bad").mkdir()
    bad = write_job(folder / "bad", "test-only-bad", "true", settings=SlurmSettings(constraint="no-such-feature"))[0]
    refused = subprocess.run(["sbatch", "--test-only", str(bad)], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "Invalid feature" in refused.stderr
    # A real run puts its log where the quoted, %-escaped path says.
    slurm_id = slurm.submit(script)
    assert wait_for(slurm_id).state == "COMPLETED"
    assert (folder / "job.log").read_text() == "set up\n"
    assert slurm.find_by_name(name) == [slurm_id]


def conf_pointing_at(port: int, tmp_path: Path, message_timeout: int) -> str:
    """A copy of the cluster's slurm.conf whose controller is at `port` instead."""
    lines = [line for line in Path(os.environ["SLURM_CONF"]).read_text().splitlines()
             if not line.startswith(("SlurmctldPort=", "MessageTimeout="))]  # fmt: skip
    conf = tmp_path / "slurm.conf"
    conf.write_text("\n".join(lines + [f"SlurmctldPort={port}", f"MessageTimeout={message_timeout}"]) + "\n")
    return str(conf)


def test_a_controller_that_is_down_or_silent_is_a_slurm_error(slurm_cluster, tmp_path, monkeypatch):
    with socket.socket() as silent:  # accepts connections, never answers: a hung slurmctld
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        # Down: nothing listens on port + 1 (MessageTimeout=1 makes squeue give up at once instead of after 18 s).
        monkeypatch.setenv("SLURM_CONF", conf_pointing_at(port + 1, tmp_path, message_timeout=1))
        down = r"^squeue .* failed \(exit status 1\): slurm_load_jobs error: Unable to contact slurm controller"
        with pytest.raises(SlurmError, match=down):
            slurm.states(["1", "2"])
        with pytest.raises(SlurmError, match="Unable to contact slurm controller"):
            slurm.cancel("1")
        # Silent: squeue would wait MessageTimeout (100 s); the command's own timeout ends it.
        monkeypatch.setenv("SLURM_CONF", conf_pointing_at(port, tmp_path, message_timeout=100))
        monkeypatch.setattr(slurm, "COMMAND_TIMEOUT", 1.5)
        started = time.monotonic()
        with pytest.raises(SlurmError, match=r"^squeue .* did not answer within 1.5 s \(is slurmctld up\?\)$"):
            slurm.states(["1"])
        assert time.monotonic() - started < 10


def test_a_job_over_its_time_limit_ends_timeout(job_past_its_time_limit):
    slurm_id, log = job_past_its_time_limit
    state = wait_for(slurm_id, timeout=90)  # slurmctld's time-limit sweep runs every 30 s
    assert (state.state, state.reason) == ("TIMEOUT", "TimeLimit")
    assert "DUE TO TIME LIMIT" in log.read_text()
    reason = f"Slurm job {slurm_id} hit its time limit (TIMEOUT); raise [slurm] time"
    assert slurm.describe_end(state, log.read_text()) == (False, reason)


def test_ci_fails_rather_than_skips_without_slurm(tmp_path):
    """CKPT_WATCH_REQUIRE_SLURM=1 (.ci/run): a cluster that cannot start fails the Slurm tests, with its reason."""
    not_a_folder = tmp_path / "state"
    not_a_folder.touch()  # cluster.sh cannot make its state dir here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SLURM_"))}
    env.update(CKPT_WATCH_SLURM_DIR=str(not_a_folder), CKPT_WATCH_REQUIRE_SLURM="1", PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::test_a_job_runs_and_appends_to_its_log"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1, run.stdout
    assert "1 error" in run.stdout and "skipped" not in run.stdout
    assert f"Slurm not available: mkdir: cannot create directory ‘{not_a_folder}’: Not a directory" in run.stdout
