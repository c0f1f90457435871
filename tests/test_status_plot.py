"""`ckpt-watch status` and `ckpt-watch plot` on the results of a real `--scan` over three Trainer checkpoints."""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import sys
import uuid
from dataclasses import replace

import pytest

from helpers import ckpt_watch
from watcher.records import Result
from watcher.sinks import FileSink, read_results
from watcher.cli.status import ROW_KEYS
from watcher.metrics import headline_metrics

# A stand-in benchmark whose scores move with the step (the perplexity probe would too, but takes seconds per
# checkpoint); with "fail" it crashes on checkpoint-20.
SCRIPT = """
import json, sys
step = int(sys.argv[1])
if sys.argv[2:] == ["fail"] and step == 20:
    raise SystemExit("boom at step 20")
print(json.dumps({"mc": {"acc": 0.25 + step / 100, "acc_norm": 0.2 + step / 100, "acc_stderr": 0.01},
                  "wiki": {"word_perplexity": 300.0 / step, "bits_per_byte": 3.0 - step / 20}}))
"""


@pytest.fixture(scope="module")
def scanned(trainer_output, tmp_path_factory):
    """checkpoint-10/20/30 evaluated with presets `quick` (all done) and `flaky` (checkpoint-20 fails), plus
    EMA results for `quick` (the plot reads results.jsonl; a real EMA run needs a slow hf-fsdp checkpoint)."""
    root = tmp_path_factory.mktemp("status-plot")
    output = root / "output"
    shutil.copytree(trainer_output, output)
    script = root / "bench.py"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), "{step}"]
    config = root / "c.toml"
    config.write_text(
        "max_attempts = 1\n"
        '[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "probes"\nprobes = ["parameters"]\n'
        f'[[presets.quick.evaluators]]\nbackend = "command"\ncommand = {json.dumps(command)}\n'
        f'[presets.flaky]\n[[presets.flaky.evaluators]]\nbackend = "command"\n'
        f'command = {json.dumps(command + ["fail"])}\n'
    )  # fmt: skip
    assert (run := ckpt_watch(output, "--scan", "--config", config, "--preset", "quick")).returncode == 0, run.stderr
    assert ckpt_watch(output, "--scan", "--config", config, "--preset", "flaky").returncode == 1  # one job failed
    results_dir = output / "ckpt-watch"
    ema = [replace(r, variant="ema", result_id=uuid.uuid4().hex, metrics={**r.metrics, "mc/acc": r.metrics["mc/acc"] + 0.05})
           for r in read_results(results_dir) if r.preset == "quick"]  # fmt: skip
    FileSink(results_dir).deliver(ema)
    return output


def status(*args):
    return ckpt_watch("status", *args, timeout=60)


def test_headline_metrics_rule():
    names = ["ckpt_watch_smoke_mc/acc", "ckpt_watch_smoke_mc/acc_norm", "ckpt_watch_smoke_mc/acc_stderr",
             "ckpt_watch_smoke_ppl/bits_per_byte", "ckpt_watch_smoke_ppl/byte_perplexity",
             "ckpt_watch_smoke_ppl/word_perplexity", "gsm8k/exact_match@strict-match", "gsm8k/exact_match_stderr",
             "ppl/nll_per_token", "ppl/perplexity", "ppl/tokens", "params/total", "params/active", "routing/cv",
             "routing/layer_1/cv", "inference/tokens_per_s", "flops/per_token"]  # fmt: skip
    assert headline_metrics(names) == ["ckpt_watch_smoke_mc/acc", "ckpt_watch_smoke_ppl/word_perplexity",
                                       "gsm8k/exact_match@strict-match", "ppl/perplexity", "routing/cv",
                                       "params/active"]  # fmt: skip
    assert headline_metrics(["a/acc", "b/acc", "c/acc", "d/acc", "e/acc"]) == ["a/acc", "b/acc", "c/acc", "d/acc"]
    assert headline_metrics(["t/score", "t/bleu", "gpus"]) == ["t/bleu"]  # no preferred name: first known direction


def test_status_json_lists_every_job(scanned):
    run = status(scanned, "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [(r["step"], r["variant"], r["preset"]) for r in rows] == [
        (step, "regular", preset) for step in (10, 20, 30) for preset in ("flaky", "quick")]  # fmt: skip
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert all(r["attempts"] == 1 and r["pending_sinks"] == [] and r["result_id"] for r in rows)
    assert all(r["started_at"] <= r["finished_at"] and r["walltime_s"] > 0 for r in rows)
    by = {(r["step"], r["preset"]): r for r in rows}
    assert [by[s, "quick"]["state"] for s in (10, 20, 30)] == ["done"] * 3
    assert [by[s, "flaky"]["state"] for s in (10, 20, 30)] == ["done", "failed", "done"]
    assert "boom at step 20" in by[20, "flaky"]["error"] and by[10, "flaky"]["error"] is None
    assert list(by[10, "quick"]["metrics"]) == ["mc/acc", "wiki/word_perplexity", "params/active"]
    assert by[30, "quick"]["metrics"]["mc/acc"] == pytest.approx(0.55)
    assert by[10, "quick"]["metrics"]["wiki/word_perplexity"] == pytest.approx(30.0)
    assert by[10, "quick"]["metrics"]["params/active"] > 0 and by[10, "flaky"]["metrics"]["params/active"] is None
    assert by[20, "flaky"]["metrics"] == dict.fromkeys(by[20, "flaky"]["metrics"])  # failed: no values

    only = json.loads(status(scanned, "--json", "--preset", "flaky").stdout)
    assert [r["state"] for r in only] == ["done", "failed", "done"]
    assert list(only[0]["metrics"]) == ["mc/acc", "wiki/word_perplexity"]
    wrong = status(scanned, "--preset", "nope")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "it has: flaky, quick" in wrong.stderr


def test_status_table_in_a_pipe_is_plain_text(scanned):
    run = status(scanned)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout  # no colour codes in a pipe
    lines = run.stdout.splitlines()
    assert sum(line.startswith("│ checkpoint-") for line in lines) == 6  # one line per job, not folded
    assert any("checkpoint-20" in line and "failed" in line and "flaky" in line for line in lines)
    assert "checkpoint-20 regular flaky failed: RuntimeError: command exited with status 1: boom at step 20" in lines
    assert lines[-1] == "3 checkpoint(s), 6 job(s): 5 done, 1 failed"


def test_status_reads_while_the_journal_is_being_written(scanned, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(scanned / "ckpt-watch", output / "ckpt-watch")  # a private journal: this test changes it
    journal = output / "ckpt-watch" / "journal.sqlite"
    writer = sqlite3.connect(journal, isolation_level=None, timeout=1)
    try:
        writer.execute("BEGIN IMMEDIATE")  # what the daemon holds during each transition
        result_id = writer.execute("SELECT result_id FROM results ORDER BY committed_at LIMIT 1").fetchone()[0]
        writer.execute("DELETE FROM deliveries WHERE result_id = ? AND sink = 'tensorboard'", (result_id,))
        during = status(output, "--json")
        assert during.returncode == 0, during.stderr
        assert all(r["pending_sinks"] == [] for r in json.loads(during.stdout))  # the last committed state
        writer.execute("COMMIT")
    finally:
        writer.close()
    after = json.loads(status(output, "--json").stdout)
    assert [r["pending_sinks"] for r in after if r["result_id"] == result_id] == [["tensorboard"]]
    assert "results waiting for delivery: tensorboard 1" in status(output).stdout


def test_status_without_a_journal_is_one_line_and_creates_nothing(tmp_path):
    run = status(tmp_path, "--json")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"ckpt-watch: error: no ckpt-watch journal for {tmp_path} (looked for ")
    assert list(tmp_path.iterdir()) == []


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_regular_and_ema_against_step(scanned, tmp_path):
    png = tmp_path / "plots" / "metrics.png"
    run = ckpt_watch("plot", scanned, "-o", png, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 metric(s)" in run.stdout  # default: mc/acc and wiki/word_perplexity (params/active is constant)
    width, height = _png_size(png.read_bytes())
    assert 600 <= width <= 2000 and 500 <= height <= 2000 and png.stat().st_size > 20_000
    assert [p.name for p in png.parent.iterdir()] == ["metrics.png"]  # no temporary file left behind

    from watcher.cli.plot import collect

    series = collect(read_results(scanned / "ckpt-watch"))
    assert sorted(series) == [("flaky", "regular"), ("quick", "ema"), ("quick", "regular")]
    assert sorted(series["flaky", "regular"]) == [10, 30]  # the failed result is left out
    svg = tmp_path / "one.svg"
    run = ckpt_watch("plot", scanned, "-o", svg, "--metric", "mc/acc_norm", "--preset", "quick", timeout=120)
    assert run.returncode == 0 and svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


def test_plot_errors_are_one_line(scanned, tmp_path):
    bad = ckpt_watch("plot", scanned, "-o", tmp_path / "x.png", "--metric", "acc", timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "unknown metric 'acc'" in bad.stderr and "mc/acc" in bad.stderr
    empty = ckpt_watch("plot", tmp_path, "-o", tmp_path / "x.png", timeout=60)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and "no successful results" in empty.stderr
    gif = ckpt_watch("plot", scanned, "-o", tmp_path / "x.gif", timeout=60)
    assert gif.returncode == 2 and "unsupported picture format '.gif'" in gif.stderr
    assert not (tmp_path / "x.png").exists()


def test_pending_deliveries_follow_the_sinks_the_daemon_recorded(scanned):
    """status needs none of the daemon's flags: the daemon records its sinks in the journal."""
    db = scanned / "ckpt-watch" / "journal.sqlite"
    with sqlite3.connect(db) as writer:
        recorded = json.loads(writer.execute("SELECT value FROM meta WHERE key = 'sinks'").fetchone()[0])
        assert recorded == ["files", "wandb", "tensorboard"]
        writer.execute("UPDATE meta SET value = ? WHERE key = 'sinks'", (json.dumps(recorded + ["elsewhere"]),))
    try:
        rows = json.loads(status(scanned, "--json").stdout)
        assert {tuple(r["pending_sinks"]) for r in rows if r["result_id"]} == {("elsewhere",)}
    finally:
        with sqlite3.connect(db) as writer:
            writer.execute("UPDATE meta SET value = ? WHERE key = 'sinks'", (json.dumps(recorded),))


def test_plot_skips_lines_that_are_not_result_records(scanned, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(scanned / "ckpt-watch", output / "ckpt-watch")
    jsonl = output / "ckpt-watch" / "results.jsonl"
    lines = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"[]\n" + b"".join(lines[:2]) + b'null\n123\n{"status": "ok", "step": 5, "metrics": []}\n'
                      + b"".join(lines[2:]))  # fmt: skip
    run = ckpt_watch("plot", output, "-o", tmp_path / "p.png", "--metric", "mc/acc", timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("skipped 4 line(s)") == 1, run.stderr
