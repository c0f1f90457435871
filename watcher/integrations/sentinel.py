"""The verified completion sentinel `checkpoint-N/ckpt-watch-complete.json`, for any training loop.

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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from watcher.atomic import write_json_atomic
from watcher.completion import DEFAULT_SENTINEL, is_default_sentinel_name
from watcher.integrations.run_record import now_iso

FORMAT = 1


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
