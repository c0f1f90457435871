"""Log output: `plain` lines, `json` lines, or records scrolling above the live view (see `log_format` in config.py).

`auto` picks the live view only for a person at a terminal: stdout is a TTY, TERM is not `dumb`, and the process
is not run by systemd (JOURNAL_STREAM or INVOCATION_ID set). Everything else gets `plain`: one line per record,
no colour, no escape codes. When stderr is connected to journald (JOURNAL_STREAM names exactly our stderr), plain
lines carry no timestamp (journald stamps each line) and start with a `<N>` syslog priority, which journald strips
and records as the entry's priority (`SyslogLevelPrefix=`, on by default), so `journalctl -p warning` works.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime
from typing import Any

LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into a JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd gave us (JOURNAL_STREAM is "DEVICE:INODE" of it)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def resolve_log_format(log_format: str) -> str:
    """`plain`, `json` or `live` (what `auto` means here and now)."""
    if log_format != "auto":
        return log_format
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "live" if tty and not under_systemd() and os.environ.get("TERM") != "dumb" else "plain"


class PlainFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL   message`, one line per record (newlines and escape codes in messages are flattened)."""

    def __init__(self, journal: bool = False):
        super().__init__("%(levelname)-7s %(message)s" if journal else "%(asctime)s %(levelname)-7s %(message)s",
                         datefmt="%H:%M:%S")  # fmt: skip
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = _ANSI.sub("", super().format(record))
        text = " | ".join(line.rstrip() for line in text.splitlines() if line.strip())
        if self.journal:
            text = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)}>{text}"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, local with offset), level, message, logger, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": _ANSI.sub("", record.getMessage()),
            "logger": record.name,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(verbosity: int, log_format: str = "plain", console: Any = None) -> None:
    """Configure the root logger once. `log_format`: plain, json, or live (records printed by the `rich`
    console the live view draws on, so they scroll above it instead of tearing it)."""
    level = LEVELS.get(verbosity, logging.INFO)
    if log_format == "live":
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False,
                                               log_time_format="%H:%M:%S")  # fmt: skip
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter(journal=stderr_is_journal()))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("ckpt-watch").setLevel(level)
    # watchdog logs its own thread's hiccups at error level; reconciliation scans already cover lost events.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
