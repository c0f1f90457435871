"""W&B's local run folders: find a trainer's run, and read its `run-<id>.wandb` transaction log.

Every W&B run, online or offline, writes `wandb/[offline-]run-<date>-<id>/run-<id>.wandb` next to where it was
started. The run id is taken from that file's name (the folder name gains suffixes such as "-1" when a run is
resumed in the same place). The file is W&B's record log: a 7-byte header (":W&B", magic 0xBEE1, version 0) and
then LevelDB's log format (32 KiB blocks of chunks with a 7-byte header: CRC-32, length, type FULL/FIRST/MIDDLE/
LAST), each record a `wandb_internal.proto` Record. W&B no longer ships a Python reader of it (the Go core writes
it), so this small one is written here; the protobuf classes come from the installed `wandb` package.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_RUN_FILE = re.compile(r"^run-(?P<id>[A-Za-z0-9_-]+)\.wandb$")


class WandbLogError(ValueError):
    """Not a W&B transaction log, or a damaged one."""


def read_payloads(path: Path) -> Iterator[bytes]:
    """The raw record payloads of a `.wandb` file, in order. A torn tail (a run still writing) ends the iteration."""
    data = Path(path).read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise WandbLogError(f"{path} is not a W&B transaction log (bad header)")
    offset, pending = len(_FILE_HEADER), b""
    while offset + _CHUNK_HEADER <= len(data):
        room = _BLOCK - offset % _BLOCK
        if room < _CHUNK_HEADER:  # the writer pads a block's tail that cannot hold a chunk header
            offset += room
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        body = data[offset + _CHUNK_HEADER : offset + _CHUNK_HEADER + length]
        if len(body) < length or (checksum == 0 and length == 0 and kind == 0):
            return  # torn or zero-filled tail
        if zlib.crc32(bytes([kind]) + body) != checksum:
            raise WandbLogError(f"{path}: checksum mismatch at byte {offset}")
        offset += _CHUNK_HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""
        else:
            raise WandbLogError(f"{path}: unknown chunk type {kind} at byte {offset}")


def read_records(path: Path) -> Iterator[object]:
    """Each record as a `wandb.proto.wandb_internal_pb2.Record` (needs the `wandb` package)."""
    from wandb.proto import wandb_internal_pb2

    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


@dataclass(frozen=True)
class LocalRun:
    """A run found on disk: what W&B needs to resume it, and whether its writer has finished it."""

    id: str
    project: str | None
    entity: str | None
    offline: bool
    exited: bool  # the log ends with the run's exit record: no process writes to it any more
    log: Path


def describe_run(log: Path) -> LocalRun:
    match = _RUN_FILE.match(log.name)
    if not match:
        raise WandbLogError(f"{log} is not named run-<id>.wandb")
    project = entity = None
    exited = False
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            project, entity = record.run.project or project, record.run.entity or entity
        elif kind == "exit":
            exited = True
    return LocalRun(match["id"], project, entity, log.parent.name.startswith("offline-run-"), exited, log)


def unsynced_offline_runs(wandb_dir: Path) -> list[LocalRun]:
    """The offline runs under a `wandb/` folder that `wandb sync` has not uploaded (it leaves `<log>.synced`),
    oldest first."""
    runs = [run for run in find_local_runs(wandb_dir) if run.offline and not Path(f"{run.log}.synced").exists()]
    return sorted(runs, key=lambda run: run.log.parent.name)


def history_rows(log: Path) -> Iterator[dict[str, object]]:
    """The history rows of a `.wandb` log (what `run.log` wrote), keys as logged, values as JSON decodes them.
    Rows of a writer killed mid-run are those that reached the file: reading stops at a torn or damaged tail."""
    for record in _whole_records(log, "history"):
        row = {}
        for item in record.history.item:
            try:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            except ValueError:
                continue
        yield row


def alert_records(log: Path) -> Iterator[dict[str, object]]:
    """The alerts of a `.wandb` log (what `run.alert` wrote): title, text, level, as far as the file is whole."""
    for record in _whole_records(log, "alert"):
        yield {"title": record.alert.title, "text": record.alert.text, "level": record.alert.level}


def _whole_records(log: Path, record_type: str) -> Iterator[Any]:
    """The records of one type in a `.wandb` log, up to a torn or damaged tail."""
    records = read_records(log)
    while True:
        try:
            record = next(records)
        except (StopIteration, WandbLogError):
            return
        if record.WhichOneof("record_type") == record_type:
            yield record


def find_local_runs(wandb_dir: Path) -> list[LocalRun]:
    """The runs under a `wandb/` folder, newest first (by the log's modification time)."""
    logs = [p for p in Path(wandb_dir).glob("*run-*/run-*.wandb") if not p.parent.is_symlink()]
    runs = []
    for log in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            runs.append(describe_run(log))
        except (OSError, WandbLogError):
            continue
    return runs
