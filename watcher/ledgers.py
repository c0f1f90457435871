"""The journal's side tables, one ledger each, beside its checkpoints, jobs and results (watcher/journal.py):
process groups a daemon has running (`processes`), the Slurm jobs that run our jobs (`slurm_jobs`), and alert
firings with their deliveries (`alerts`, `alert_deliveries`). The tables themselves are in journal.py's schema;
`Transaction` is the one way every write here and there is committed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class ProcessRecord:
    pgid: int
    start_time: int
    role: str
    folder: Path | None
    daemon_pid: int


class ProcessLedger:
    """The journal's `processes` table: which process groups a daemon has running, so that the next daemon can
    stop what a killed one left behind (watcher/processes.py `stop_leftover`).

    Usable from any thread (the W&B delivery child is started from the outbox's background thread): each call
    opens its own short connection, as SQLite connections must not be shared between threads mid-transaction.
    """

    def __init__(self, path: Path):
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def add(self, pgid: int, start_time: int, role: str, folder: Path | None) -> None:
        db = self._connect()
        try:
            db.execute("INSERT OR REPLACE INTO processes (pgid, start_time, role, folder, daemon_pid, started_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (pgid, start_time, role, str(folder) if folder else None, os.getpid(), time.time()))  # fmt: skip
        finally:
            db.close()

    def remove(self, pgid: int) -> None:
        """Forget a group that has ended. Best effort: a row left behind (the disk is full) is harmless, as the
        next daemon stops only a group it can prove is the recorded one, and then forgets it."""
        try:
            db = self._connect()
            try:
                db.execute("DELETE FROM processes WHERE pgid = ?", (pgid,))
            finally:
                db.close()
        except sqlite3.Error:
            pass

    def all(self) -> list[ProcessRecord]:
        db = self._connect()
        try:
            rows = db.execute("SELECT pgid, start_time, role, folder, daemon_pid FROM processes ORDER BY started_at")
            return [ProcessRecord(pgid, start, role, Path(folder) if folder else None, daemon)
                    for pgid, start, role, folder, daemon in rows]  # fmt: skip
        finally:
            db.close()


@dataclass(frozen=True)
class SlurmRecord:
    """A row of the `slurm_jobs` table (see the schema)."""

    job_id: int
    attempt: int
    name: str
    slurm_id: str | None
    folder: Path
    log: Path
    submitted_at: float
    state: str | None
    reason: str | None
    cancelling: str | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> "SlurmRecord":
        return cls(row["job_id"], row["attempt"], row["name"], row["slurm_id"], Path(row["folder"]), Path(row["log"]),
                   row["submitted_at"], row["state"], row["reason"], row["cancelling"])  # fmt: skip


class SlurmLedger:
    """The journal's `slurm_jobs` table: which Slurm job runs which of our jobs. Used from the main loop only
    (it shares the journal's connection); every call is one committed write."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def submitting(self, job_id: int, attempt: int, name: str, folder: Path, log: Path) -> None:
        """Before sbatch: a crash between sbatch and `submitted` leaves this row, and the name finds the job."""
        with Transaction(self._db):
            self._db.execute("INSERT OR REPLACE INTO slurm_jobs (job_id, attempt, name, folder, log, submitted_at)"
                             " VALUES (?, ?, ?, ?, ?, ?)", (job_id, attempt, name, str(folder), str(log), time.time()))  # fmt: skip

    def submitted(self, job_id: int, slurm_id: str) -> None:
        with Transaction(self._db):
            self._db.execute("UPDATE slurm_jobs SET slurm_id = ?, state = 'PENDING', reason = NULL WHERE job_id = ?",
                             (slurm_id, job_id))  # fmt: skip

    def set_state(self, job_id: int, state: str, reason: str) -> None:
        with Transaction(self._db):
            self._db.execute("UPDATE slurm_jobs SET state = ?, reason = ? WHERE job_id = ?", (state, reason, job_id))

    def cancelling(self, job_id: int, why: str) -> None:
        with Transaction(self._db):
            self._db.execute("UPDATE slurm_jobs SET cancelling = ? WHERE job_id = ?", (why, job_id))

    def forget(self, job_id: int) -> None:
        with Transaction(self._db):
            self._db.execute("DELETE FROM slurm_jobs WHERE job_id = ?", (job_id,))

    def all(self) -> list[SlurmRecord]:
        rows = self._db.execute("SELECT * FROM slurm_jobs ORDER BY job_id").fetchall()
        return [SlurmRecord.of(row) for row in rows]


@dataclass(frozen=True)
class AlertRecord:
    """A row of the `alerts` table: one firing of one rule for one checkpoint generation."""

    id: int
    rule: str
    checkpoint: str
    generation: int
    step: int
    record: dict[str, Any]  # what alerts.jsonl and the sinks get (watcher/alerts.py `Firing.record`)
    fired_at: float

    @classmethod
    def of(cls, row: sqlite3.Row) -> "AlertRecord":
        return cls(row["id"], row["rule"], row["checkpoint"], row["generation"], row["step"], json.loads(row["record"]),
                   row["fired_at"])  # fmt: skip


class AlertLedger:
    """The journal's `alerts` and `alert_deliveries` tables. Used from the main loop only (it shares the
    journal's connection); every call is one committed write."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def fire(self, rule: str, checkpoint: str, generation: int, step: int, record: dict[str, Any]
             ) -> AlertRecord | None:  # fmt: skip
        """Journal a firing; None (nothing written) when this rule has fired for this checkpoint generation."""
        now = time.time()
        with Transaction(self._db):
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO alerts (rule, checkpoint, generation, step, record, fired_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (rule, checkpoint, generation, step, json.dumps(record, sort_keys=True, allow_nan=False),
                 now))  # fmt: skip
        if cursor.rowcount == 0:
            return None
        return AlertRecord(cursor.lastrowid, rule, checkpoint, generation, step, record, now)

    def all(self) -> list[AlertRecord]:
        """Every firing, in the order they fired."""
        return [AlertRecord.of(row) for row in self._db.execute("SELECT * FROM alerts ORDER BY id")]

    def undelivered(self, sink: str) -> list[AlertRecord]:
        rows = self._db.execute("SELECT * FROM alerts WHERE id NOT IN (SELECT alert_id FROM alert_deliveries"
                                " WHERE sink = ? AND state = 'delivered') ORDER BY id", (sink,))  # fmt: skip
        return [AlertRecord.of(row) for row in rows]

    def in_flight(self, sink: str) -> set[int]:
        rows = self._db.execute("SELECT alert_id FROM alert_deliveries WHERE sink = ? AND state = 'in_flight'", (sink,))
        return {row["alert_id"] for row in rows}

    def mark(self, alert_ids: Iterable[int], sink: str, state: str) -> None:
        """Note alerts as `in_flight` (before the sink sees them) or `delivered` (once it took them)."""
        assert state in ("in_flight", "delivered")
        now = time.time()
        with Transaction(self._db):
            self._db.executemany("INSERT OR REPLACE INTO alert_deliveries (alert_id, sink, state, at)"
                                 " VALUES (?, ?, ?, ?)", [(alert_id, sink, state, now) for alert_id in alert_ids])  # fmt: skip

    def clear_in_flight(self, alert_ids: Iterable[int], sink: str) -> None:
        """An attempt that sent nothing: these alerts are not in flight after all."""
        with Transaction(self._db):
            self._db.executemany("DELETE FROM alert_deliveries WHERE alert_id = ? AND sink = ? AND state = 'in_flight'",
                                 [(alert_id, sink) for alert_id in alert_ids])  # fmt: skip




class Transaction:
    """One committed transaction (BEGIN IMMEDIATE ... COMMIT) on the journal's connection; nested inside another
    it joins the outer one."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self._outer = db.in_transaction

    def __enter__(self):
        if not self._outer:
            self._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._outer:
            return False
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            return False
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            # A COMMIT that fails (the disk is full) may leave the transaction open; end it, so that the next
            # transition can BEGIN once there is room again. Nothing of this one was committed.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return False
