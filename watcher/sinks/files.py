"""The files sink: RESULTS_DIR/<checkpoint>/<variant>/<preset>.json per job, and results.jsonl.

Idempotent, as the outbox needs (see watcher/sinks/__init__.py): delivering the same record twice leaves the
same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from watcher.atomic import write_json_atomic


class FileSink:
    """RESULTS_DIR/<checkpoint>/<variant>/<preset>.json per job, plus one line per job in results.jsonl."""

    name = "files"

    def __init__(self, results_dir: Path):
        self.results_dir = results_dir
        self.jsonl = results_dir / "results.jsonl"

    def result_path(self, record: dict[str, Any]) -> Path:
        return self.results_dir / record["checkpoint"] / record["variant"] / f"{record['preset']}.json"

    def deliver(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            write_json_atomic(self.result_path(record), record)
            self._append_once(record)

    def close(self) -> None:
        pass

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
                except ValueError:
                    handle.truncate(last_start)
                else:
                    if not terminated:
                        line = b"\n" + line if previous.get("result_id") != record["result_id"] else b"\n"
                    elif previous.get("result_id") == record["result_id"]:
                        return
            handle.write(line)  # "a" mode: always at the end
            handle.flush()
            os.fsync(handle.fileno())


def read_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every record in RESULTS_DIR/results.jsonl, in order; a torn last line (a crash mid-append) is skipped."""
    path = results_dir / "results.jsonl"
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


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
