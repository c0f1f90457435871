"""Resource problems (a full disk, a quota, a folder we may not write) are a state of the daemon, not a crash.

`resource_problem` tells such an error apart from a bug: OSError with ENOSPC, EDQUOT, EACCES, EPERM or EROFS,
and SQLite's "database or disk is full" (and its read-only / cannot-open cousins). The daemon's loop runs each
stage under `ResourceState.guard`: the first such error is logged once (one line, not one per tick), the stage
is tried again after a backoff (1 s doubling to 60 s), the loop itself keeps running (so systemd's watchdog is
still fed and a running job is still supervised), and the line "... resolved" is logged when a stage succeeds
again. Nothing is lost meanwhile: results are committed to the journal before anything else, and an outcome
that could not be committed yet is kept in memory and committed once it can.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("ckpt-watch")

RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
_SQLITE_MESSAGES = ("database or disk is full", "attempt to write a readonly database", "unable to open database",
                    "disk i/o error")  # fmt: skip
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


def resource_problem(exc: BaseException) -> str | None:
    """One line describing `exc` if it is a resource problem (see the module docstring), else None."""
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or errno.errorcode.get(exc.errno, exc.errno)}{where}"
    if isinstance(exc, sqlite3.OperationalError) and any(m in str(exc).lower() for m in _SQLITE_MESSAGES):
        return f"journal: {exc}"
    return None


def out_of_space(exc: BaseException) -> bool:
    """A full disk or quota: something that time (or a person deleting files) mends, unlike a permission."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc).lower()


@dataclass
class ResourceState:
    problem: str | None = None  # the one-line description of the current problem, None when all is well
    since: float = 0.0  # time.time() when it began
    failures: int = 0
    _next_try: float = 0.0  # time.monotonic()

    def due(self) -> bool:
        """Whether stages that write may run now (always, unless a problem's backoff has not passed)."""
        return self.problem is None or time.monotonic() >= self._next_try

    def next_try_in(self) -> float | None:
        return None if self.problem is None else max(0.0, self._next_try - time.monotonic())

    @contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        """Run a stage; a resource problem inside it becomes this state (other exceptions pass through)."""
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            problem = resource_problem(exc)
            if problem is None:
                raise
            self.failed(stage, problem)

    def failed(self, stage: str, problem: str) -> None:
        if problem == self.problem and time.monotonic() < self._next_try:
            return  # a stage that must run every tick (supervising a job) hit it again: same wait, no new line
        self.failures += 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.failures - 1))
        self._next_try = time.monotonic() + delay
        if problem != self.problem:  # one line per new problem, not one per retry
            if self.problem is None:
                self.since = time.time()
            log.error("cannot %s: %s; the daemon keeps running and tries again (every %g s at most), nothing "
                      "finished is lost", stage, problem, MAX_BACKOFF)  # fmt: skip
            self.problem = problem

    def succeeded(self) -> bool:
        """Call after a round of stages without a problem; True if that ended one (it is logged)."""
        if self.problem is None:
            return False
        log.info("resolved after %.0f s: %s", time.time() - self.since, self.problem)
        self.problem, self.failures, self._next_try = None, 0, 0.0
        return True
