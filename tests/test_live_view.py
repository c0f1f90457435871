"""Log formats (plain, json, journald) and the live view, the latter checked in a real terminal: tmux's pane."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import ckpt_watch, job_states
from merge import merge_checkpoint
from merge.writer import ByteProgress

QUICK = ('wandb = "off"\ntensorboard = "off"\npreset = "quick"\n'
         '[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "probes"\nprobes = ["parameters"]\n')  # fmt: skip
ANSI = re.compile(r"\x1b[\[\]()#;?0-9A-Za-z]")
PLAIN_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")


def test_plain_and_json_logs_when_output_is_not_a_terminal(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    plain = ckpt_watch(output, "--config", config, "--scan", env=env)  # auto, stdout a pipe: plain
    assert plain.returncode == 0, plain.stderr
    assert "\x1b" not in plain.stdout + plain.stderr
    lines = plain.stderr.splitlines()
    assert all(PLAIN_LINE.match(line) for line in lines), lines  # one line per record, each stamped
    assert sum(" done in " in line for line in lines) == 3

    as_json = ckpt_watch(output, "--config", config, "--scan", "--log-format", "json", "-v", env=env)
    assert as_json.returncode == 0, as_json.stderr
    records = [json.loads(line) for line in as_json.stderr.splitlines()]
    assert records and all({"time", "level", "message"} <= r.keys() for r in records)
    assert any(r["message"].startswith("ckpt-watch ") and r["level"] == "INFO" for r in records)
    assert "\x1b" not in as_json.stdout + as_json.stderr

    # stderr connected to journald (JOURNAL_STREAM names it): no timestamp, a <N> priority prefix instead.
    log = tmp_path / "journal.log"
    with open(log, "wb") as handle:
        stat = os.fstat(handle.fileno())
        done = subprocess.run([sys.executable, "-m", "watcher", str(output), "--config", str(config), "--scan"],
                              stdout=subprocess.DEVNULL, stderr=handle, timeout=120,
                              env={**env, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})  # fmt: skip
    assert done.returncode == 0
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"^<[2-7]>(INFO|WARNING|ERROR|DEBUG) +\S", line) for line in lines), lines


def test_merge_progress_reports_bytes_up_to_a_final_done_equal_to_total(tiny_model_dir, tmp_path, monkeypatch):
    reports: list[tuple[int, int]] = []
    out = merge_checkpoint(tiny_model_dir, tmp_path / "merged", max_shard_bytes=150_000,
                           progress=ByteProgress(lambda done, total: reports.append((done, total)), interval=0.0))  # fmt: skip
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert len(reports) > 2 and all(a[0] <= b[0] for a, b in zip(reports, reports[1:]))
    # The same through the worker's path (prepare_model), throttled: still ends with done == total.
    import watcher.prepare

    monkeypatch.setattr(watcher.prepare, "is_consolidated", lambda path: False)  # merge it anyway
    reports.clear()
    model, merged = watcher.prepare.prepare_model(tiny_model_dir, "regular", tmp_path / "work",
                                                  progress=lambda done, total: reports.append((done, total)))  # fmt: skip
    assert merged and reports[-1] == (total, total) and reports[0] == (0, total)


def test_status_pipe_progress_and_bare_stage_lines(tmp_path):
    from watcher.jobs import RunningJob

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    running = RunningJob(None, None, read_fd, None, 60, None)  # only the pipe is used here
    os.write(write_fd, b'{"stage": "preparing"}\n{"stage": "preparing", "done": 5, "total": 10}\nnot json\n')
    assert running.new_stages() == ["preparing"] and running.progress == {"done": 5, "total": 10}
    os.write(write_fd, b'{"stage": "evaluating", "step": 1, "steps": 2, "backend": "probes"}\n{"stage": "eval')
    assert running.new_stages() == ["evaluating"] and running.progress["backend"] == "probes"
    os.write(write_fd, b'uating", "step": 2, "steps": 2, "backend": "command"}\n{"stage": "evaluating"}\n')
    assert running.new_stages() == [] and running.stage == "evaluating" and running.progress == {}
    os.close(write_fd)
    os.close(read_fd)


def exit_status(pid: int, pane: str) -> int | None:
    """The pane's process's exit status: from tmux's "Pane is dead (status N" line, or, as tmux 3.3 at times marks
    the pane dead without reaping the process, from the zombie's /proc stat (field 52, exit_code, waitpid form)."""
    found = re.search(r"Pane is dead \(status (\d+)", pane)
    if found:
        return int(found.group(1))
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[49]) >> 8 if fields[0] == "Z" else None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_live_view_in_a_terminal(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    script = tmp_path / "slow.py"
    script.write_text("import json, time\ntime.sleep(2.5)\nprint(json.dumps({'slow/score': 0.5}))\n")
    config = tmp_path / "c.toml"
    config.write_text(QUICK + f'[[presets.quick.evaluators]]\nbackend = "command"\n'
                              f'command = ["{sys.executable}", "{script}"]\n')  # fmt: skip
    socket, session = f"ckpt-watch-test-{uuid.uuid4().hex[:8]}", "live"
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g remain-on-exit on\nset -g history-limit 1000\n")
    env = [f"{k}={os.environ[k]}" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                                            "TOKENIZERS_PARALLELISM", "PATH", "HOME") if k in os.environ]  # fmt: skip
    # Under systemd (or with a stale COLUMNS exported) the view would be plain or 80 wide: like a login shell.
    command = f"exec env -u JOURNAL_STREAM -u INVOCATION_ID -u COLUMNS -u LINES {sys.executable} -m watcher {output} --config {config}"

    def tmux(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", socket, "-f", str(conf), *args], capture_output=True, text=True,
                              timeout=20)  # fmt: skip

    def pane() -> str:
        return tmux("capture-pane", "-p", "-t", session).stdout

    seen: dict[str, str] = {}

    def until(key: str, predicate, timeout: float, what: str) -> None:
        """Capture the pane every 0.2 s until `predicate(text)` holds; keep that capture as seen[key]."""
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            text = pane()
            if predicate(text):
                seen[key] = text
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; the pane:\n{text}")

    pid = None
    started = tmux("new-session", "-d", "-x", "160", "-y", "50", "-s", session, "-c", str(tmp_path),
                   *[arg for item in env for arg in ("-e", item)], command)  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        pid = int(tmux("display-message", "-p", "-t", session, "#{pane_pid}").stdout)
        until("header", lambda t: f"watching {output} (inotify)" in t, 30, "the header")
        running = re.compile(r"running +checkpoint-\d+/regular +evaluating .* step 2 of 2: command +\d+ s")
        until("running", running.search, 60, "a running job in the view")
        table = re.compile(r"│ +(10|20|30) │ regular │ ok +│ .*0\.5 ")
        until("results", lambda t: len({m.group(1) for m in table.finditer(t)}) == 3 and "nothing (idle)" in t, 90,
              "three results in the table")  # fmt: skip
        assert set(job_states(output).values()) == {"done"}
        assert "Traceback" not in seen["results"]
        tmux("send-keys", "-t", session, "C-c")
        until("exited", lambda t: exit_status(pid, t) is not None, 30, "the daemon to exit")
        final = seen["exited"]  # remain-on-exit keeps the pane
        assert exit_status(pid, final) == 0, final
        assert "received SIGINT" in final
        if os.environ.get("CKPT_WATCH_SHOW_PANE"):
            print("\n" + seen["running"] + "\n" + final)
    finally:
        tmux("kill-server")  # its SIGHUP would only make the daemon reload: end it by its pid
        if pid is not None and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def test_the_view_of_a_pool_shows_each_job_its_slot_busy_gpus_why_jobs_wait_and_several_runs():
    """Render a snapshot of two runs sharing a pool of three GPUs, one used by another process."""
    from rich.console import Console

    from watcher.live_view import ResultRow, RunningView, Snapshot, render
    from watcher.view_feed import merge_snapshots

    header = Snapshot("2 runs: alpha, beta", "inotify", "quick, full", "latest", "cuda:1,2,3")
    alpha = replace(header, queue=[("checkpoint-30", "regular", "full")],
                    results=[ResultRow(10, "checkpoint-10", "regular", "quick", "ok", 2.0, {"m/acc": 0.5})],
                    headlines=["m/acc"], undelivered={"files": 1})  # fmt: skip
    beta = replace(header, queue=[("checkpoint-5", "regular", "quick")],
                   results=[ResultRow(5, "checkpoint-5", "regular", "quick", "ok", 3.0, {"m/acc": 0.25})],
                   headlines=["m/acc"], undelivered={"files": 2})  # fmt: skip
    merged = merge_snapshots(header, [alpha, beta], ["alpha", "beta"])
    assert merged.undelivered == {"files": 3} and [r.run for r in merged.results] == ["alpha", "beta"]
    snapshot = replace(merged, running=[
        RunningView("alpha/checkpoint-20", "regular", "quick", "cuda:1", "evaluating", 90.0, step=1, steps=2,
                    backend="probes"),
        RunningView("beta/checkpoint-4", "regular", "full", "cuda:3", "preparing", 95.0)],
        slots=[("cuda:1", None), ("cuda:2", "30000 of 81000 MiB used by another process"), ("cuda:3", None)],
        waiting=["alpha/checkpoint-30/regular/full: no free slot: needs 1 GPU, none free"])  # fmt: skip
    console = Console(width=160, record=True)
    console.print(render(snapshot, now=100.0))
    text = console.export_text()
    assert re.search(r"running +cuda:1 +alpha/checkpoint-20/regular +evaluating .*step 1 of 2: probes +10 s", text), text
    assert re.search(r"running +cuda:3 +beta/checkpoint-4/regular +preparing", text), text
    assert re.search(r"not offered +cuda:2: 30000 of 81000 MiB used by another process", text), text
    assert re.search(r"queue +2: alpha/checkpoint-30/regular/full, beta/checkpoint-5/regular/quick", text), text
    assert re.search(r"waiting +alpha/checkpoint-30/regular/full: no free slot", text), text
    assert re.search(r"alpha +│ +10 .*0\.5", text) and re.search(r"beta +│ +5 .*0\.25", text), text
    assert "schedule" in text and "quick, full" in text
