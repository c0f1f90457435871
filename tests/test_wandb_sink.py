"""W&B with the real `wandb` package in offline mode: the rows ckpt-watch writes, read back from the `.wandb` log."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import ckpt_watch, read_journal
from watcher.journal import JournalReader
from watcher.records import Result
from watcher.sinks import SinkUnavailable
from watcher.sinks.naming import STEP_KEY
from watcher.sinks.tensorboard import read_points
from watcher.sinks.wandb_files import find_local_runs, read_records
from watcher.sinks.wandb_run import WandbSink, find_target, parse_setting

QUICK = '[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "probes"\nprobes = ["parameters"]\n'


def logged(results_dir: Path) -> dict[str, list]:
    """Everything ckpt-watch wrote into offline runs under RESULTS_DIR/wandb: run ids, history rows, definitions."""
    found = {"ids": [], "rows": [], "definitions": []}
    for run in find_local_runs(results_dir / "wandb"):
        found["ids"].append(run.id)
        for record in read_records(run.log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                found["rows"].append({k: float(v) for k, v in row.items() if not k.startswith("_")})
            elif kind == "metric":
                metric = record.metric
                found["definitions"].append((metric.name or metric.glob_name, metric.step_metric))
    return found


def _record(step, variant="regular", status="ok", metrics=None):
    return Result(result_id=f"{step}-{variant}", step=step, checkpoint=f"checkpoint-{step}", variant=variant,
                  preset="smoke", status=status,
                  metrics=metrics if metrics is not None else {"mmlu/acc": step / 1000, "routing/gini": 0.25},
                  progress={"train/epoch": step / 100})  # fmt: skip


def test_out_of_order_results_and_both_variants_land_on_the_step_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    waiting = WandbSink("proj/run42", "defer", tmp_path / "output", tmp_path / "results")
    with pytest.raises(SinkUnavailable, match="results wait to be written as one offline run once it has ended"):
        waiting.deliver([_record(500)])  # nothing says the training run has ended: offline results wait too
    sink = WandbSink("proj/run42", "defer", tmp_path / "output", tmp_path / "results", force=True)  # `sync`
    sink.deliver([_record(500), _record(500, "ema"), _record(300, status="failed", metrics={})])
    sink.deliver([_record(200)])  # a later delivery, for an earlier step
    found = logged(tmp_path / "results")
    assert set(found["ids"]) == {"run42"}
    rows = sorted(found["rows"], key=lambda r: (r[STEP_KEY], sorted(r)))
    assert rows == [
        {STEP_KEY: 200, "train/epoch": 2.0, "eval/mmlu/acc": 0.2, "eval/routing/gini": 0.25},
        {STEP_KEY: 500, "train/epoch": 5.0, "eval/mmlu/acc": 0.5, "eval/routing/gini": 0.25},
        {STEP_KEY: 500, "train/epoch": 5.0, "eval_ema/mmlu/acc": 0.5, "eval_ema/routing/gini": 0.25},
    ]  # the failed result draws nothing
    # The complete set of definitions, at every delivery (W&B keeps the last writer's only).
    per_delivery = [(STEP_KEY, ""), ("*", STEP_KEY), ("eval/*", STEP_KEY), ("eval_ema/*", STEP_KEY)]
    assert sorted(found["definitions"]) == sorted(per_delivery * 2)


def test_scan_logs_into_the_trainers_own_offline_run(wandb_run, tmp_path):
    """A real Trainer with the callback and report_to=wandb (offline); `--scan --wandb auto` finds its run."""
    trained, wandb_dir = wandb_run
    output = tmp_path / "output"
    shutil.copytree(trained, output)
    record = output / "ckpt-watch-run.json"  # the copy's record names the copy's TensorBoard dir
    record.write_text(record.read_text().replace(str(trained), str(output)))
    trainer_events = {p: p.read_bytes() for p in (output / "runs").rglob("*tfevents*")}
    [trainer_run] = find_local_runs(wandb_dir / "wandb")
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "quick", "--wandb", "auto",
                     env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    found = logged(output / "ckpt-watch")
    assert set(found["ids"]) == {trainer_run.id} and trainer_run.project == "ckpt-watch-test"
    steps = sorted(row[STEP_KEY] for row in found["rows"])
    assert steps == [4, 6]  # the checkpoints the trainer kept (save_total_limit=2)
    # One offline run for the session's results (not one per checkpoint), and the command that uploads it.
    [ours] = (output / "ckpt-watch" / "wandb").glob("offline-run-*")
    status = ckpt_watch("status", output)
    assert f"wandb sync {trainer_run.log.parent} {ours}" in status.stdout, status.stdout
    assert all(row["eval/params/total"] > 0 and 0 < row["train/epoch"] for row in found["rows"])
    assert read_journal(output, lambda journal: journal.undelivered_count("wandb"), None) == 0
    # TensorBoard: a run of its own next to the trainer's, whose files are untouched.
    points = read_points(output / "runs" / "ckpt-watch-eval")
    assert sorted(step for step, _, row in points if "eval/params/total" in row) == [4, 6]
    assert trainer_events and all(p.read_bytes() == data for p, data in trainer_events.items())


def test_no_network_is_a_wait_not_an_error(tmp_path, monkeypatch):

    for key, value in {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_INIT_TIMEOUT": "2",
                       "HOME": str(tmp_path), "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    sink = WandbSink("proj/run42", "shared", tmp_path / "output", tmp_path / "results")
    with pytest.raises(SinkUnavailable, match="W&B: .*(connection refused|deadline|127.0.0.1:9)"):
        sink.deliver([_record(100)])


def test_results_wait_while_wandb_fails_and_sync_delivers_them(copy_trainer_output, tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": ""}  # no key: W&B refuses at once
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-10")
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    down = {**os.environ, **env, "HOME": str(tmp_path), "WANDB_BASE_URL": "http://127.0.0.1:9"}
    args = ("--config", config, "--preset", "quick", "--wandb", "proj/run42", "--wandb-live", "shared")
    first = ckpt_watch(output, "--scan", *args, env=down)
    assert first.returncode == 0, first.stderr  # the evaluations succeeded; delivery is the outbox's business
    assert "wandb 2" in first.stderr and "ckpt-watch sync" in first.stderr
    assert not (output / "ckpt-watch" / "wandb").exists() or not logged(output / "ckpt-watch")["rows"]
    again = ckpt_watch(output, "--scan", *args, env=down)  # a restart in between: nothing lost, nothing re-run
    assert again.returncode == 0 and "wandb 2" in again.stderr
    assert len(read_journal(output, JournalReader.results, [])) == 2
    still_down = ckpt_watch("sync", output, *args[:1], config, "--wandb", "proj/run42", env=down)
    assert still_down.returncode == 1 and "2 result(s) for wandb" in still_down.stderr
    synced = ckpt_watch("sync", output, "--config", config, "--wandb", "proj/run42",
                        env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    assert sorted(row[STEP_KEY] for row in logged(output / "ckpt-watch")["rows"]) == [20, 30]
    [ours] = (output / "ckpt-watch" / "wandb").glob("offline-run-*")  # one offline run for the sync
    assert f"wandb sync {ours}" in synced.stdout and "upload them with the command above" in synced.stderr
    assert ckpt_watch("sync", output, "--config", config, "--wandb", "proj/run42").returncode == 0  # nothing left


def test_finding_the_run(tmp_path, wandb_run):
    trained, wandb_dir = wandb_run
    [trainer_run] = find_local_runs(wandb_dir / "wandb")
    # 1. the callback's record
    target = find_target("auto", trained, environ={})
    assert (target.id, target.project, target.offline) == (trainer_run.id, "ckpt-watch-test", True)
    assert target.trainer_log == str(trainer_run.log)
    # 2. WANDB_* given to the daemon
    bare = tmp_path / "bare"
    bare.mkdir()
    env = {"WANDB_RUN_ID": "envrun", "WANDB_PROJECT": "p", "WANDB_ENTITY": "team"}
    assert find_target("auto", bare, environ=env).path == "team/p/envrun"
    # 3. the trainer's local wandb/ folder: the id from the run-<id>.wandb file name, not the folder name
    local = tmp_path / "local"
    shutil.copytree(trainer_run.log.parent, local / "wandb" / "offline-run-20260101_000000-renamed")
    found = find_target("auto", local, environ={})
    assert (found.id, found.project) == (trainer_run.id, "ckpt-watch-test")
    assert find_target("auto", bare, environ={}) is None
    assert find_target("team/p/xyz", bare, environ={}).path == "team/p/xyz"
    assert parse_setting("p/xyz") == (None, "p", "xyz")
    with pytest.raises(ValueError):
        parse_setting("just-a-name")


def test_bad_wandb_setting_is_a_one_line_usage_error(tmp_path):
    run = ckpt_watch(tmp_path, "--scan", "--wandb", "a/b/c/d")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "[ENTITY/]PROJECT/RUN_ID" in run.stderr


def test_defer_mode_waits_while_the_training_process_lives(tmp_path, monkeypatch, wandb_run):
    """Online and live: nothing is sent (no second writer); once the trainer is gone, delivery is attempted."""
    import socket
    import subprocess
    import sys

    from watcher.sinks.wandb_run import WandbTarget, training_is_live

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials: an attempt fails at once, without network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    output = tmp_path / "output"
    output.mkdir()
    record = output / "ckpt-watch-run.json"

    def write_record(pid):
        record.write_text(json.dumps({"format": 1, "wandb": {"id": "live1", "project": "p", "mode": "online"},
                                      "pid": pid, "hostname": socket.gethostname(), "state": "running"}))  # fmt: skip

    write_record(os.getpid())  # this process stands for the trainer: alive
    sink = WandbSink("auto", "defer", output, tmp_path / "results")
    with pytest.raises(SinkUnavailable, match=r"may still be written \(the training process \(pid \d+\) is still running"):
        sink.deliver([_record(100)])
    assert not (tmp_path / "results" / "wandb").exists()  # W&B was not even started
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_record(int(gone.stdout))
    with pytest.raises(SinkUnavailable, match="W&B: .*API key"):  # now it tries (and, with no key, fails)
        sink.deliver([_record(100)])
    # The trainer's own log ending with its exit record also says "finished" (the fixture's run has finished).
    trained, wandb_dir = wandb_run
    [trainer_run] = find_local_runs(wandb_dir / "wandb")
    assert training_is_live(WandbTarget("x", "p", None, trainer_log=str(trainer_run.log)))[0] is False
    assert training_is_live(WandbTarget("x", "p", None, offline=True))[0] is None  # nothing can tell


def test_no_run_anywhere_means_no_wandb_said_once(tmp_path, caplog, monkeypatch):
    for name in ("WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    sink = WandbSink("auto", "defer", tmp_path, tmp_path / "results")
    caplog.set_level("INFO", logger="ckpt-watch")
    sink.deliver([_record(10)])
    sink.deliver([_record(20)])  # acknowledged: nothing piles up for a run that does not exist
    assert caplog.text.count("no W&B run found") == 1 and not (tmp_path / "results").exists()
