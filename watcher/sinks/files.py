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
from watcher.sinks.base import SinkBase, SinkSettings

if TYPE_CHECKING:
    from watcher.sinks import SinkPlace

log = logging.getLogger("ckpt-watch")


def build(config: SinkSettings, place: SinkPlace) -> FileSink:
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
            write_json_atomic(self.result_path(result), result.to_dict())
        self._append_once(results)

    def _append_once(self, results: Sequence[Result]) -> None:
        # Deliveries happen in commit order, so a crash after an append but before the journal noted it can only
        # have left a first part of this batch (all of it, at most) as the file's last lines: records found among
        # the last len(results) lines are not appended again. A crash mid-append leaves a torn last line, which
        # is cut off before appending.
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a+b") as handle:
            lines, last_start, terminated = _last_lines(handle, len(results))
            data = b""
            if lines and not terminated:
                if _parsed(lines[-1]) is None:  # torn by a crash mid-append: cut off
                    handle.truncate(last_start)
                    lines = lines[:-1]
                else:  # whole but for its newline
                    data = b"\n"
            # A line that is not a JSON object (`[]`, `null`, a note: someone else's) is kept, appended after.
            present = {record.get("result_id") for line in lines if isinstance(record := _parsed(line), dict)}
            for result in results:
                if result.result_id not in present:
                    # raw backend output stays in the per-job JSON
                    summary = {k: v for k, v in result.to_dict().items() if k != "raw"}
                    data += (json.dumps(summary, sort_keys=True, allow_nan=False) + "\n").encode()
            if data:
                handle.write(data)  # "a" mode: always at the end
                handle.flush()
                os.fsync(handle.fileno())


def read_results(results_dir: Path) -> list[Result]:
    """Every result record in RESULTS_DIR/results.jsonl, in order. The file is a user's file too (edited, appended
    to by scripts), so a line that is not a result record (`[]`, `null`, a note) is skipped with one warning per
    read naming the lines; a torn last line (a crash mid-append, repaired by the next append) is skipped quietly."""
    path = results_dir / "results.jsonl"
    records: list[Result] = []
    skipped: list[int] = []
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
        if Result.is_record(record):
            records.append(Result.from_dict(record))
        elif number < len(lines):  # the last piece has no newline after it: torn, not foreign
            skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: skipped %d line(s) that are not result records (line %s)", path, len(skipped), shown)
    return records


def _parsed(line: bytes) -> Any:
    """A line as JSON, or None when it is not JSON."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # also UnicodeDecodeError
        return None


def _last_lines(handle, count: int) -> tuple[list[bytes], int, bool]:
    """Up to the file's last `count` lines (fewer if it has fewer), where the last one starts, and whether the
    file ends with a newline; ([], 0, True) if it is empty."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0 or count < 1:
        return [], size, True
    block = 1 << 16
    while True:  # read back from the end until the block holds `count` whole lines, or is the whole file
        block = min(size, block)
        handle.seek(size - block)
        data = handle.read(block)
        terminated = data.endswith(b"\n")
        body = data[:-1] if terminated else data
        if body.count(b"\n") >= count or block == size:
            break
        block *= 4
    lines = body.split(b"\n")
    if block < size:
        lines = lines[1:]  # the first piece may be part of a longer line
    lines = lines[-count:]
    return lines, size - (len(lines[-1]) + (1 if terminated else 0)), terminated
