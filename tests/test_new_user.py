"""A new user's first hour (issue 17): the wrong folder, relative script paths, what a failing script printed,
a daemon started before training, the demo's leftovers, compare's usage, and the small things around them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ckpt_watch, journal_jobs, results, wait_for

QUICK = ('wandb = "off"\ntensorboard = "off"\npreset = "quick"\n'
         '[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "probes"\nprobes = ["parameters"]\n')  # fmt: skip


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


# --- 1. the wrong folder -----------------------------------------------------------------------------------


def test_a_checkpoint_folder_is_refused_and_nothing_is_created_in_it(copy_trainer_output):
    output = copy_trainer_output()
    before = tree(output)
    checkpoint = output / "checkpoint-10"
    for target, args in [(checkpoint, ["--scan"]), (checkpoint, []), (checkpoint / "sub", [])]:
        line = one_line_error(ckpt_watch(target, *args, "-q", timeout=60))
        assert "looks like a checkpoint" in line and f"ckpt-watch {output}" in line, line
    # The same checkpoint's files under a name that does not match the pattern: still a checkpoint.
    final = output.parent / "final-model"
    shutil.copytree(checkpoint, final)
    line = one_line_error(ckpt_watch(final, "--scan", timeout=60))
    assert "looks like a checkpoint" in line and "trainer_state.json" in line, line
    assert tree(output) == before and not (final / "ckpt-watch").exists()


def test_the_folder_above_the_run_is_refused_naming_the_run(copy_trainer_output, tmp_path):
    output = copy_trainer_output()  # tmp_path/output
    before = tree(tmp_path)
    for args in (["--scan"], []):
        line = one_line_error(ckpt_watch(tmp_path, *args, timeout=60))
        assert "holds no checkpoint folder" in line and f"ckpt-watch {output}" in line, line
    assert tree(tmp_path) == before


def test_an_empty_folder_scan_creates_nothing_and_the_start_line_says_where_results_go(copy_trainer_output, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = ckpt_watch(empty, "--scan", timeout=60)
    assert run.returncode == 0 and "nothing to do" in run.stderr, run.stderr
    assert tree(empty) == set()
    output = copy_trainer_output()
    for name in ("checkpoint-10", "checkpoint-20"):
        shutil.rmtree(output / name)  # one job is enough for the start line
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    run = ckpt_watch(output, "--scan", "--config", config)
    assert run.returncode == 0, run.stderr
    first = run.stderr.splitlines()[0]  # announced before anything else happens
    assert first.split()[2] == "ckpt-watch" and f"results in {output / 'ckpt-watch'}" in first, first


# --- 2, 3 and 9: the command backend from a config file ---------------------------------------------------------

MY_EVAL = """
import json, sys
step = int(sys.argv[1])
if step == 10:
    print(json.dumps({"aaa": 1, "aab": 2, "task": {"acc": 0.5, "acc_norm": 0.25}}))
elif step == 20:
    print({"acc": 0.5})  # a Python dict, not JSON
    print("a warning on stderr", file=sys.stderr)
else:
    open("/nonexistent/data.txt")  # FileNotFoundError: will not get better on a retry
"""


def test_relative_script_paths_garbage_output_and_missing_files(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "my_eval.py").write_text(MY_EVAL)
    config = configs / "watch.toml"
    # retry_backoff 600: a retried deterministic failure would hold the scan for ten minutes (the test times out).
    config.write_text('wandb = "off"\ntensorboard = "off"\npreset = "mine"\nmax_attempts = 3\nretry_backoff = 600\n'
                      '[presets.mine]\n[[presets.mine.evaluators]]\nbackend = "command"\n'
                      f'command = [{json.dumps(sys.executable)}, "my_eval.py", "{{step}}"]\n')  # fmt: skip
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    run = ckpt_watch(output, "--scan", "--config", config, cwd=elsewhere, timeout=180)
    assert run.returncode == 1, run.stderr
    by_step = {r["step"]: r for r in results(output)}
    assert by_step[10]["status"] == "ok" and by_step[10]["metrics"]["task/acc"] == 0.5
    # 9: the "done" line shows the headline metric, not the first names alphabetically.
    done = next(line for line in run.stderr.splitlines() if "checkpoint-10/regular/mine done" in line)
    assert "task/acc=0.5" in done and "aaa" not in done, done
    # 3: what the script printed is in the error, and both its streams are in the job's log.
    assert "printed no JSON object" in by_step[20]["error"] and "it printed: {'acc': 0.5}" in by_step[20]["error"]
    log = (output / "ckpt-watch" / by_step[20]["log"]).read_text()
    assert "{'acc': 0.5}" in log and "a warning on stderr" in log
    # 2: a missing file fails for good at once: one attempt.
    assert by_step[30]["status"] == "failed" and "No such file or directory" in by_step[30]["error"]
    attempts = {job.checkpoint.step: job.attempts for job in journal_jobs(output)}
    assert attempts == {10: 1, 20: 1, 30: 1}
    # 9: a finished scan ends with a summary.
    summary = run.stderr.strip().splitlines()[-1]
    assert "scan done: 3 job(s) evaluated, 2 failed" in summary and str(output / "ckpt-watch") in summary, summary


def test_which_command_arguments_are_paths_relative_to_the_config():
    from watcher.evaluators.command import resolve_command_paths

    given = ["python", "my_eval.py", "{model_dir}", "--step", "{step}", "data/x.jsonl", "-m", "pkg", "/abs/s.py"]
    assert resolve_command_paths(Path("/cfg"), given) == [
        "python", "/cfg/my_eval.py", "{model_dir}", "--step", "{step}", "/cfg/data/x.jsonl", "-m", "pkg", "/abs/s.py"]


def test_a_missing_script_is_a_config_error_at_start(tmp_path):
    config = tmp_path / "watch.toml"
    config.write_text('[presets.mine]\n[[presets.mine.evaluators]]\nbackend = "command"\n'
                      'command = ["python", "scripts/nope.py", "{model_dir}"]\n')  # fmt: skip
    line = one_line_error(ckpt_watch(tmp_path, "--scan", "--config", config, "--preset", "mine", timeout=60))
    assert f"script not found: {tmp_path / 'scripts' / 'nope.py'}" in line, line
    assert not (tmp_path / "ckpt-watch").exists()


# --- 5. a daemon started before training creates its output dir -----------------------------------------------------


def test_the_daemon_waits_for_the_output_dir_and_tells_systemd_it_is_ready(trainer_output, tmp_path):
    output = tmp_path / "run" / "output"
    config = tmp_path / "c.toml"
    config.write_text(QUICK)
    notify = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.settimeout(60)
    log = tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    with open(log, "wb") as handle:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--config", str(config),
                                   "--log-format", "plain"], stdout=handle, stderr=subprocess.STDOUT,
                                  env={**env, "NOTIFY_SOCKET": str(notify)})  # fmt: skip
    try:
        message = server.recv(4096).decode()
        assert "READY=1" in message and f"waiting for {output}" in message, message
        wait_for(lambda: "waiting for" in log.read_text(), 30, what="the waiting line")
        time.sleep(1.5)
        assert daemon.poll() is None and not output.parent.exists()  # waits, and creates nothing
        shutil.copytree(trainer_output, output)
        wait_for(lambda: len(results(output)) == 3 if (output / "ckpt-watch").exists() else False, 120,
                 what="three results")  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        server.close()
    text = log.read_text()
    assert code == 0, text
    assert text.count("waiting for") == 1 and "Traceback" not in text


def test_a_daemon_stopped_while_waiting_exits_0(tmp_path):
    log = tmp_path / "daemon.log"
    with open(log, "wb") as handle:
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(tmp_path / "later"), "--log-format", "plain"],
                                  stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip
    wait_for(lambda: "waiting for" in log.read_text(), 60, what="the waiting line")
    daemon.send_signal(signal.SIGHUP)  # `systemctl reload` while waiting: not the end of it
    time.sleep(1)
    assert daemon.poll() is None, log.read_text()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, log.read_text()
    assert not (tmp_path / "later").exists()


# --- 4. the demo ----------------------------------------------------------------------------------------------


def test_the_demo_keeps_its_run_and_says_how_to_look_at_it(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "watcher", "demo", "--steps", "10", "--save-steps", "10",
                          "--step-delay", "0", "--log-format", "plain"], capture_output=True, text=True, timeout=240,
                         env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (kept,) = tmp_path.glob("ckpt-watch-demo-*")
    assert f"The run is kept in {kept}" in run.stdout
    for command in (f"ckpt-watch status {kept}", f"ckpt-watch plot {kept}", f"tensorboard --logdir {kept / 'runs'}"):
        assert command in run.stdout, run.stdout
    assert list((kept / "runs" / "ckpt-watch-eval").glob("events.out.tfevents.*"))
    assert results(kept)[0]["status"] == "ok"
    status = subprocess.run([sys.executable, "-m", "watcher", "status", str(kept)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert status.returncode == 0 and "checkpoint-10" in status.stdout


def test_the_demo_names_compare_with_its_first_and_last_step():
    from watcher.cli.demo import next_steps

    text = next_steps(Path("/r"), [10, 20, 30])
    assert "ckpt-watch compare /r 10 30" in text and "ckpt-watch status /r" in text


# --- 4 and 9: the live view ----------------------------------------------------------------------------------------


def _parts(renderable):
    """Every renderable nested in rich Groups and Tables."""
    yield renderable
    for child in getattr(renderable, "renderables", []):
        yield from _parts(child)
    for column in getattr(renderable, "columns", []):
        for cell in column._cells:
            yield from _parts(cell)


def _text(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, color_system=None, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


def test_the_live_view_says_what_it_waits_for_and_never_shows_a_full_bar_at_a_job_start():
    from rich.progress_bar import ProgressBar

    from watcher.live_view import ResultRow, RunningView, Snapshot, render

    base = dict(output_dir="/o", mode="inotify", preset="smoke", policy="all", device="cpu")
    assert "waiting for the first checkpoint" in _text(render(Snapshot(**base)))
    training = Snapshot(**base, idle_text="training is running (train.log); waiting for its next checkpoint")
    assert "training is running" in _text(render(training))
    done = ResultRow(step=10, checkpoint="checkpoint-10", variant="regular", preset="smoke", status="ok", walltime_s=1)
    assert "waiting for the next checkpoint" in _text(render(Snapshot(**base, results=[done])))
    # A bar only for a measured fraction, never rich's pulsing "unknown" bar (drawn across its whole width), and
    # none for a single evaluator step (0 % until it is done): a spinner says "busy" instead.
    for job, expect_bar in ((RunningView("checkpoint-10", "regular", "smoke", "cpu", "preparing", time.time()), False),
                            (RunningView("c", "regular", "smoke", "cpu", "evaluating", time.time(), step=1, steps=1,
                                         backend="x"), False),
                            (RunningView("c", "regular", "smoke", "cpu", "evaluating", time.time(), step=1, steps=2,
                                         backend="x"), True)):  # fmt: skip
        bars = [p for p in _parts(render(Snapshot(**base, running=[job]))) if isinstance(p, ProgressBar)]
        assert len(bars) == expect_bar and all(b.total is not None and b.completed < b.total for b in bars), job
    waiting = Snapshot(**base, undelivered={"wandb": 1}, undelivered_why={"wandb": "the training run is still running"})
    text = _text(render(waiting))
    assert "wandb 1 result(s) (the training run is still running)" in text and "ckpt-watch sync" in text


def test_status_explains_results_waiting_for_delivery(tmp_path, capsys):
    from watcher.cli.status import ROW_KEYS, print_table

    row = dict.fromkeys(ROW_KEYS)
    row.update(checkpoint="checkpoint-10", step=10, generation=1, checkpoint_gone=False, variant="regular",
               preset="smoke", state="done", attempts=1, walltime_s=1.0, pending_sinks=["wandb"], metrics={})
    print_table([row], tmp_path)
    shown = capsys.readouterr().out
    assert "results waiting for delivery: wandb 1" in shown
    assert "training run has finished" in shown and "ckpt-watch sync" in shown, shown


# --- 8. compare --------------------------------------------------------------------------------------------------


def _compare(*args):
    return subprocess.run([sys.executable, "-m", "watcher", "compare", *map(str, args)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_compare_usage_noise_groups_and_config(tmp_path):
    from watcher.cli.compare import compare
    from watcher.metrics import group_of
    from watcher.records import Result

    output = tmp_path / "output"
    output.mkdir()
    line = one_line_error(_compare(output, 10))
    assert "give it two steps" in line and "Is a directory" not in line, line
    a, b = (Result(result_id=f"r{s}", step=s, checkpoint=f"checkpoint-{s}", variant="regular", preset="mine",
                   status="ok", metrics={"t/acc": v, "t/acc_stderr": 0.03, "u/acc": v, "u/acc_stderr": 0.01})
            for s, v in ((10, 0.50), (20, 0.55)))  # fmt: skip
    rows = {r["metric"]: r for r in compare(a, b)}
    # z-test at 0.05: t: z = 0.05 / 0.042 = 1.18, p = 0.24 (noise); u: z = 0.05 / 0.014 = 3.54, p = 0.0004.
    assert rows["t/acc"]["better"] == "~" and rows["u/acc"]["better"] == "B"
    assert group_of("ckpt_watch_smoke_ppl/word_perplexity") == "perplexity" and group_of("t/acc") == "accuracy"
    helps = _compare("--help").stdout
    for flag in ("--variant", "--preset", "--config"):
        described = helps.split(flag, 1)[1].split("\n  -", 1)[0]
        assert len(described.split()) > 3, (flag, described)
    # --config: the results dir and preset come from the daemon's config file.
    results_dir = tmp_path / "elsewhere"
    results_dir.mkdir()
    records = [Result(result_id=f"r{s}", step=s, checkpoint=f"checkpoint-{s}", variant="regular", preset="mine",
                      status="ok", metrics={"t/acc": a}) for s, a in ((10, 0.25), (20, 0.75))]  # fmt: skip
    (results_dir / "results.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    config = tmp_path / "c.toml"
    config.write_text('results_dir = "elsewhere"\npreset = "mine"\n')
    run = _compare(output, 10, 20, "--config", config, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows"][0]["better"] == "B"


# --- 9. the rest -------------------------------------------------------------------------------------------------


def test_merge_help_explains_its_argument_and_sizes():
    helps = subprocess.run([sys.executable, "-m", "watcher", "merge", "--help"], capture_output=True, text=True,
                           timeout=60).stdout  # fmt: skip
    assert "CKPT_DIR is one checkpoint folder" in helps and "500MB" in helps and "GiB" in helps


def test_tensorboard_is_an_extra():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("tensorboard") for dep in project["optional-dependencies"]["tensorboard"])


def test_the_decisions_demo_keeps_the_best_alerts_stops_and_compares(tmp_path):
    """`ckpt-watch demo --decisions`: the README's reproduction of issue 16's whole story on the CPU."""
    from watcher.sinks.wandb_files import alert_records

    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "watcher", "demo", "--decisions", "--output-dir", str(out),
                          "--log-format", "plain"], capture_output=True, text=True, timeout=400)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    records = [r for r in results(out) if r["status"] == "ok"]
    by_acc = sorted(records, key=lambda r: (-r["metrics"]["ckpt_watch_smoke_mc/acc"], r["step"]))
    kept = out / "ckpt-watch" / "best" / "ckpt_watch_smoke_mc" / "acc"
    assert sorted(p.name for p in kept.iterdir()) == sorted(r["checkpoint"] for r in by_acc[:3])
    assert len(list(out.glob("checkpoint-*"))) <= 2  # the trainer's rotation; best/ outlived it
    assert all((kept / r["checkpoint"] / "model.safetensors").is_file() for r in by_acc[:3])
    # The tiny run is deterministic: accuracy stays below its best for two checkpoints in a row at some point.
    alerts = [json.loads(line) for line in (out / "ckpt-watch" / "alerts.jsonl").read_text().splitlines()]
    assert alerts and alerts[0]["rule"] == "accuracy-regression", alerts
    assert (out / "ckpt-watch-stop.json").is_file()
    assert [a["title"] for f in out.rglob("*.wandb") for a in alert_records(f)] == \
        [f"ckpt-watch: {alerts[0]['checkpoint']}: accuracy-regression"]
    assert "is the difference real, or noise?" in run.stdout and "p < 0.05" in run.stdout, run.stdout
    assert "wandb sync" in run.stdout
