"""`ckpt-watch compare` on real results: which checkpoint is better, metric by metric."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

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
    # B has no stderr for t/acc: no test (significant null), better by value.
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


def _compare(*args):
    return subprocess.run([sys.executable, "-m", "watcher", "compare", *map(str, args)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.fixture
def crafted(tmp_path):
    """Two result files: t/acc 0.50 ± 0.02 -> 0.56 ± 0.02 (z = 2.1213, p = 0.0339), u/acc 0.50 ± 0.05 -> 0.52 ±
    0.05 (z = 0.2828, p = 0.7773), ppl/perplexity 20 -> 18 without a standard error, v/acc only in A."""
    paths = []
    for step, metrics in ((10, {"t/acc": 0.50, "t/acc_stderr": 0.02, "u/acc": 0.50, "u/acc_stderr": 0.05,
                                "ppl/perplexity": 20.0, "v/acc": 0.3}),
                          (20, {"t/acc": 0.56, "t/acc_stderr": 0.02, "u/acc": 0.52, "u/acc_stderr": 0.05,
                                "ppl/perplexity": 18.0})):  # fmt: skip
        paths.append(tmp_path / f"{step}.json")
        paths[-1].write_text(_result(step, metrics).to_json())
    return paths


def test_significance_of_each_difference_at_the_level(crafted):
    at_5 = {r["metric"]: r for r in json.loads(_compare(*crafted, "--json").stdout)["rows"]}
    t = at_5["t/acc"]
    assert (t["z"], t["p"]) == (pytest.approx(2.1213, abs=1e-4), pytest.approx(0.0339, abs=1e-4))
    assert (t["stderr_a"], t["stderr_b"], t["significant"], t["better"]) == (0.02, 0.02, True, "B")
    u = at_5["u/acc"]
    assert (u["z"], u["p"]) == (pytest.approx(0.2828, abs=1e-4), pytest.approx(0.7773, abs=1e-4))
    assert (u["significant"], u["better"]) == (False, "~")
    ppl = at_5["ppl/perplexity"]  # no standard error: no test, better by value
    assert (ppl["z"], ppl["p"], ppl["significant"], ppl["better"]) == (None, None, None, "B")
    v = at_5["v/acc"]
    assert (v["b"], v["significant"], v["better"]) == (None, None, None)
    assert not any(name.endswith("_stderr") for name in at_5)

    run = _compare(*crafted, "--json", "--level", "0.01")
    at_1 = json.loads(run.stdout)
    assert at_1["level"] == 0.01 and json.loads(_compare(*crafted, "--json").stdout)["level"] == 0.05
    t = {r["metric"]: r for r in at_1["rows"]}["t/acc"]
    assert (t["p"], t["significant"], t["better"]) == (pytest.approx(0.0339, abs=1e-4), False, "~")


def test_table_shows_z_p_and_why_a_row_has_no_test(crafted):
    run = _compare(*crafted)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    t_row = next(line for line in lines if " t/acc " in line)
    assert "0.5 ± 0.02" in t_row and "+2.12" in t_row and "0.034" in t_row and "yes" in t_row, t_row
    u_row = next(line for line in lines if " u/acc " in line)
    assert "+0.28" in u_row and "0.78" in u_row and " no " in u_row and "~" in u_row, u_row
    assert "no stderr" in next(line for line in lines if " ppl/perplexity " in line)
    assert "p < 0.05" in run.stdout
    legend = [line for line in lines if line.startswith("± standard error")]
    assert len(legend) == 1 and "z-test" in legend[0] and "no stderr: better by value" in legend[0], lines
    assert "p < 0.01" in _compare(*crafted, "--level", "0.01").stdout


@pytest.mark.parametrize("level", ["0", "0.6", "1", "-0.05", "nan", "abc", "inf"])
def test_a_bad_level_is_one_line_and_exit_2(crafted, level):
    run = _compare(*crafted, f"--level={level}")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--level" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and ("(0, 0.5]" in run.stderr or "not a number" in run.stderr)
