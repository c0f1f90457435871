"""Has a checkpoint folder changed? Stat-only digests of everything below it, in one walk.

`watcher.completion` decides whether a folder is completely written; this module decides, for a folder already
journaled, whether what is there now is the same checkpoint (its fingerprint) and whether anything is still being
written (its activity, the settle window's clock). The rules for what counts as a re-save:

* every file counts by its relative path and size;
* a weight file (by suffix, or any file of 1 MiB or more) also by its mtime: rewriting the weights under the same
  names is a re-save;
* the mtime of a small non-weight file does not count (`touch config.json` is not a re-save), nor does the training
  state beside the model (optimizer, scheduler, RNG and scaler state: deleting `optimizer.pt` is not one either);
* ckpt-watch's own sentinel (and its temporary file) does not count at all: the trainer callback writes it a
  moment after the checkpoint.

Nothing here opens a file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from merge.dcp_metadata import METADATA_FILE
from watcher.completion import is_default_sentinel_name


@dataclass(frozen=True)
class Snapshot:
    digest: str  # fingerprint(): changes when the checkpoint's model may have changed (a re-save)
    activity: str  # changes on any write inside the folder at all: what the settle window waits out
    legacy_digest: str  # the fingerprint of ckpt-watch 0.1 (every file's mtime), to recognise what it journaled
    newest_change: float  # the newest mtime or ctime of the folder and its files: how long it has been quiet


# Training state a checkpoint carries beside the model (HF Trainer, accelerate FSDP, veRL): deleting it to save
# space, or rewriting it, leaves the model as it was (so does the Trainer's training_args.bin). Matched against the
# path's first component.
_TRAINING_STATE = re.compile(r"(optimizer|optim_|scheduler|lr_scheduler|scaler|rng_state|extra_state_|training_args)")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack")
_SMALL_FILE = 1 << 20  # bytes; below it, a file without a weight suffix is metadata (config, tokenizer, state)


def fingerprint(folder: Path) -> str:
    """A hex digest of the checkpoint's model files below `folder`, from stat alone: a new one means a re-save.

    Every file counts by its relative path and size; a weight file (by suffix, or any file of 1 MiB or more) also
    by its mtime, so rewriting the weights under the same names is a re-save. The mtime of a small non-weight file
    is left out (`touch config.json` is not a re-save), as is the training state next to the model (optimizer,
    scheduler, RNG and scaler state: deleting `optimizer.pt` to save space is not a re-save either), and
    `DEFAULT_SENTINEL` with its temporary file: the trainer callback writes it a moment after the checkpoint
    itself (possibly after the daemon has journaled the folder by its layout rule).

    Raises FileNotFoundError if `folder` itself is missing; files or subfolders vanishing during the
    walk are simply left out.
    """
    return snapshot(folder).digest


def snapshot(folder: Path) -> Snapshot:
    """The fingerprint, the activity digest and the newest change of a folder, in one stat-only walk."""
    folder = Path(folder)
    model: list[str] = []  # for the fingerprint
    legacy: list[str] = []
    everything: list[str] = []  # every file and folder with its mtime and ctime: any write shows
    newest = 0

    def walk(directory: Path, prefix: str) -> None:
        nonlocal newest
        try:
            scan = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            if not prefix:
                raise
            return  # a subfolder vanished mid-walk
        with scan:
            for entry in scan:
                rel = prefix + entry.name
                if not prefix and is_default_sentinel_name(entry.name):
                    continue
                try:
                    # Never follow symlinked folders (cycles); symlinked files count by their target.
                    if entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        everything.append(f"{rel}/\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
                        walk(Path(entry.path), rel + "/")
                        continue
                    st = entry.stat()
                except OSError:
                    continue  # vanished (or a dangling link): not part of the checkpoint any more
                legacy.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
                everything.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
                newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
                if _TRAINING_STATE.match(rel):
                    continue
                weights = entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name == METADATA_FILE
                if weights or st.st_size >= _SMALL_FILE:
                    model.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
                else:
                    model.append(f"{rel}\0{st.st_size}\n")

    walk(folder, "")
    if not newest:  # no file yet: the folder's own age, not 1970's (our sentinel's arrival must not count)
        own = folder.stat()
        newest = max(own.st_mtime_ns, own.st_ctime_ns)
    return Snapshot(_digest(model), _digest(everything), _digest(legacy), newest / 1e9)


def _digest(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
