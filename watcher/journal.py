"""The journal: durable state in SQLite (WAL), the single source of truth for what has been done.

One row per checkpoint generation, one row per job = (checkpoint generation, weight variant, preset), and each
finished job's result record. Job states:

    pending -> preparing -> evaluating -> done
                   |             |-----> failed (attempts left: back to pending after a backoff)
                   |-------------------> gone   (the trainer deleted or re-saved the checkpoint)
    pending -> skipped (policy `latest`: overtaken by a newer checkpoint)

Every transition is one committed transaction, so a SIGKILL at any moment leaves a consistent journal: a job
caught in preparing/evaluating is simply pending again at the next start. A result is committed here before
anything else happens to it; the files and other sinks are deliveries tracked per sink (the outbox). The side
tables (process groups, Slurm jobs, alert firings) have their ledgers in watcher/ledgers.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from watcher.ledgers import AlertLedger, AlertRecord, ProcessLedger, SlurmLedger, SlurmRecord, Transaction
from watcher.records import ACTIVE_STATES, JobState, Result

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    step         INTEGER NOT NULL,
    generation   INTEGER NOT NULL,
    path         TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    layout       TEXT NOT NULL,
    variants     TEXT NOT NULL,           -- JSON list of the weight variants the checkpoint holds
    completed_at REAL NOT NULL,           -- when ckpt-watch saw it complete and settled
    gone_at      REAL,                    -- when it was deleted or superseded by a re-save
    progress     TEXT,                    -- JSON {"train/epoch": .., "train/tokens": ..} read at detection
                                          -- (NULL in rows of older journals; the column is added when opened)
    UNIQUE (name, generation)
);
CREATE TABLE IF NOT EXISTS jobs (
    id              INTEGER PRIMARY KEY,
    checkpoint_id   INTEGER NOT NULL REFERENCES checkpoints(id),
    variant         TEXT NOT NULL,
    preset          TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    error           TEXT,
    UNIQUE (checkpoint_id, variant, preset)
);
CREATE TABLE IF NOT EXISTS results (
    result_id    TEXT PRIMARY KEY,
    job_id       INTEGER NOT NULL REFERENCES jobs(id),
    record       TEXT NOT NULL,           -- the full JSON record, exactly as delivered to every sink
    committed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    result_id    TEXT NOT NULL REFERENCES results(result_id),
    sink         TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (result_id, sink)
);
-- A batch handed to a sink and not yet acknowledged: noted before the sink sees it, gone with the delivery's
-- note. A row left here by a crash means "the target may hold this already": the outbox asks the sink what
-- its target holds before sending again (at-most-once per result and sink). Journals of older versions
-- gain the table when opened (CREATE TABLE IF NOT EXISTS), with nothing in flight.
CREATE TABLE IF NOT EXISTS in_flight (
    result_id    TEXT NOT NULL REFERENCES results(result_id),
    sink         TEXT NOT NULL,
    sent_at      REAL NOT NULL,
    PRIMARY KEY (result_id, sink)
);
CREATE TABLE IF NOT EXISTS meta (
    key          TEXT PRIMARY KEY,
    value        TEXT NOT NULL         -- JSON
);
CREATE TABLE IF NOT EXISTS processes (   -- process groups started and not yet stopped (watcher/processes.py)
    pgid         INTEGER PRIMARY KEY,     -- the group leader's pid
    start_time   INTEGER NOT NULL,        -- the leader's start time, clock ticks (/proc/<pid>/stat field 22)
    role         TEXT NOT NULL,           -- "job 12", "wandb delivery"
    folder       TEXT,                    -- its private folder (spec files, scratch), removed with it
    daemon_pid   INTEGER NOT NULL,
    started_at   REAL NOT NULL
);
-- Jobs handed to Slurm (executor = "slurm", watcher/slurm_jobs.py), from just before sbatch until their outcome
-- is recorded. A daemon started after a stop or a kill -9 adopts the ones still queued or running from here.
CREATE TABLE IF NOT EXISTS slurm_jobs (
    job_id       INTEGER PRIMARY KEY REFERENCES jobs(id),
    attempt      INTEGER NOT NULL,        -- the job's attempt this Slurm job runs
    name         TEXT NOT NULL,           -- its unique Slurm job name: finds it when sbatch's answer was lost
    slurm_id     TEXT,                    -- NULL until sbatch answered
    folder       TEXT NOT NULL,           -- its job folder (spec, stage file, outcome) on the shared filesystem
    log          TEXT NOT NULL,           -- where Slurm appends its stdout and stderr
    submitted_at REAL NOT NULL,
    state        TEXT,                    -- Slurm's state and reason as last read (for `status`)
    reason       TEXT,
    cancelling   TEXT                     -- why ckpt-watch cancels it, written before scancel (Slurm never says who)
);
-- Alert rules that fired (watcher/alerts.py): a rule fires at most once for a checkpoint generation, across
-- restarts and results that arrive again. RESULTS_DIR/alerts.jsonl is written from here.
CREATE TABLE IF NOT EXISTS alerts (
    id           INTEGER PRIMARY KEY,
    rule         TEXT NOT NULL,           -- the rule's name
    checkpoint   TEXT NOT NULL,
    generation   INTEGER NOT NULL,
    step         INTEGER NOT NULL,
    record       TEXT NOT NULL,           -- the alert as alerts.jsonl and the sinks get it (JSON)
    fired_at     REAL NOT NULL,
    UNIQUE (rule, checkpoint, generation)
);
-- Alerts handed to a sink that takes them (`alerts` capability: W&B), like results' deliveries and in_flight:
-- "in_flight" is noted before the sink sees the alert, "delivered" once it took it.
CREATE TABLE IF NOT EXISTS alert_deliveries (
    alert_id     INTEGER NOT NULL REFERENCES alerts(id),
    sink         TEXT NOT NULL,
    state        TEXT NOT NULL,           -- in_flight | delivered
    at           REAL NOT NULL,
    PRIMARY KEY (alert_id, sink)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
"""


@dataclass(frozen=True)
class Checkpoint:
    id: int
    name: str
    step: int
    generation: int
    path: Path
    fingerprint: str
    layout: str
    variants: tuple[str, ...]
    gone: bool
    progress: dict[str, float] = field(default_factory=dict)  # train/epoch, train/tokens (watcher/detect.py)


@dataclass(frozen=True)
class Job:
    """A job joined with its checkpoint: everything the scheduler and the runner need."""

    id: int
    state: JobState
    variant: str
    preset: str
    attempts: int
    next_attempt_at: float
    error: str | None
    checkpoint: Checkpoint

    @property
    def label(self) -> str:
        """How logs, the live view and `status` name it: "checkpoint-20/regular/smoke"."""
        return f"{self.checkpoint.name}/{self.variant}/{self.preset}"


class Journal:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so each transition is exactly one transaction.
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed result survives power loss, not only a crash
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)  # CREATE ... IF NOT EXISTS: an older journal gains the newer tables
        _add_missing_columns(self._db)
        self.processes = ProcessLedger(path)
        self.slurm = SlurmLedger(self._db)
        self.alerts = AlertLedger(self._db)

    def close(self) -> None:
        self._db.close()

    def _tx(self):
        return Transaction(self._db)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def latest_checkpoint(self, name: str) -> Checkpoint | None:
        row = self._db.execute(
            "SELECT * FROM checkpoints WHERE name = ? ORDER BY generation DESC LIMIT 1", (name,)
        ).fetchone()
        return _checkpoint(row) if row else None

    def present_checkpoints(self) -> list[Checkpoint]:
        rows = self._db.execute("SELECT * FROM checkpoints WHERE gone_at IS NULL ORDER BY step, generation")
        return [_checkpoint(r) for r in rows]

    def all_checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint ever journaled, deleted and superseded ones too, in step order."""
        return [_checkpoint(r) for r in self._db.execute("SELECT * FROM checkpoints ORDER BY step, generation")]

    def checkpoints_without_progress(self) -> list[Checkpoint]:
        """Present checkpoints admitted by a version that did not journal progress yet (NULL, not "{}")."""
        rows = self._db.execute("SELECT * FROM checkpoints WHERE gone_at IS NULL AND progress IS NULL")
        return [_checkpoint(r) for r in rows]

    def set_progress(self, checkpoint_id: int, progress: dict[str, float]) -> None:
        with self._tx():
            self._db.execute("UPDATE checkpoints SET progress = ? WHERE id = ?", (json.dumps(progress), checkpoint_id))

    def add_checkpoint(
        self, name: str, step: int, path: Path, fingerprint: str, layout: str, variants: Iterable[str],
        progress: dict[str, float] | None = None,
    ) -> Checkpoint:
        """Record a complete checkpoint. A new fingerprint under a known name is a new generation (a re-save).
        `progress`: the training progress it records (see `watcher.detect.read_progress`)."""
        now = time.time()
        with self._tx():
            previous = self.latest_checkpoint(name)
            generation = 1
            if previous is not None:
                generation = previous.generation + 1
                if not previous.gone:
                    self._mark_gone(previous.id, now, "superseded by a re-save of the checkpoint")
            variants = tuple(variants)
            cursor = self._db.execute(
                "INSERT INTO checkpoints (name, step, generation, path, fingerprint, layout, variants, completed_at,"
                " progress) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, step, generation, str(path), fingerprint, layout, json.dumps(list(variants)), now,
                 json.dumps(progress or {})),
            )  # fmt: skip
        return Checkpoint(cursor.lastrowid, name, step, generation, Path(path), fingerprint, layout, variants,
                          gone=False, progress=dict(progress or {}))  # fmt: skip

    def checkpoint_gone(self, checkpoint_id: int) -> bool:
        """Whether the journal has this checkpoint as gone (deleted, or superseded by a re-save)."""
        row = self._db.execute("SELECT gone_at FROM checkpoints WHERE id = ?", (checkpoint_id,)).fetchone()
        return row is None or row["gone_at"] is not None

    def mark_gone(self, checkpoint_id: int, reason: str = "checkpoint folder was deleted") -> None:
        with self._tx():
            self._mark_gone(checkpoint_id, time.time(), reason)

    def _mark_gone(self, checkpoint_id: int, now: float, reason: str) -> None:
        self._db.execute("UPDATE checkpoints SET gone_at = ? WHERE id = ? AND gone_at IS NULL", (now, checkpoint_id))
        self._db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE checkpoint_id = ? AND state NOT IN (?, ?, ?)",
            (JobState.GONE, now, reason, checkpoint_id, JobState.DONE, JobState.FAILED, JobState.GONE),
        )

    # --- jobs ------------------------------------------------------------------------------------------------

    def ensure_jobs(self, wanted: Iterable[tuple[Checkpoint, str, str]]) -> None:
        """Create the (checkpoint, variant, preset) jobs the schedule wants; existing ones are left as they are."""
        now = time.time()
        with self._tx():
            self._db.executemany(
                "INSERT OR IGNORE INTO jobs (checkpoint_id, variant, preset, state, created_at) VALUES (?, ?, ?, ?, ?)",
                [(checkpoint.id, variant, preset, JobState.PENDING, now) for checkpoint, variant, preset in wanted],
            )

    def job(self, job_id: int) -> Job:
        return self._jobs("WHERE jobs.id = ?", (job_id,))[0]

    def jobs(self, preset: str | None = None, states: Iterable[JobState] | None = None) -> list[Job]:
        return self._jobs(*_job_filter(preset, states))

    def _jobs(self, where: str, params: tuple) -> list[Job]:
        rows = self._db.execute(
            "SELECT jobs.id AS job_id, jobs.state, jobs.variant, jobs.preset, jobs.attempts, jobs.next_attempt_at,"
            " jobs.error, checkpoints.* FROM jobs JOIN checkpoints ON checkpoints.id = jobs.checkpoint_id "
            f"{where} ORDER BY checkpoints.step, checkpoints.generation, jobs.variant DESC",
            params,
        )
        return [_job(r) for r in rows]

    def recover_interrupted(self, running: Iterable[int] = ()) -> int:
        """Jobs caught mid-run by a crash or stop are pending again; the interrupted attempt does not count.
        `running`: ids of jobs that do run (left as they are)."""
        keep = tuple(running)
        with self._tx():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), next_attempt_at = 0,"
                f" error = 'interrupted: ckpt-watch stopped during this job' WHERE state IN {_ACTIVE}"
                f" AND id NOT IN ({','.join('?' * len(keep))})",
                (JobState.PENDING, *ACTIVE_STATES, *keep),
            )
        return cursor.rowcount

    def put_back(self, job_id: int, reason: str) -> None:
        """One running job is pending again at once, its attempt not counted (as `recover_interrupted` does)."""
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), next_attempt_at = 0, error = ?"
                f" WHERE id = ? AND state IN {_ACTIVE}",
                (JobState.PENDING, reason, job_id, *ACTIVE_STATES),
            )

    def start(self, job: Job) -> Job | None:
        """A pending job begins an attempt. Returns the job as it now is in the journal (the write's own result,
        not read back), or None when it was not pending."""
        with self._tx():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?, finished_at = NULL"
                " WHERE id = ? AND state = ? RETURNING attempts",
                (JobState.PREPARING, time.time(), job.id, JobState.PENDING),
            )
            rows = cursor.fetchall()  # all of them: a RETURNING statement ends only once read to the end
        return replace(job, state=JobState.PREPARING, attempts=rows[0]["attempts"]) if rows else None

    def set_stage(self, job_id: int, state: JobState) -> None:
        assert state in ACTIVE_STATES
        with self._tx():
            self._db.execute(
                f"UPDATE jobs SET state = ? WHERE id = ? AND state IN {_ACTIVE}", (state, job_id, *ACTIVE_STATES)
            )

    def retry_later(self, job_id: int, error: str, delay: float) -> None:
        """A failed attempt with attempts left: pending again once `delay` seconds have passed."""
        now = time.time()
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, next_attempt_at = ?"
                f" WHERE id = ? AND state IN {_ACTIVE}",
                (JobState.PENDING, error, now, now + delay, job_id, *ACTIVE_STATES),
            )

    def finish(self, job_id: int, result: Result) -> bool:
        """Commit a job's final outcome (done or failed) and its result record in one transaction.

        Returns False, committing nothing, if the job is no longer running (its checkpoint went away meanwhile).
        """
        state = JobState.DONE if result.ok else JobState.FAILED
        now = time.time()
        with self._tx():
            cursor = self._db.execute(
                f"UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ? AND state IN {_ACTIVE}",
                (state, now, result.error, job_id, *ACTIVE_STATES),
            )
            if cursor.rowcount == 0:
                return False
            self._db.execute(
                "INSERT INTO results (result_id, job_id, record, committed_at) VALUES (?, ?, ?, ?)",
                (result.result_id, job_id, json.dumps(result.to_dict(), sort_keys=True, allow_nan=False), now),
            )
        return True

    def skip(self, job_ids: Iterable[int], reason: str, started: bool = False) -> None:
        """Pending jobs `latest` gave up on are skipped; with `started`, also ones already handed out (a Slurm
        job still queued when it was overtaken, cancelled by the caller)."""
        states = (JobState.PENDING, *ACTIVE_STATES) if started else (JobState.PENDING,)
        with self._tx():
            for job_id in job_ids:
                self._db.execute(
                    "UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?"
                    f" AND state IN ({', '.join('?' * len(states))})",
                    (JobState.SKIPPED, reason, time.time(), job_id, *states),
                )

    def requeue(self, preset: str, states: Iterable[JobState]) -> int:
        """Put finished-but-unsuccessful jobs (failed, skipped) of present checkpoints back to pending."""
        states = list(states)
        with self._tx():
            cursor = self._db.execute(
                f"UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = 0 WHERE preset = ?"
                f" AND state IN ({','.join('?' * len(states))})"
                " AND checkpoint_id IN (SELECT id FROM checkpoints WHERE gone_at IS NULL)",
                (JobState.PENDING, preset, *states),
            )
        return cursor.rowcount

    # --- results and their delivery (the outbox) -------------------------------------------------------------

    def results(self) -> list[Result]:
        rows = self._db.execute("SELECT record FROM results ORDER BY committed_at")
        return [Result.from_dict(json.loads(r["record"])) for r in rows]

    def undelivered(self, sink: str) -> list[Result]:
        rows = self._db.execute(
            "SELECT record FROM results WHERE result_id NOT IN (SELECT result_id FROM deliveries WHERE sink = ?)"
            " ORDER BY committed_at",
            (sink,),
        )
        return [Result.from_dict(json.loads(r["record"])) for r in rows]

    def undelivered_count(self, sink: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM results WHERE result_id NOT IN (SELECT result_id FROM deliveries WHERE sink = ?)",
            (sink,),
        ).fetchone()
        return int(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        """Facts about the running daemon that readers need, e.g. "sinks": the sinks results are delivered to
        (so `ckpt-watch status` knows which deliveries are pending without knowing the daemon's flags)."""
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def mark_delivered(self, result_id: str, sink: str) -> None:
        self.mark_delivered_many([result_id], sink)

    def mark_delivered_many(self, result_ids: list[str], sink: str) -> None:
        """One transaction for a whole batch: a sink took all of them or none. They are no longer in flight."""
        now = time.time()
        with self._tx():
            self._db.executemany(
                "INSERT OR IGNORE INTO deliveries (result_id, sink, delivered_at) VALUES (?, ?, ?)",
                [(result_id, sink, now) for result_id in result_ids],
            )
            self._db.executemany(
                "DELETE FROM in_flight WHERE result_id = ? AND sink = ?", [(result_id, sink) for result_id in result_ids]
            )

    def mark_in_flight(self, result_ids: list[str], sink: str) -> None:
        """Committed before a sink is handed these results (see the in_flight table)."""
        now = time.time()
        with self._tx():
            self._db.executemany(
                "INSERT OR IGNORE INTO in_flight (result_id, sink, sent_at) VALUES (?, ?, ?)",
                [(result_id, sink, now) for result_id in result_ids],
            )

    def clear_in_flight(self, result_ids: list[str], sink: str) -> None:
        """An attempt that sent nothing (the sink said so): these are not in flight after all."""
        with self._tx():
            self._db.executemany(
                "DELETE FROM in_flight WHERE result_id = ? AND sink = ?", [(result_id, sink) for result_id in result_ids]
            )

    def in_flight(self, sink: str) -> set[str]:
        """Results handed to `sink` by an attempt that never reported back (a crash, a failure mid-batch)."""
        rows = self._db.execute("SELECT result_id FROM in_flight WHERE sink = ?", (sink,))
        return {r["result_id"] for r in rows}


_ACTIVE = f"({', '.join('?' * len(ACTIVE_STATES))})"  # SQL placeholders for the active states


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Columns newer versions added to existing tables: ALTER TABLE on a journal of an older version."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(checkpoints)")}
    if "progress" not in columns:
        db.execute("ALTER TABLE checkpoints ADD COLUMN progress TEXT")


def _checkpoint(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(
        id=row["id"],
        name=row["name"],
        step=row["step"],
        generation=row["generation"],
        path=Path(row["path"]),
        fingerprint=row["fingerprint"],
        layout=row["layout"],
        variants=tuple(json.loads(row["variants"])),
        gone=row["gone_at"] is not None,
        # NULL in rows of older journals; no column at all in one the read-only reader opens unmigrated
        progress=json.loads(row["progress"]) if "progress" in row.keys() and row["progress"] else {},
    )


def _job_filter(preset: str | None, states: Iterable[JobState] | None) -> tuple[str, tuple]:
    """The WHERE clause (and its parameters) for the jobs of one preset and/or in some states."""
    clauses, params = [], []
    if preset is not None:
        clauses.append("jobs.preset = ?")
        params.append(preset)
    if states is not None:
        states = [str(state) for state in states]
        clauses.append(f"jobs.state IN ({','.join('?' * len(states))})")
        params.extend(states)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)


def _job(row: sqlite3.Row, cls: type[Job] = Job, **more: Any) -> Job:
    """A job from a row of the jobs joined with their checkpoints (the job's id as `job_id`)."""
    return cls(id=row["job_id"], state=JobState(row["state"]), variant=row["variant"], preset=row["preset"],
               attempts=row["attempts"], next_attempt_at=row["next_attempt_at"], error=row["error"],
               checkpoint=_checkpoint(row), **more)  # fmt: skip


# --- reading without writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow(Job):
    """A job as a reader sees it: with when it was created, last started and finished (Unix seconds)."""

    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class CheckpointRow(Checkpoint):
    """A checkpoint as a reader sees it: with when it was seen complete and when it went (Unix seconds)."""

    completed_at: float = 0.0
    gone_at: float | None = None


class JournalReader:
    """The journal, read-only (SQLite `mode=ro`): never creates, migrates or changes it. Safe beside a running
    daemon: with WAL a reader sees the last committed state while the daemon writes. `ckpt-watch status` and
    the tests read the journal through this, never with SQL of their own.

    A journal the daemon has only just created (no tables yet) reads as empty, and the tables an older version
    lacked read as having no rows. `with reader.snapshot():` makes several reads see one state.
    """

    BUSY_TIMEOUT = 10.0  # seconds; WAL readers are not blocked by the writer, only by a checkpoint's brief locks

    def __init__(self, path: Path):
        if not path.is_file():  # mode=ro would fail too, but with SQLite's vaguer "unable to open database file"
            raise FileNotFoundError(path)
        self.path = path
        self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=self.BUSY_TIMEOUT,
                                   isolation_level=None)  # fmt: skip
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JournalReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def snapshot(self) -> Iterator["JournalReader"]:
        """One read transaction: every read inside it sees the same committed state."""
        self._db.execute("BEGIN")
        try:
            yield self
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _rows(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def jobs(self, preset: str | None = None, states: Iterable[JobState] | None = None) -> list[JobRow]:
        """Ordered by step, generation, variant (regular before ema) and preset."""
        where, params = _job_filter(preset, states)
        rows = self._rows(
            "SELECT jobs.id AS job_id, jobs.state, jobs.variant, jobs.preset, jobs.attempts, jobs.next_attempt_at,"
            " jobs.error, jobs.created_at AS job_created_at, jobs.started_at AS job_started_at,"
            " jobs.finished_at AS job_finished_at, checkpoints.* FROM jobs"
            f" JOIN checkpoints ON checkpoints.id = jobs.checkpoint_id {where}"
            " ORDER BY checkpoints.step, checkpoints.generation, jobs.variant DESC, jobs.preset",
            params,
        )
        return [_job(r, JobRow, created_at=r["job_created_at"], started_at=r["job_started_at"],
                     finished_at=r["job_finished_at"]) for r in rows]  # fmt: skip

    def checkpoints(self) -> list[CheckpointRow]:
        """Every checkpoint generation ever recorded, gone ones included, by step and generation."""
        rows = self._rows("SELECT * FROM checkpoints ORDER BY step, generation")
        return [CheckpointRow(**vars(_checkpoint(r)), completed_at=r["completed_at"], gone_at=r["gone_at"])
                for r in rows]  # fmt: skip

    def results(self) -> list[Result]:
        """Every committed result, oldest first."""
        return [Result.from_dict(json.loads(r["record"])) for r in self._rows("SELECT record FROM results ORDER BY committed_at")]

    def latest_results(self) -> dict[int, Result]:
        """Each job's newest result, by job id."""
        rows = self._rows("SELECT job_id, record FROM results ORDER BY committed_at")
        return {r["job_id"]: Result.from_dict(json.loads(r["record"])) for r in rows}

    def delivered_to(self) -> dict[str, set[str]]:
        """result id -> the sinks that have taken it."""
        delivered: dict[str, set[str]] = {}
        for row in self._rows("SELECT result_id, sink FROM deliveries"):
            delivered.setdefault(row["result_id"], set()).add(row["sink"])
        return delivered

    def undelivered_count(self, sink: str) -> int:
        rows = self._rows("SELECT COUNT(*) FROM results WHERE result_id NOT IN"
                          " (SELECT result_id FROM deliveries WHERE sink = ?)", (sink,))  # fmt: skip
        return int(rows[0][0]) if rows else 0

    def meta(self, key: str) -> Any:
        """A fact the daemon recorded with `Journal.set_meta` (its JSON value), None when it has not."""
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else None

    def slurm_jobs(self) -> list[SlurmRecord]:
        """The Slurm jobs the daemon has handed out (empty for the local executor, or a journal of an older
        version)."""
        return [SlurmRecord.of(row) for row in self._rows("SELECT * FROM slurm_jobs ORDER BY job_id")]

    def alerts(self) -> list[AlertRecord]:
        """The alert rules' firings, in the order they fired (empty for a journal of an older version)."""
        return [AlertRecord.of(row) for row in self._rows("SELECT * FROM alerts ORDER BY id")]

    def alert_deliveries(self) -> dict[int, dict[str, str]]:
        """alert id -> {sink: "in_flight" | "delivered"}."""
        found: dict[int, dict[str, str]] = {}
        for row in self._rows("SELECT alert_id, sink, state FROM alert_deliveries"):
            found.setdefault(row["alert_id"], {})[row["sink"]] = row["state"]
        return found
