"""The custom command backend: argument lists, placeholders, JSON on stdout, failures."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from helpers import ckpt_watch, results
from watcher.evaluators import EvaluatorError, JobContext, get_evaluator

SCRIPT = """
import json, os, sys
model_dir, step, variant = sys.argv[1:4]
print("loading", model_dir)  # scripts log; only the last JSON line counts
print(json.dumps({"my_task": {"score": 0.25 * int(step) / 10, "label": "not a number"}, "ok": True,
                  "has_config": float(os.path.exists(os.path.join(model_dir, "config.json"))),
                  "gpus": len(os.environ.get("CUDA_VISIBLE_DEVICES", "x")), "versions": {"my_eval": 2}}))
"""


def _command(tmp_path):
    script = tmp_path / "my eval.py"  # a space in the path: no shell is involved
    script.write_text(SCRIPT)
    return [sys.executable, str(script), "{model_dir}", "{step}", "{variant}"]


def test_placeholders_are_filled_and_json_metrics_flattened(tiny_model_dir, tmp_path):
    backend = get_evaluator("command")
    out = backend.run(tiny_model_dir, ("cpu",), {"command": _command(tmp_path)}, tmp_path,
                      JobContext(checkpoint="checkpoint-30", step=30, variant="ema"))  # fmt: skip
    assert out.metrics == {"my_task/score": 0.75, "has_config": 1.0, "gpus": 1.0}
    assert out.raw["argv"][2:] == [str(tiny_model_dir), "30", "ema"]
    assert out.versions == {"my_eval": "2", "command": sys.executable}  # declared versions are not metrics


def test_nan_and_infinite_values_are_kept_apart_and_the_raw_output_stays_json(tiny_model_dir, tmp_path):
    """Python's json prints NaN and Infinity; they are no metrics, but the alert rules' `nan` reads them, and the
    job's outcome (strict JSON) must still be written."""
    printed = "import json; print(json.dumps(dict(acc=0.5, loss=float('nan'), sub=dict(ppl=float('-inf')))))"
    out = get_evaluator("command").run(tiny_model_dir, ("cpu",), {"command": [sys.executable, "-c", printed]},
                                       tmp_path)  # fmt: skip
    assert out.metrics == {"acc": 0.5} and out.nonfinite == {"loss": "nan", "sub/ppl": "-inf"}
    assert json.loads(json.dumps(out.raw, allow_nan=False))["output"] == {"acc": 0.5, "loss": "nan",
                                                                          "sub": {"ppl": "-inf"}}  # fmt: skip


@pytest.mark.parametrize("options, message", [
    ({"command": "python eval.py {model_dir}"}, "not a shell string"),
    ({"command": []}, "non-empty list"),
    ({"command": ["python", "{model}"]}, "unknown placeholder {model}"),
    ({"command": ["python"], "timeout": 0}, "timeout"),
    ({"command": ["python"], "shell": True}, "unknown command option"),
])  # fmt: skip
def test_bad_options_are_rejected(options, message):
    with pytest.raises(EvaluatorError, match=message):
        get_evaluator("command").check_options(options)


def test_failures(tiny_model_dir, tmp_path):
    backend = get_evaluator("command")
    with pytest.raises(EvaluatorError, match="command not found"):
        backend.run(tiny_model_dir, ("cpu",), {"command": ["no-such-program-xyz"]}, tmp_path)
    with pytest.raises(RuntimeError, match="status 3"):
        backend.run(tiny_model_dir, ("cpu",), {"command": [sys.executable, "-c", "import sys; sys.exit(3)"]}, tmp_path)
    with pytest.raises(EvaluatorError, match="no JSON object"):
        backend.run(tiny_model_dir, ("cpu",), {"command": [sys.executable, "-c", "print('hello')"]}, tmp_path)


def test_the_daemon_runs_a_command_preset(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-10")
    config = tmp_path / "c.toml"
    config.write_text("[presets.mine]\n[[presets.mine.evaluators]]\nbackend = \"command\"\n"
                      f"command = {json.dumps(_command(tmp_path))}\n")  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "mine")
    assert run.returncode == 0, run.stderr
    scores = {r["step"]: r["metrics"]["my_task/score"] for r in results(output)}
    assert scores == {20: 0.5, 30: 0.75}
    assert all(r["metrics"]["gpus"] == 0 for r in results(output))  # cpu job: CUDA_VISIBLE_DEVICES is ""


BROKEN = """
import sys
step = int(sys.argv[1])
if step == 20:
    raise SystemExit("segfault-like crash in my_eval")  # exits 1, message on stderr
print("not json at all" if step == 30 else '{"score": 1}')
"""


def test_a_crashing_or_garbage_printing_backend_fails_only_its_job(copy_trainer_output, tmp_path):
    output = copy_trainer_output()
    script = tmp_path / "broken.py"
    script.write_text(BROKEN)
    config = tmp_path / "c.toml"
    config.write_text("max_attempts = 1\n[presets.mine]\n[[presets.mine.evaluators]]\nbackend = \"command\"\n"
                      f"command = {json.dumps([sys.executable, str(script), '{step}'])}\n")  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "mine")
    assert run.returncode == 1, run.stderr  # some job failed; the daemon itself finished every checkpoint
    by_step = {r["step"]: r for r in results(output)}
    assert by_step[10]["status"] == "ok" and by_step[10]["metrics"] == {"score": 1.0}
    assert by_step[20]["status"] == "failed"
    assert by_step[20]["error"] == "RuntimeError: command exited with status 1: segfault-like crash in my_eval"
    assert by_step[30]["status"] == "failed" and "printed no JSON object" in by_step[30]["error"]
    assert "Traceback" not in run.stderr
