"""The files sink: RESULTS_DIR/<checkpoint>/<variant>/<preset>.json per job (<preset>.gN.json for a re-save's
generation N), and results.jsonl.

Idempotent, as the outbox needs (see watcher/sinks/base.py): delivering the same result twice leaves the
same files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from watcher.atomic import write_json_atomic
from watcher.records import Result
from watcher.sinks.base import SinkBase

if TYPE_CHECKING:
    from watcher.config import WatchConfig
    from watcher.sinks import SinkPlace

log = logging.getLogger("ckpt-watch")


def build(config: WatchConfig, place: SinkPlace) -> FileSink:
    """Always on: the results dir is the record every other reader (status, compare, plot) reads."""
    return FileSink(place.results_dir)


class FileSink(SinkBase):
    """RESULTS_DIR/<checkpoint>/<variant>/<preset>[.gN].json per job, plus one line per job in results.jsonl."""

    name = "files"
    idempotent = True  # see `_append_once`

    def __init__(self, results_dir: Path):
        self.results_dir = results_dir
        self.jsonl = results_dir / "results.jsonl"

    def result_path(self, result: Result) -> Path:
        """RESULTS_DIR/<checkpoint>/<variant>/<preset>.json for a checkpoint's first generation, and
        <preset>.gN.json for its re-saves (generation N), so that no generation's record replaces another's."""
        generation = result.generation
        suffix = f".g{generation}" if type(generation) is int and generation > 1 else ""
        return self.results_dir / result.checkpoint / result.variant / f"{result.preset}{suffix}.json"

    def deliver(self, results: Sequence[Result]) -> None:
        for result in results:
            record = result.to_dict()
            write_json_atomic(self.result_path(result), record)
            self._append_once(record)

    def _append_once(self, record: dict[str, Any]) -> None:
        # Deliveries happen one at a time, in commit order, so a crash after the append but before the journal
        # noted it can only have left this record as the file's last line: checking that line makes the append
        # idempotent. A crash mid-append leaves a torn last line, which is cut off before appending.
        summary = {k: v for k, v in record.items() if k != "raw"}  # raw backend output stays in the per-job JSON
        line = (json.dumps(summary, sort_keys=True, allow_nan=False) + "\n").encode()
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a+b") as handle:
            last, last_start, terminated = _last_line(handle)
            if last is not None:
                try:
                    previous = json.loads(last)
                except (ValueError, RecursionError):
                    if not terminated:  # torn by a crash mid-append: cut off
                        handle.truncate(last_start)
                        previous = None
                    else:  # a whole line that is not JSON (someone else's): kept, appended after
                        previous = {}
                if previous is not None:
                    # A line that is JSON but not an object (`[]`, `null`) is someone else's too: kept.
                    same = isinstance(previous, dict) and previous.get("result_id") == record["result_id"]
                    if not terminated:
                        line = b"\n" if same else b"\n" + line
                    elif same:
                        return
            handle.write(line)  # "a" mode: always at the end
            handle.flush()
            os.fsync(handle.fileno())


def read_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every result record in RESULTS_DIR/results.jsonl, in order. The file is a user's file too (edited, appended
    to by scripts), so a line that is not a result record (`[]`, `null`, a note) is skipped with one warning per
    read naming the lines; a torn last line (a crash mid-append, repaired by the next append) is skipped quietly."""
    path = results_dir / "results.jsonl"
    records, skipped = [], []
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # also UnicodeDecodeError
            record = None
        if is_result_record(record):
            records.append(record)
        elif number < len(lines):  # the last piece has no newline after it: torn, not foreign
            skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: skipped %d line(s) that are not result records (line %s)", path, len(skipped), shown)
    return records


def is_result_record(value: Any) -> bool:
    """A JSON object with the fields every reader relies on (watcher.records.Result.is_record)."""
    return Result.is_record(value)


def _last_line(handle) -> tuple[bytes | None, int, bool]:
    """The file's last line, where it starts, and whether it ends with a newline; (None, 0, True) if empty."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return None, 0, True
    block = min(size, 1 << 20)
    handle.seek(size - block)
    data = handle.read(block)
    terminated = data.endswith(b"\n")
    body = data[:-1] if terminated else data
    cut = body.rfind(b"\n")
    return body[cut + 1 :], size - block + cut + 1, terminated
