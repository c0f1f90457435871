"""`ckpt-watch compare` on real results: which checkpoint is better, metric by metric."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from helpers import ckpt_watch
from watcher.cli.compare import compare
from watcher.metrics import higher_is_better
from watcher.records import Result


def _result(step: int, metrics: dict[str, float]) -> Result:
    return Result(result_id=f"r{step}", step=step, checkpoint=f"checkpoint-{step}", variant="regular",
                  preset="smoke", status="ok", metrics=metrics)  # fmt: skip


def test_direction_comes_from_lm_eval_when_it_declares_one():
    raw = {"lm_eval": {"higher_is_better": {"task": {"acc": True, "weird": False}}}}
    assert higher_is_better("task/acc", raw) is True
    assert higher_is_better("task/weird", raw) is False  # declared wins over the name
    assert higher_is_better("task/word_perplexity") is False
    assert higher_is_better("inference/tokens_per_s") is True
    assert higher_is_better("inference/peak_reserved_mb") is False
    assert higher_is_better("params/total") is None
    rows = compare(_result(10, {"t/acc": 0.5, "t/acc_stderr": 0.1, "params/total": 5}),
                   _result(20, {"t/acc": 0.75, "params/total": 5, "ppl/perplexity": 3.0}))  # fmt: skip
    assert [(r["group"], r["metric"], r["better"]) for r in rows] == [
        ("accuracy", "t/acc", "B"), ("perplexity", "ppl/perplexity", None), ("cost", "params/total", None)]  # fmt: skip


def test_compare_two_steps_of_a_real_run(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-20")
    config = tmp_path / "c.toml"
    config.write_text('[presets.probe]\n[[presets.probe.evaluators]]\nbackend = "probes"\n'
                      'probes = ["parameters", "perplexity"]\n')  # fmt: skip
    assert ckpt_watch(output, "--scan", "--config", config, "--preset", "probe").returncode == 0
    run = subprocess.run([sys.executable, "-m", "watcher", "compare", str(output), "10", "30", "--preset", "probe",
                          "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {r["metric"]: r for r in json.loads(run.stdout)["rows"]}
    # 30 steps of training beat 10 on held-out text; the parameter count has no "better".
    assert rows["ppl/perplexity"]["b"] < rows["ppl/perplexity"]["a"] and rows["ppl/perplexity"]["better"] == "B"
    assert rows["params/total"]["difference"] == 0 and rows["params/total"]["better"] is None
    table = subprocess.run([sys.executable, "-m", "watcher", "compare",
                            str(output / "ckpt-watch" / "checkpoint-10" / "regular" / "probe.json"),
                            str(output / "ckpt-watch" / "checkpoint-30" / "regular" / "probe.json")],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert table.returncode == 0 and "ppl/perplexity" in table.stdout
    missing = subprocess.run([sys.executable, "-m", "watcher", "compare", str(output), "10", "20", "--preset", "probe"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "no successful probe result for step 20" in missing.stderr

    # Lines that are JSON but not result records, anywhere in results.jsonl, are skipped with one warning.
    jsonl = output / "ckpt-watch" / "results.jsonl"
    lines = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"[]\n" + lines[0] + b"null\n123\n" + b"".join(lines[1:]) + b'{"step": "x"}\n')
    again = subprocess.run([sys.executable, "-m", "watcher", "compare", str(output), "10", "30", "--preset", "probe",
                            "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and json.loads(again.stdout)["rows"] == json.loads(run.stdout)["rows"], again.stderr
    assert "Traceback" not in again.stderr and again.stderr.count("skipped 4 line(s)") == 1, again.stderr
    (tmp_path / "list.json").write_text("[]")
    listed = subprocess.run([sys.executable, "-m", "watcher", "compare", str(tmp_path / "list.json"),
                             str(output / "ckpt-watch" / "checkpoint-10" / "regular" / "probe.json")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 2 and "not a result file" in listed.stderr and "Traceback" not in listed.stderr
