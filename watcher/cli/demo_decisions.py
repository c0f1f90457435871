"""`ckpt-watch demo --decisions`: the demo run, with decisions made from its metrics.

The tiny Trainer run saves every 10 steps and keeps only its 2 newest checkpoints (`save_total_limit = 2`), logs
to an offline W&B run, and carries `CkptWatchCallback` (sentinels, the run record, stop requests). The daemon keeps
the best 3 checkpoints by the smoke task's accuracy under RESULTS_DIR/best (hard links: they outlive the rotation),
and an alert rule asks training to stop once accuracy stayed below the best so far for 2 checkpoints in a row.
At the end: what was kept (`ckpt-watch best`), the alerts, where training stopped, and a compare of the best
checkpoint with the last one that says which differences are within noise.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

METRIC = "ckpt_watch_smoke_mc/acc"
STEPS = 100  # the Trainer's max_steps: the alert is expected to stop it well before
STEP_DELAY = 0.3  # seconds per step: a checkpoint every ~3 s, enough for the daemon to keep up on 2 CPU cores
SAVE_TOTAL_LIMIT = 2
# What the daemon is told on top of the demo's own settings (the same keys as a config file's).
CONFIG: dict[str, Any] = {
    "keep_best": [{"metric": METRIC, "mode": "max", "k": 3}],
    "alerts": [{"name": "accuracy-regression", "metric": METRIC, "drop_from_best": 0.02, "consecutive": 2,
                "stop_training": True}],
}  # fmt: skip


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def trainer_arguments() -> list[str]:
    """Extra `python -m watcher.tiny` arguments of the decisions demo."""
    return ["--save-total-limit", str(SAVE_TOTAL_LIMIT), "--ckpt-watch-callback",
            *(["--report-to", "wandb"] if wandb_installed() else [])]  # fmt: skip


def trainer_environment(output_dir: Path) -> dict[str, str]:
    """An offline W&B run inside the output dir: nothing leaves the machine."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(output_dir), "WANDB_PROJECT": "ckpt-watch-demo",
            "WANDB_SILENT": "true"} if wandb_installed() else {}  # fmt: skip


def report(output_dir: Path, results_dir: Path) -> None:
    """What the decisions came to, after the results table."""
    print(f"\nThe best {CONFIG['keep_best'][0]['k']} checkpoints by {METRIC}, kept under {results_dir / 'best'} "
          f"(the trainer kept only its newest {SAVE_TOTAL_LIMIT}):", flush=True)  # fmt: skip
    _ckpt_watch("best", str(output_dir), "--metric", METRIC)
    alerts = results_dir / "alerts.jsonl"
    lines = alerts.read_text(encoding="utf-8").splitlines() if alerts.is_file() else []
    print(f"\nAlerts ({alerts}):" if lines else "\nNo alert fired.", flush=True)
    for line in lines:
        alert = json.loads(line)
        print(f"  step {alert.get('step')}: {alert.get('message') or alert}")
    stopped = _stop_line(output_dir / "train.log")
    last = _last_trainer_step(output_dir)
    if stopped:
        print(f"\nTraining stopped early at step {last} of {STEPS}: {stopped}")
    else:
        print(f"\nTraining ran to step {last} of {STEPS} (no stop was asked for in time)")
    kept = _best_steps(results_dir)
    fired = [json.loads(line).get("step") for line in lines]
    other = fired[0] if fired and isinstance(fired[0], int) else last
    if kept and other is not None and kept[0] != other:
        print(f"\nThe best checkpoint (A) against step {other}{' where the alert fired' if fired else ''} (B): "
              "is the difference real, or noise?", flush=True)  # fmt: skip
        _ckpt_watch("compare", str(output_dir), str(kept[0]), str(other))
    from watcher.sinks.wandb_run import upload_note

    note = upload_note("auto", output_dir, results_dir) if wandb_installed() else None
    if note:
        print(f"\nThe evals and the alert (a W&B alert on the training run) are written offline. {note}", flush=True)


def _ckpt_watch(*args: str) -> None:
    """The command a user would type next, run as such (subcommands do not import each other)."""
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "watcher", *args], check=False)


def _stop_line(train_log: Path) -> str | None:
    try:
        lines = train_log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in lines if "stop" in line.lower() and "ckpt-watch" in line.lower()), None)


def _last_trainer_step(output_dir: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps) if steps else None


def _best_steps(results_dir: Path) -> list[int]:
    try:
        kept = json.loads((results_dir / "best" / "best.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rules = kept.get("rules", kept) if isinstance(kept, dict) else kept
    first = rules[0] if isinstance(rules, list) and rules else {}
    return [entry["step"] for entry in first.get("kept", []) if isinstance(entry, dict) and "step" in entry]
