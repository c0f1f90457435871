"""Whether a training run is known to have finished, and at which step: what a `final = true` schedule entry
waits for (see schedules.final_checkpoint).

Two sources, read afresh at each call (two small files, cheap enough for every rescan):
- the trainer's run record (`OUTPUT_DIR/ckpt-watch-run.json`, integrations/run_record.py): `state = finished`,
  written by the Trainer callback when training returned, with the trainer's `global_step`;
- the finalize file (`RESULTS_DIR/finalized.json`), written by `ckpt-watch finalize OUTPUT_DIR` for trainers
  without the callback, or to name another final step:

      {"step": 30 | null, "at": "2025-05-01T12:00:00.000+00:00", "by": "ckpt-watch finalize"}

  `ckpt-watch finalize` always writes a step (the one given, or the highest checkpoint step present); null
  means "finished, step unknown" for a file written by hand or by a later tool. Readers ignore unknown keys.

The finalize file wins over the run record: it is a person's explicit word, written after the fact (and it
stays until `ckpt-watch finalize --undo`, even if the trainer is resumed and records `running` again).

Imports only the standard library, watcher.atomic, watcher.records and the run record's reader, so the daemon,
the command line and status can all use it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from watcher.atomic import fsync_dir, write_json_atomic
from watcher.integrations.run_record import read_run_record
from watcher.records import iso_time

FINALIZED = "finalized.json"
WRITER = "ckpt-watch finalize"
# "Finished, but at which step is not known": never a real step (steps are >= 0), so final_checkpoint() takes
# the run's last checkpoint once nothing is settling, exactly as for a finished step with no save at it.
STEP_UNKNOWN = -1


def finished_step(output_dir: Path, results_dir: Path) -> int | None:
    """The trainer's last step once the run is known finished, else None (the `finished_step` argument of
    schedules.final_checkpoint).

    - the finalize file's step when it has one (>= 0);
    - else, if the run record says `state = finished`, its `global_step` (an int >= 0);
    - else STEP_UNKNOWN (-1) when the run is known finished but no step is: a finalize file with step null, or
      a finished run record without a usable global_step;
    - None while neither says the run finished.

    Never raises: a missing, unreadable, torn or foreign file counts as absent.
    """
    finalized = read_finalized(results_dir)
    if finalized is not None and finalized["step"] is not None:
        return finalized["step"]
    record = read_run_record(output_dir)
    if record is not None and record.get("state") == "finished":
        step = record.get("global_step")
        return step if _is_step(step) else STEP_UNKNOWN
    return STEP_UNKNOWN if finalized is not None else None


def read_finalized(results_dir: Path) -> dict[str, Any] | None:
    """The finalize file as written (its "step" an int >= 0 or None), or None if there is none or it cannot be
    used (unreadable, torn, not a JSON object, no "step", or a step that is not a non-negative integer)."""
    try:
        value = json.loads((Path(results_dir) / FINALIZED).read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError covers JSON and UTF-8 decoding errors
        return None
    if not isinstance(value, dict) or "step" not in value:
        return None
    if value["step"] is not None and not _is_step(value["step"]):
        return None
    return value


def write_finalized(results_dir: Path, step: int | None, now: float | None = None) -> Path:
    """Atomically write the finalize file (creating the results dir if needed); returns its path. `now`: the
    Unix time recorded as "at" (default: the current time)."""
    if step is not None and not _is_step(step):
        raise ValueError(f"not a step: {step!r}")
    path = Path(results_dir) / FINALIZED
    write_json_atomic(path, {"step": step, "at": iso_time(time.time() if now is None else now), "by": WRITER})
    return path


def clear_finalized(results_dir: Path) -> bool:
    """Remove the finalize file; whether there was one. The removal is made durable (directory fsync)."""
    path = Path(results_dir) / FINALIZED
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def _is_step(value: Any) -> bool:
    return type(value) is int and value >= 0  # not bool (an int subclass), not a float like 30.0
