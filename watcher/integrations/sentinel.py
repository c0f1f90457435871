"""The files a training loop and the daemon share: the completion sentinel (loop -> daemon) and the stop request
(daemon -> loop), for any training loop.

## The completion sentinel `checkpoint-N/ckpt-watch-complete.json`

Write it LAST, once every file of the checkpoint is written (and, with several processes, after a barrier):

    write_sentinel(checkpoint_dir, step, epoch=1.5)

Format 1 (keys sorted, one JSON object):

    {
      "format": 1,
      "step": 30,                                  # the training step of this checkpoint
      "files": {"model.safetensors": 493384,       # every file below the checkpoint folder, by its path
                "pytorch_model_fsdp_0/__0_0.distcp": 1024, ...},  # relative to it (POSIX "/"), and its size
      "written_at": "2025-05-01T12:05:00+00:00",
      "writer": "ckpt-watch/hf",                   # optional extras from here on
      "epoch": 1.5,
      "num_input_tokens_seen": 123456,
      "total_flos": 1.2e12
    }

The sentinel itself (and its temporary file) is not listed. Subfolders are walked; symlinked folders are
not (as `watcher.fingerprint.snapshot` does), symlinked files count with their target's size.

The daemon (`watcher.completion`) takes the folder as complete when this file exists and every listed file
exists with exactly the listed size; no layout rule is applied then. The write is atomic (temp file in the
same folder, fsync, rename, fsync of the folder), so the daemon never sees half a sentinel.

## The stop request `OUTPUT_DIR/ckpt-watch-stop.json`

Written by the daemon (atomically, as above) when an alert rule with `stop_training = true` fires
(watcher/alerts.py). The Hugging Face callback (watcher/integrations/hf.py) reads it at each save; any other
loop polls it, e.g. after each checkpoint:

    from watcher.integrations.sentinel import stop_requested
    started = time.time()                                   # when this training (or its resumption) began
    ...
    if (request := stop_requested(output_dir, since=started)) is not None:
        print("ckpt-watch asks to stop:", request["reason"]); break

Format 1 (one JSON object, keys sorted):

    {
      "format": 1,
      "requested_at": "2025-05-01T12:05:00.123456+00:00",  # when the rule fired (UTC)
      "rule": "mmlu/acc drop_from_best 5%",                 # the alert rule's name
      "metric": "mmlu/acc", "variant": "regular",
      "step": 30,                                           # the checkpoint whose result fired it
      "value": 0.41,                                        # its value of the metric (null for a NaN)
      "reason": "mmlu/acc at checkpoint-30 is 0.41, ..."    # the alert's message
    }

A request older than the training that reads it (`requested_at` before `since`) is stale: it was meant for an
earlier run of the loop (training was stopped, then resumed from a checkpoint), and `stop_requested` ignores it.
A later firing replaces the file. Deleting it withdraws the request.
"""

from __future__ import annotations

import os
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from watcher.atomic import write_json_atomic
from watcher.completion import DEFAULT_SENTINEL, is_default_sentinel_name
from watcher.integrations.run_record import now_iso

FORMAT = 1
STOP_REQUEST = "ckpt-watch-stop.json"


def build_manifest(folder: str | Path) -> dict[str, int]:
    """relative POSIX path -> size in bytes, of every file below `folder` except the sentinel."""
    folder = Path(folder)
    files: dict[str, int] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if not prefix and is_default_sentinel_name(entry.name):  # itself, or its temporary file
                    continue
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), rel + "/")
                else:
                    files[rel] = entry.stat().st_size

    walk(folder, "")
    return dict(sorted(files.items()))


def write_sentinel(folder: str | Path, step: int, **extra: Any) -> dict[str, Any]:
    """Write `folder/ckpt-watch-complete.json` (format above) atomically; returns what was written.

    `extra` keys are added as they are (JSON values; they must not be "format", "step" or "files").
    """
    folder = Path(folder)
    clash = {"format", "step", "files"} & set(extra)
    if clash:
        raise ValueError(f"reserved sentinel keys: {sorted(clash)}")
    payload = {**extra, "format": FORMAT, "step": int(step), "files": build_manifest(folder)}
    payload.setdefault("written_at", now_iso())
    write_json_atomic(folder / DEFAULT_SENTINEL, payload)
    return payload


def write_stop_request(output_dir: str | Path, *, rule: str, metric: str, variant: str, step: int,
                       value: float | None, reason: str) -> dict[str, Any]:  # fmt: skip
    """Write OUTPUT_DIR/ckpt-watch-stop.json (format above) atomically, now; returns what was written."""
    payload = {"format": FORMAT, "requested_at": datetime.now(timezone.utc).isoformat(), "rule": rule,
               "metric": metric, "variant": variant, "step": int(step), "value": value, "reason": reason}  # fmt: skip
    write_json_atomic(Path(output_dir) / STOP_REQUEST, payload)
    return payload


def read_stop_request(output_dir: str | Path) -> dict[str, Any] | None:
    """The stop request as written, stale or not; None when there is none (or it is not one: never written
    half, so anything unreadable is someone else's file)."""
    try:
        request = json.loads((Path(output_dir) / STOP_REQUEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return request if isinstance(request, dict) and request.get("format") == FORMAT else None


def requested_at(request: dict[str, Any]) -> float | None:
    """When the request was written (Unix seconds), None if it does not say in a readable way."""
    try:
        return datetime.fromisoformat(str(request["requested_at"])).timestamp()
    except (KeyError, ValueError):
        return None


def is_stale(request: dict[str, Any], since: float | datetime | None) -> bool:
    """Written before `since` (Unix seconds or an aware datetime: when the reading training began)? A request
    without a readable time counts as stale, so that it never stops a training it may not be meant for."""
    if since is None:
        return False
    start = since.timestamp() if isinstance(since, datetime) else float(since)
    when = requested_at(request)
    return when is None or when < start


def stop_requested(output_dir: str | Path, since: float | datetime | None = None) -> dict[str, Any] | None:
    """The stop request for the training that began at `since` (None: any request), or None: no request, or
    only a stale one (written before `since`)."""
    request = read_stop_request(output_dir)
    return None if request is None or is_stale(request, since) else request
