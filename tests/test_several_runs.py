"""One daemon, several training runs: each keeps its own results dir and journal, the pool is shared, runs take
turns for slots, and under runs_root a run is watched from the moment its first checkpoint folder appears."""

import json
import re
import shutil
import signal
from pathlib import Path

from helpers import ckpt_watch, job_states, results, sleep_preset_config, start_daemon, wait_for


def _config(tmp_path, body: str) -> Path:
    return sleep_preset_config(tmp_path, "cmd", 0.5, body)


def _started(log_text: str) -> list[str]:
    """The run of each "started" line, in order."""
    return re.findall(r"\[(\w+)\] started checkpoint-", log_text)


def test_two_runs_in_one_scan_keep_their_own_results_and_take_turns(trainer_output, tmp_path):
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    for run in (alpha, beta):
        shutil.copytree(trainer_output, run)
    config = _config(tmp_path, "")
    scan = ckpt_watch(alpha, beta, "--scan", "--config", config)
    assert scan.returncode == 0, scan.stderr
    for run in (alpha, beta):
        rows = results(run)  # each run's own RESULTS_DIR/results.jsonl
        assert sorted(r["step"] for r in rows) == [10, 20, 30] and all(r["status"] == "ok" for r in rows)
        assert set(job_states(run).values()) == {"done"}
    # One slot, two runs at equal priority: they alternate (oldest first within each).
    order = _started(scan.stderr)
    assert order == ["alpha", "beta"] * 3, scan.stderr
    assert "[alpha] scan done: 3 job(s) evaluated" in scan.stderr and "[beta] scan done" in scan.stderr
    # `status` of a config naming both runs shows each; with --json, rows by run name.
    config = sleep_preset_config(tmp_path, "cmd", 0.5, f'output_dir = ["{alpha}", "{beta}"]\n')
    both = ckpt_watch("status", "--config", config)
    assert both.returncode == 0, both.stderr
    assert f"== run alpha ({alpha})" in both.stdout and f"== run beta ({beta})" in both.stdout
    by_run = json.loads(ckpt_watch("status", "--config", config, "--json").stdout)
    assert {name: len(rows) for name, rows in by_run.items()} == {"alpha": 3, "beta": 3}
    one = ckpt_watch("status", beta, "--config", config)  # a run named on the command line: that one only
    assert one.returncode == 0 and "== run" not in one.stdout and "beta" in one.stdout


def test_two_runs_with_the_same_folder_name_are_refused(trainer_output, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    first.mkdir()
    second.mkdir()
    refused = ckpt_watch(first, second, "--scan")
    assert refused.returncode == 2 and "two runs named 'run'" in refused.stderr and "Traceback" not in refused.stderr


def test_runs_root_finds_a_run_when_its_first_checkpoint_appears(trainer_output, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(trainer_output, root / "first")
    (root / "not-a-run-yet").mkdir()  # no checkpoint folder: not watched (and nothing created in it)
    config = _config(tmp_path, "cpu_jobs = 2\n")
    log = tmp_path / "daemon.log"
    daemon = start_daemon(log, "--runs-root", root, "--config", config)
    try:
        wait_for(lambda: len(results(root / "first")) == 3, 120, what="the first run's results")
        assert not (root / "not-a-run-yet" / "ckpt-watch").exists()
        shutil.copytree(trainer_output, tmp_path / "second")
        (tmp_path / "second").rename(root / "second")  # a new run appears, checkpoints and all
        wait_for(lambda: len(results(root / "second")) == 3, 120, what="the new run's results")
        assert "new run second: watching it" in log.read_text()
        status = ckpt_watch("status", root / "second")
        assert status.returncode == 0 and status.stdout.count("done") >= 3, status.stdout
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert len(results(root / "first")) == 3  # nothing repeated for the first run meanwhile
