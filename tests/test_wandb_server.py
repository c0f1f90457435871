"""W&B online, resumed, shared and synced: the real `wandb` client against the stand-in server (tests/wandb_standin.py).

A "trainer" here is a real `wandb` run in a child process that logs `train/loss` at `train/global_step` 1..N
with the metric definitions transformers' WandbCallback makes; ckpt-watch delivers through its real sink.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from watcher.records import Result
from watcher.sinks import SinkUnavailable
from watcher.sinks.naming import STEP_KEY
from watcher.sinks import wandb_run
from watcher.sinks.wandb_run import WandbSink, upload_note

TRAINER = """
import os, sys, time, wandb
run_id, mode, steps, ready, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
settings = wandb.Settings(silent=True, **({"mode": "shared"} if mode == "shared" else {}))
run = wandb.init(project="p", id=run_id, dir=os.environ["TRAINER_DIR"], settings=settings,
                 mode="offline" if mode == "offline" else None)
run.define_metric("train/global_step")
run.define_metric("*", step_metric="train/global_step", step_sync=True)
for step in range(1, steps + 1):
    run.log({"train/global_step": step, "train/loss": 1.0 / step})
    if step == steps // 2 and ready != "-":  # half-way: let the test attach, wait for its go
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)
run.finish()
"""


def trainer(tmp_path: Path, run_id: str, mode: str = "online", steps: int = 6, pause: bool = False):
    """Start the trainer; with `pause`, it stops half-way until `go()` is called. Returns (process, go)."""
    ready, go = tmp_path / f"{run_id}.ready", tmp_path / f"{run_id}.go"
    env = {**os.environ, "TRAINER_DIR": str(tmp_path / "trainer")}
    (tmp_path / "trainer").mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", TRAINER, run_id, mode, str(steps),
                                str(ready) if pause else "-", str(go)], env=env)  # fmt: skip
    if pause:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.05)
    return process, lambda: go.touch()


def record(step: int, variant: str = "regular") -> Result:
    return Result(result_id=f"{step}-{variant}", step=step, checkpoint=f"checkpoint-{step}", variant=variant,
                  preset="smoke", status="ok", metrics={"mmlu/acc": step / 100}, progress={"train/epoch": step / 10})


def eval_steps(rows: list[dict]) -> list[int]:
    return sorted(int(row[STEP_KEY]) for row in rows if "eval/mmlu/acc" in row)


def trainer_rows(rows: list[dict]) -> list[tuple[int, float]]:
    return sorted((int(row[STEP_KEY]), row["train/loss"]) for row in rows if "train/loss" in row)


def test_defer_resumes_the_finished_run_after_an_outage(wandb_online, tmp_path, monkeypatch):
    """The trainer's online run has finished; the results wait while W&B is unreachable, then land in its history
    at train/global_step 2, 4, 6 (delivered as 6, 2, 4), the trainer's rows untouched, the run finished again."""
    server = wandb_online
    process, _ = trainer(tmp_path, "defer1")
    assert process.wait(timeout=120) == 0
    run = server.run("p", "defer1")
    before = [dict(row) for row in run.rows()]
    assert run.state == "finished" and trainer_rows(before) == [(s, 1.0 / s) for s in range(1, 7)]
    config_before, events_before, logs_before = dict(run.config), list(run.events), list(run.logs)

    sink = WandbSink("p/defer1", "defer", tmp_path / "output", tmp_path / "results")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(wandb_run, "API_TIMEOUT", 3.0)
    with pytest.raises(SinkUnavailable, match="W&B API could not say"):
        sink.deliver([record(6), record(2), record(4)])  # defer cannot tell: results wait, nothing sent
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    sink.deliver([record(6), record(2), record(4)])

    assert run.state == "finished" and not run.overwritten
    assert run.history[: len(before)] == before  # the trainer's rows, exactly as they were
    assert eval_steps(run.rows()) == [2, 4, 6]  # each once
    assert len(run.rows()) == len(before) + 3
    assert all(row["train/epoch"] == row[STEP_KEY] / 10 for row in run.rows() if "eval/mmlu/acc" in row)
    user_config = lambda config: {k: v for k, v in config.items() if k != "_wandb"}  # noqa: E731
    assert user_config(run.config) == user_config(config_before)  # nothing of ours in the run's config
    assert (run.events, run.logs) == (events_before, logs_before)  # no system metrics, no console lines of ours
    # After a crash, the outbox asks what the run has (the W&B API's history) before sending again.
    assert sink.holds([record(6), record(2), record(4), record(8)]) == {"6-regular", "2-regular", "4-regular"}


def test_shared_mode_leaves_the_live_run_running(wandb_online, tmp_path):
    """Attached to a live shared-mode run: the rows land, the run stays running until the trainer finishes it,
    no trainer row is overwritten; `defer` meanwhile asks the W&B API and waits."""
    server = wandb_online
    process, go = trainer(tmp_path, "shared1", mode="shared", steps=8, pause=True)
    try:
        with pytest.raises(SinkUnavailable, match="the W&B API says the run is running"):
            WandbSink("p/shared1", "defer", tmp_path / "o", tmp_path / "r").deliver([record(2)])
        WandbSink("p/shared1", "shared", tmp_path / "output", tmp_path / "results").deliver([record(4), record(2)])
        run = server.run("p", "shared1")
        assert run.state == "running" and run.finished_by is None
        assert eval_steps(run.rows()) == [2, 4]
    finally:
        go()
        assert process.wait(timeout=120) == 0
    assert run.state == "finished"
    [ours] = {who for row, who in zip(run.history, run.history_writers) if row and "eval/mmlu/acc" in row}
    assert run.finished_by != ours and trainer_rows(run.rows_by(run.finished_by)) == [(s, 1.0 / s) for s in range(1, 9)]
    assert not run.overwritten and eval_steps(run.rows()) == [2, 4]
    assert not any("ckpt-watch" in str(line) for line in run.events + run.logs)  # no stats or console of ours


def test_wandb_sync_of_the_trainers_and_ckpt_watchs_offline_runs_in_either_order(wandb_online, tmp_path, monkeypatch):
    """Offline trainer, offline ckpt-watch (two deliveries: two offline runs); then the `wandb sync` command that
    `ckpt-watch sync`/`status` print (the trainer's run first), and the reverse order by hand."""
    server = wandb_online
    monkeypatch.setenv("WANDB_MODE", "offline")
    process, _ = trainer(tmp_path, "off1", mode="offline")
    assert process.wait(timeout=120) == 0
    sink = WandbSink("auto", "defer", tmp_path / "trainer", tmp_path / "results")  # finds the trainer's wandb/ run
    sink.deliver([record(4), record(2)])
    sink.deliver([record(6)])  # a later delivery
    monkeypatch.setenv("WANDB_MODE", "online")
    trainer_dirs = sorted(str(p) for p in (tmp_path / "trainer" / "wandb").glob("offline-run-*"))
    our_dirs = sorted(str(p) for p in (tmp_path / "results" / "wandb").glob("offline-run-*"))
    note = upload_note("auto", tmp_path / "trainer", tmp_path / "results")
    command = note.splitlines()[-1].split()
    assert command == ["wandb", "sync", *trainer_dirs, *our_dirs], note
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    again = ["wandb", "sync", "--include-synced", "-p", "ours-first"]  # the same folders into another project
    orders = {"p": [command],  # exactly as printed: one command, into the run's own project
              "ours-first": [[*again, *our_dirs], [*again, *trainer_dirs]]}
    for project, commands in orders.items():
        for argv in commands:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
        run = server.run(project, "off1")
        assert trainer_rows(run.rows()) == [(s, 1.0 / s) for s in range(1, 7)], project
        assert eval_steps(run.rows()) == [2, 4, 6], project  # each once, at its train/global_step
        assert len(run.rows()) == 9 and not run.overwritten and run.state == "finished", project
    assert upload_note("auto", tmp_path / "trainer", tmp_path / "results") is None  # all uploaded: nothing to say


def test_shared_mode_warns_at_start_naming_the_wandb_issue(tmp_path, caplog):
    caplog.set_level("WARNING", logger="ckpt-watch")
    WandbSink("p/x", "defer", tmp_path, tmp_path / "r")
    assert not caplog.records
    WandbSink("p/x", "shared", tmp_path, tmp_path / "r")
    assert "wandb/wandb#12269" in caplog.text and '"defer"' in caplog.text


def test_resume_allow_and_resume_must_of_a_run_that_does_not_exist(wandb_online, tmp_path):
    """The stand-in answers `resume="allow"` (a new run, then the same run again) as the client expects, and
    ckpt-watch's `resume="must"` of a run the server does not have is a pending delivery, not an error."""
    code = ("import wandb\n"
            "for step in (1, 2):  # a new run, then the same one again\n"
            "    run = wandb.init(project='p', id='allow1', resume='allow', settings=wandb.Settings(silent=True))\n"
            "    run.log({'train/global_step': step, 'x': 1.0}); run.finish()\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)
    run = wandb_online.run("p", "allow1")
    assert [row[STEP_KEY] for row in run.rows()] == [1, 2] and [row["_step"] for row in run.rows()] == [0, 1]
    sink = WandbSink("p/nosuch", "defer", tmp_path / "o", tmp_path / "r", force=True)
    with pytest.raises(SinkUnavailable, match="W&B: .*(does not exist|not found)"):
        sink.deliver([record(2)])
