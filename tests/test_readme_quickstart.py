"""The README's quick start, run as written there: extracted between its `quickstart-walkthrough` markers, so
editing the README edits this test (a walkthrough that stops working fails here, not for a new user).

Run as a user would, in a fresh folder, with two changes a CPU-only test needs: `--device cuda:1` becomes
`--device cpu`, and the daemon, which a user starts before training in a terminal of its own, runs as a
`--scan` after training (the live daemon is tested in test_daemon.py; this keeps the test short)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def walkthrough() -> dict[str, str]:
    """The walkthrough's code blocks by language: the training script (python) and the commands (bash)."""
    start, end = "<!-- quickstart-walkthrough -->", "<!-- /quickstart-walkthrough -->"
    assert start in README and end in README, "the README's quick-start markers are gone"
    section = README.split(start, 1)[1].split(end, 1)[0]
    blocks = {language: body for language, body in FENCE.findall(section)}
    assert set(blocks) == {"python", "bash"}, blocks.keys()
    return blocks


def commands(bash: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in bash.splitlines() if shlex.split(line, comments=True)]


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_readme_test_command_is_the_one_ci_runs():
    tests_block = README.split("Run the tests:", 1)[1]
    command = FENCE.search(tests_block).group(2).strip()
    assert command in (ROOT / ".ci" / "run").read_text(), command


def test_the_quick_start_walkthrough_as_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    blocks = walkthrough()
    (tmp_path / "train.py").write_text(blocks["python"])
    steps = commands(blocks["bash"])
    daemon = next(argv for argv in steps if argv[0] == "ckpt-watch" and argv[1].startswith("./"))
    checked = []
    for argv in steps:
        if argv is daemon:
            continue  # runs as a --scan right after training, below
        if argv[0] == "python":
            run([sys.executable, *argv[1:]], tmp_path)
            scan = [sys.executable, "-m", "watcher", *[a.replace("cuda:1", "cpu") for a in daemon[1:]], "--scan"]
            summary = run(scan, tmp_path).stderr
            assert "scan done: 2 job(s) evaluated, 0 failed" in summary, summary
        elif argv[0] == "ckpt-watch":
            shown = run([sys.executable, "-m", "watcher", *argv[1:]], tmp_path).stdout
            if argv[1] == "status":
                assert "checkpoint-10" in shown and "checkpoint-20" in shown and shown.count(" done ") == 2, shown
            if argv[1] == "plot":
                assert (tmp_path / argv[argv.index("-o") + 1]).stat().st_size > 0
        elif argv[0] == "tensorboard":  # no server in a test: read what it would show
            logdir = tmp_path / argv[argv.index("--logdir") + 1]
            runs = {p.parent.name for p in logdir.rglob("events.out.tfevents.*")}
            assert "ckpt-watch-eval" in runs and len(runs) >= 2, runs  # ours beside the trainer's
            events = EventAccumulator(str(logdir / "ckpt-watch-eval"))
            events.Reload()
            tags = events.Tags()["scalars"]
            assert any(t.startswith("eval/") for t in tags), tags
            assert [e.step for e in events.Scalars(tags[0])] == [10, 20]
        else:
            raise AssertionError(f"the walkthrough has a command this test does not know how to check: {argv}")
        checked.append(argv[0] if argv[0] != "ckpt-watch" else argv[1])
    assert checked == ["python", "status", "plot", "tensorboard"], checked
    assert os.listdir(tmp_path / "output" / "checkpoint-10")  # the trainer's own folders, untouched by us
