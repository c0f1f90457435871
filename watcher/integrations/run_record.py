"""The run record: `OUTPUT_DIR/ckpt-watch-run.json`, what the training process tells the daemon about itself.

Written by `watcher.integrations.hf.CkptWatchCallback` (world process zero only) on train begin, after each
checkpoint save and on train end, always atomically (temp file + fsync + rename + directory fsync), so a
reader sees the previous record or the new one, never half of one. Format 1:

    {
      "format": 1,
      "writer": "ckpt-watch/hf",
      "output_dir": "/abs/OUTPUT_DIR",
      "wandb": {                      # null when no W&B run is active in the training process
        "entity": "team" | null,      #   null for offline runs (the entity is only known online)
        "project": "my-project",
        "id": "1a2b3c4d",             #   the run id: resume it, or find `run-<id>.wandb` for offline runs
        "name": "run name" | null,
        "mode": "online" | "offline" | "shared" | "disabled",
        "dir": "/abs/.../wandb/offline-run-YYYYmmdd_HHMMSS-<id>/files",   # the run's local files dir
        "sync_dir": "/abs/.../wandb/offline-run-YYYYmmdd_HHMMSS-<id>" | null,
        "url": "https://wandb.ai/..." | null
      } | null,
      "logging_dir": "/abs/OUTPUT_DIR/runs/May01_12-00-00_host" | null,  # the Trainer's TensorBoard logging dir
      "global_step": 30,              # the Trainer's step when the record was written
      "pid": 12345,                   # of the training process (world process zero)
      "hostname": "node-0",
      "state": "running" | "finished",  # "finished" once training returned (on_train_end)
      "started_at": "2025-05-01T12:00:00+00:00",
      "updated_at": "2025-05-01T12:05:00+00:00"
    }

Readers must ignore unknown keys (later writers may add some) and treat a missing key as null. A run that
crashed stays "running"; `process_alive` tells whether the writer still runs when the reader is on its host.
Once a W&B run was seen, the record keeps it even if the run is no longer active at a later update (the
training script may call `wandb.finish()` before the Trainer's train end), until another run replaces it.

This module imports only the standard library and `watcher.atomic`: the daemon uses `read_run_record`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from watcher.atomic import write_json_atomic
from watcher.records import iso_time

RUN_RECORD = "ckpt-watch-run.json"
FORMAT = 1
WANDB_MODES = ("online", "offline", "shared", "disabled")


def read_run_record(output_dir: str | Path) -> dict[str, Any] | None:
    """The run record of a training output dir, or None if there is none or it cannot be used.

    Never raises for a missing, unreadable, torn or foreign file. The "wandb" value is normalised to a dict
    with a string "id" or None; everything else is returned as written.
    """
    try:
        raw = (Path(output_dir) / RUN_RECORD).read_bytes()
        record = json.loads(raw)
    except (OSError, ValueError, RecursionError):  # ValueError covers JSON and UTF-8 decoding errors
        return None
    if not isinstance(record, dict) or type(record.get("format")) is not int or record["format"] < 1:
        return None
    run = record.get("wandb")
    if not (isinstance(run, dict) and isinstance(run.get("id"), str) and run["id"]):
        run = None
    record["wandb"] = run
    return record


def write_run_record(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Atomically (re)write the run record; `record` is written as given (see the format above)."""
    path = Path(output_dir) / RUN_RECORD
    write_json_atomic(path, record)
    return path


def current_wandb_run() -> dict[str, Any] | None:
    """The active W&B run of THIS process, as the record's "wandb" value; None when there is none.

    wandb is never imported here: if the training process has not imported it, no run can be active.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return None
    settings = getattr(run, "settings", None)
    mode = getattr(settings, "mode", None)
    mode = {"run": "online", "dryrun": "offline"}.get(mode, mode)
    if mode not in WANDB_MODES:
        mode = "offline" if getattr(run, "offline", False) else "online"
    return {
        "entity": _text(lambda: run.entity),
        "project": _text(lambda: run.project),
        "id": _text(lambda: run.id),
        "name": _text(lambda: run.name),
        "mode": mode,
        "dir": _path(lambda: run.dir),
        "sync_dir": _path(lambda: settings.sync_dir),
        "url": _text(lambda: run.url) if mode in ("online", "shared") else None,
    }


def process_alive(record: dict[str, Any]) -> bool | None:
    """Whether the process that wrote `record` still runs: None when that cannot be told from here (another
    host, or no pid). A pid can be reused after the writer died; pair this with the record's "updated_at"."""
    pid = record.get("pid")
    if type(pid) is not int or pid <= 0 or record.get("hostname") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return None
    return True


def now_iso() -> str:
    return iso_time(time.time())


def _text(get) -> str | None:
    try:
        value = get()
    except Exception:  # a run object half torn down, or an attribute a wandb version lacks
        return None
    return value if isinstance(value, str) and value else None


def _path(get) -> str | None:
    value = _text(get)
    return os.path.abspath(value) if value else None
