"""When a run is known finished (watcher/final.py), and `ckpt-watch finalize` (watcher/cli/finalize.py).

The command runs as a real process on real folders; the run record is written by the record writer the Trainer
callback uses, and once by a real Trainer (the session's `plain_run`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import STEPS
from watcher.final import (FINALIZED, STEP_UNKNOWN, clear_finalized, finished_step, read_finalized,
                           write_finalized)  # fmt: skip
from watcher.integrations.run_record import write_run_record
from watcher.schedules import final_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def record(state: str, **fields) -> dict:
    return {"format": 1, "writer": "ckpt-watch/hf", "wandb": None, "state": state, **fields}


@pytest.fixture
def run(tmp_path) -> tuple[Path, Path]:
    """(output dir with checkpoint-10, -20, -30 folders, its default results dir, not created yet)."""
    output = tmp_path / "output"
    for step in (10, 20, 30):
        (output / f"checkpoint-{step}").mkdir(parents=True)
    return output, output / "ckpt-watch"


def finalize(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "watcher", "finalize", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


# --- finished_step -------------------------------------------------------------------------------------------


def test_not_finished_without_record_or_finalize_file(run):
    output, results = run
    assert finished_step(output, results) is None


def test_finished_record_gives_its_global_step(run):
    output, results = run
    write_run_record(output, record("finished", global_step=30))
    assert finished_step(output, results) == 30


def test_running_record_is_not_finished(run):
    output, results = run
    write_run_record(output, record("running", global_step=20))
    assert finished_step(output, results) is None


@pytest.mark.parametrize("step", [None, "30", 30.0, True, -5])
def test_finished_record_without_usable_step_is_finished_at_an_unknown_step(run, step):
    output, results = run
    fields = {} if step is None else {"global_step": step}
    write_run_record(output, record("finished", **fields))
    assert finished_step(output, results) == STEP_UNKNOWN
    # final_checkpoint then takes the last checkpoint, once nothing is settling.
    assert final_checkpoint([10, 20, 30], STEP_UNKNOWN, settling=False) == 30
    assert final_checkpoint([10, 20, 30], STEP_UNKNOWN, settling=True) is None


def test_finalize_file_step_overrides_the_record(run):
    output, results = run
    write_run_record(output, record("finished", global_step=30))
    write_finalized(results, 20)
    assert finished_step(output, results) == 20
    write_run_record(output, record("running", global_step=40))  # resumed: the person's word still stands
    assert finished_step(output, results) == 20


def test_finalize_file_without_step_defers_to_a_finished_record(run):
    output, results = run
    write_finalized(results, None)
    assert finished_step(output, results) == STEP_UNKNOWN
    write_run_record(output, record("finished", global_step=30))
    assert finished_step(output, results) == 30


@pytest.mark.parametrize("content", [
    b'{"step": 20, "at": "2025-',  # torn
    b"",
    b"[20]",
    b'{"at": "2025-05-01T12:00:00.000+00:00"}',  # no step
    b'{"step": "20"}',
    b'{"step": -1}',
    b'{"step": true}',
    b"\xff\xfe not utf-8",
])  # fmt: skip
def test_torn_or_foreign_finalize_file_is_not_finalized(run, content):
    output, results = run
    results.mkdir()
    (results / FINALIZED).write_bytes(content)
    assert read_finalized(results) is None
    assert finished_step(output, results) is None
    write_run_record(output, record("finished", global_step=30))
    assert finished_step(output, results) == 30  # and the record still counts


def test_unreadable_finalize_file_is_not_finalized(run):
    output, results = run
    (results / FINALIZED).mkdir(parents=True)  # a folder where the file should be: reading fails with OSError
    assert finished_step(output, results) is None


def test_write_and_clear(run):
    output, results = run
    path = write_finalized(results, 30, now=0.0)
    assert json.loads(path.read_text()) == {"step": 30, "at": "1970-01-01T00:00:00.000+00:00",
                                            "by": "ckpt-watch finalize"}  # fmt: skip
    assert [p.name for p in results.iterdir()] == [FINALIZED]  # no temporary file left
    assert clear_finalized(results) is True
    assert clear_finalized(results) is False
    assert finished_step(output, results) is None


def test_real_trainer_record_at_train_end(plain_run, tmp_path):
    """The HF callback's record at train end is enough: finished at the trainer's last step."""
    assert finished_step(plain_run, tmp_path / "no-results") == STEPS


# --- ckpt-watch finalize -------------------------------------------------------------------------------------


def test_finalize_takes_the_highest_checkpoint_present(run):
    output, results = run
    (output / "checkpoint-5").mkdir()
    (output / "not-a-checkpoint-99").mkdir()
    done = finalize(output)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count("\n") == 1 and "checkpoint-30 is now the final checkpoint" in done.stdout
    assert read_finalized(results)["step"] == 30
    assert finished_step(output, results) == 30


def test_finalize_with_step(run):
    output, results = run
    done = finalize(output, "--step", "20")
    assert done.returncode == 0, done.stderr
    assert "checkpoint-20 is now the final checkpoint" in done.stdout
    assert finished_step(output, results) == 20
    done = finalize(output, "--step", "50")  # again: replaces the step; no folder for it yet
    assert done.returncode == 0, done.stderr
    assert "step 50 is now the final step" in done.stdout
    assert finished_step(output, results) == 50


def test_finalize_with_step_and_no_checkpoints_yet(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    done = finalize(output, "--step", "0")
    assert done.returncode == 0, done.stderr
    assert finished_step(output, output / "ckpt-watch") == 0


def test_finalize_honours_results_dir_and_config(run, tmp_path):
    output, default_results = run
    elsewhere = tmp_path / "results-elsewhere"
    done = finalize(output, "--results-dir", elsewhere, "--step", "10")
    assert done.returncode == 0, done.stderr
    assert finished_step(output, elsewhere) == 10 and not default_results.exists()
    config = tmp_path / "watch.toml"
    configured = tmp_path / "configured"
    config.write_text(f'output_dir = "{output}"\nresults_dir = "{configured}"\n')
    done = finalize("--config", config)
    assert done.returncode == 0, done.stderr
    assert finished_step(output, configured) == 30


def test_undo(run):
    output, results = run
    assert finalize(output).returncode == 0
    done = finalize(output, "--undo")
    assert done.returncode == 0, done.stderr
    assert "no longer finalized" in done.stdout
    assert finished_step(output, results) is None
    done = finalize(output, "--undo")
    assert done.returncode == 0, done.stderr
    assert "nothing to undo" in done.stdout
    write_run_record(output, record("finished", global_step=30))
    assert finalize(output, "--step", "20").returncode == 0
    done = finalize(output, "--undo")
    assert "still says the training finished" in done.stdout
    assert finished_step(output, results) == 30


@pytest.mark.parametrize("case", ["missing output dir", "negative step", "not a number", "step and undo",
                                  "no checkpoints", "a checkpoint folder", "no output dir"])  # fmt: skip
def test_bad_input_is_one_line_exit_2(run, tmp_path, case):
    output, results = run
    empty = tmp_path / "empty"
    empty.mkdir()
    args, expected = {
        "missing output dir": ((tmp_path / "nope",), "output dir not found"),
        "negative step": ((output, "--step", "-3"), "must not be negative"),
        "not a number": ((output, "--step", "last"), "invalid int value"),
        "step and undo": ((output, "--step", "3", "--undo"), "not allowed with argument"),
        "no checkpoints": ((empty,), "no checkpoint folder in"),
        "a checkpoint folder": ((output / "checkpoint-30",), "looks like a checkpoint"),
        "no output dir": ((), "no output dir"),
    }[case]
    done = finalize(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("ckpt-watch") and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert not results.exists() and not (empty / "ckpt-watch").exists()
    assert not (output / "checkpoint-30" / "ckpt-watch").exists()
