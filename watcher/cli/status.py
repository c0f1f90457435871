"""`ckpt-watch status OUTPUT_DIR [--json]`: every checkpoint x variant x preset, where it stands, at a glance.

    ckpt-watch status OUTPUT_DIR [--preset NAME] [--config FILE] [--results-dir DIR] [--json [--pool]]

Reads the journal (read-only, safe while the daemon runs: SQLite's WAL lets a reader see the last committed
state while the daemon writes) and lists each job with its state, attempts, start and finish times, wall
time, its error if it failed, the sinks its result is still waiting for, and a few headline metrics.

Above the table: whether a daemon runs (it holds the results dir's lock), and while one does, its pool as it
recorded it in the journal (meta "pool", see Daemon._note_waiting): each slot with its job, that job's stage and
time so far, or why the slot is not offered; the pending jobs per preset; why the first few jobs wait.
`--json` stays a list of rows; `--json --pool` prints {"jobs": rows, "pool": ...} instead.

The headline metrics shown are chosen by watcher/metrics.py (`headline_metrics`). A headline value significantly
worse than the best of the earlier checkpoints (same variant and preset; two-sided z-test at 0.05 on both results'
standard errors, watcher/regressions.py) is marked "▼" in the table and explained below it; `--json` rows carry
it as "regression" (the most significant one, or null: metric, best_step, best_value, value, z, p) and
"regressions" (every one). A metric without a standard error (most probes, custom commands) is never flagged:
without one a drop cannot be told from noise.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from watcher.config import ConfigError
from watcher.journal import JobRow, JournalReader
from watcher.ledgers import SlurmRecord
from watcher.metrics import headline_metrics
from watcher.records import Result, iso_time
from watcher.regressions import REGRESSION_LEVEL, Regression, find_regressions


# --- reading the journal -------------------------------------------------------------------------------------


def read_status(journal_path: Path, expected_sinks: Iterable[str] | None = None, preset: str | None = None,
                now: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One dict per job (stable keys, see `ROW_KEYS`), ordered by step, generation, variant, preset."""
    now = time.time() if now is None else now
    try:
        reader = JournalReader(journal_path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open the journal {journal_path}: {exc}") from None
    try:
        with reader, reader.snapshot():  # one state for every read below
            jobs = reader.jobs()
            latest = reader.latest_results()
            recorded = reader.meta("sinks")  # the sinks the daemon delivers to, as it recorded them
            delivered = reader.delivered_to()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot read the journal {journal_path}: {exc}") from None
    if recorded is not None and expected_sinks is None:
        expected_sinks = recorded
    sinks = sorted(set(expected_sinks or ("files",)) | {s for seen in delivered.values() for s in seen})
    if preset is not None:
        known = sorted({job.preset for job in jobs})
        jobs = [job for job in jobs if job.preset == preset]
        if not jobs and known:
            raise ConfigError(f"no jobs of preset {preset!r} in the journal (it has: {', '.join(known)})")
    shown = [latest[job.id] for job in jobs if job.id in latest]
    headlines = headline_metrics({m for r in shown if r.ok for m in r.metrics})
    regressed = find_regressions(shown, headlines)
    rows = []
    for job in jobs:
        result = latest.get(job.id)
        metrics = result.metrics if result and job.state == "done" else {}
        flags = regressed.get(result.result_id, []) if metrics else []
        rows.append({
            "checkpoint": job.checkpoint.name,
            "step": job.checkpoint.step,
            "generation": job.checkpoint.generation,
            "checkpoint_gone": job.checkpoint.gone,
            "variant": job.variant,
            "preset": job.preset,
            "state": str(job.state),
            "attempts": job.attempts,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "walltime_s": _walltime(job, result, now),
            "next_attempt_at": _iso(job.next_attempt_at) if job.state == "pending" and job.attempts else None,
            "error": job.error,
            "result_id": result.result_id if result else None,
            "pending_sinks": [s for s in sinks if s not in delivered.get(result.result_id, ())] if result else [],
            "metrics": {name: metrics.get(name) for name in headlines},
            "regression": min(flags, key=lambda f: f.p).to_dict() if flags else None,
            "regressions": [flag.to_dict() for flag in flags],
        })  # fmt: skip
    return rows


ROW_KEYS = ("checkpoint", "step", "generation", "checkpoint_gone", "variant", "preset", "state", "attempts",
            "created_at", "started_at", "finished_at", "walltime_s", "next_attempt_at", "error", "result_id",
            "pending_sinks", "metrics", "regression", "regressions")  # fmt: skip


def _walltime(job: JobRow, result: Result | None, now: float) -> float | None:
    """The result's wall time for a finished job; the time so far for a running one."""
    if job.state in ("preparing", "evaluating") and job.started_at:
        return round(now - job.started_at, 1)
    if result is not None and job.state in ("done", "failed"):
        return result.walltime_s
    return None


LOW_SPACE = 1 << 20  # bytes: below this, a filesystem counts as full (SQLite needs room for its WAL)


def resource_problems(journal_path: Path, results_dir: Path) -> list[str]:
    """What keeps the daemon waiting (watcher/resources.py): the problem it recorded in the journal, and a full
    filesystem under the results dir or the journal, seen here directly (a full disk is exactly when the daemon
    cannot record it)."""
    problems = []
    try:
        with JournalReader(journal_path) as reader:
            recorded = reader.meta("resources")
    except (OSError, sqlite3.Error, ValueError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("problem"):
        since = _iso(recorded.get("since"))
        problems.append(f"waiting since {_short_time(since)}: {recorded['problem']}")
    seen = set()
    for what, folder in (("results dir", results_dir), ("journal", journal_path.parent)):
        try:
            fs, device = os.statvfs(folder), os.stat(folder).st_dev
        except OSError:
            continue
        if device in seen:
            continue
        seen.add(device)
        free = fs.f_bavail * fs.f_frsize
        if free < LOW_SPACE:
            problems.append(f"the filesystem of the {what} {folder} is full ({free} bytes free): the daemon waits "
                            "until there is room")  # fmt: skip
    return list(dict.fromkeys(problems))


def _iso(seconds: float | None) -> str | None:
    return iso_time(seconds) if seconds else None


# --- the daemon's pool ---------------------------------------------------------------------------------------

WAITING_SHOWN = 5  # why-lines shown under "waiting:"; the JSON has every one the daemon recorded


@dataclass(frozen=True)
class PoolStatus:
    """Whether a daemon runs on this results dir, and its pool as it last recorded it (None: never recorded)."""

    daemon_running: bool
    daemon_pid: str | None  # as the daemon wrote it into its lock file
    recorded: dict[str, Any] | None  # the journal's meta "pool", as written
    run_name: str  # this run as the daemon names it (its output_dir's name)
    jobs: dict[int, JobRow] = field(default_factory=dict)  # this journal's jobs by id
    slurm: dict[int, SlurmRecord] = field(default_factory=dict)  # its jobs handed to Slurm, by job id

    def job_on(self, slot: dict[str, Any]) -> JobRow | None:
        """The job a slot holds, from this journal; None when it is another run's (another journal). A daemon's
        runs have unique names, so the name tells."""
        if slot.get("run") != self.run_name or slot.get("job") is None:
            return None
        return self.jobs.get(slot["job"])


def read_pool(journal_path: Path, run_name: str) -> PoolStatus:
    from watcher.setup import lock_holder

    running, pid = lock_holder(journal_path)
    try:
        with JournalReader(journal_path) as reader, reader.snapshot():
            recorded = reader.meta("pool")
            jobs = {job.id: job for job in reader.jobs()}
            slurm = {record.job_id: record for record in reader.slurm_jobs()}
    except (OSError, sqlite3.Error, ValueError) as exc:
        raise ConfigError(f"cannot read the journal {journal_path}: {exc}") from None
    return PoolStatus(running, pid, recorded if isinstance(recorded, dict) else None, run_name, jobs, slurm)


def queue_by_preset(rows: list[dict[str, Any]], preset_order: list[str]) -> dict[str, int]:
    """Pending jobs per preset (one per schedule entry) that has jobs: in the schedule's order, then the others
    as they first appear (oldest checkpoint first: the per-checkpoint preset before the final one)."""
    seen = [row["preset"] for row in rows]
    names = [name for name in dict.fromkeys([*preset_order, *seen]) if name in seen]
    return {name: sum(row["state"] == "pending" and row["preset"] == name for row in rows) for name in names}


def pool_json(pool: PoolStatus, queue: dict[str, int]) -> dict[str, Any]:
    """The recorded pool as written, with "daemon_running" (false: what it shows is stale), "queue", on each
    slot whose job is in this journal its "state" and "started_at" (and for a Slurm job "slurm_id" and
    "slurm_state"), and "slurm": this run's Slurm jobs (also those a stopped daemon left running)."""
    recorded = dict(pool.recorded or {})
    slots = []
    for slot in recorded.get("slots") or []:
        job = pool.job_on(slot)
        record = pool.slurm.get(job.id) if job else None
        slots.append({**slot, "state": str(job.state) if job else None,
                      "started_at": _iso(job.started_at) if job else None,
                      **({"slurm_id": record.slurm_id, "slurm_state": record.state} if record else {})})  # fmt: skip
    if "slots" in recorded:
        recorded["slots"] = slots
    slurm = [{"job": r.job_id, "what": pool.jobs[r.job_id].label if r.job_id in pool.jobs else None,
              "slurm_id": r.slurm_id, "name": r.name, "state": r.state, "reason": r.reason,
              "submitted_at": _iso(r.submitted_at), "log": str(r.log)} for r in pool.slurm.values()]  # fmt: skip
    return {**recorded, "daemon_running": pool.daemon_running, "queue": queue, "slurm": slurm}


def pool_lines(pool: PoolStatus, queue: dict[str, int], now: float | None = None) -> list[str]:
    """The block above the job table."""
    if not pool.daemon_running:
        left = [f"  {pool.jobs[r.job_id].label if r.job_id in pool.jobs else f'job {r.job_id}'}  {_slurm_text(r)}"
                for r in pool.slurm.values()]  # fmt: skip
        return ["no daemon running"] + (["Slurm jobs left running (the next start collects them):", *left] if left
                                        else [])  # fmt: skip
    now = time.time() if now is None else now
    head = "daemon running" + (f" (pid {pool.daemon_pid})" if pool.daemon_pid else "")
    recorded = pool.recorded
    if not recorded:
        return [head + ": it has not recorded its pool yet"]
    lines = [head + (f", pool {recorded['device']}" if recorded.get("device") else ""), "slots:"]
    width = max((len(s.get("slot") or "") for s in recorded.get("slots") or []), default=0)
    for slot in recorded.get("slots") or []:
        lines.append(f"  {slot.get('slot', '?'):<{width}}  {_slot_text(pool, slot, now)}")
    lines.append("queue: " + (", ".join(f"{name} {n}" for name, n in queue.items()) or "nothing pending"))
    waiting = recorded.get("waiting") or []
    if waiting:
        lines.append("waiting:")
        for entry in waiting[:WAITING_SHOWN]:
            run = f"{entry.get('run')}: " if entry.get("run") != pool.run_name else ""
            lines.append(f"  {run}{entry.get('what')}: {entry.get('why')}")
        if len(waiting) > WAITING_SHOWN:
            lines.append(f"  ... and {len(waiting) - WAITING_SHOWN} more")
    return lines


def _slot_text(pool: PoolStatus, slot: dict[str, Any], now: float) -> str:
    if slot.get("job") is None:
        return f"not offered: {slot['busy']}" if slot.get("busy") else "free"
    job = pool.job_on(slot)
    if job is None:  # another run's job: its stage is in that run's journal
        return f"{slot.get('run')}: {slot.get('what')}"
    text = f"{slot.get('what')}  {job.state}"
    if job.state in ("preparing", "evaluating") and job.started_at:
        text += f"  {_seconds(max(0.0, now - job.started_at))} so far"
    record = pool.slurm.get(job.id)
    return text + (f"  {_slurm_text(record)}" if record else "")


def _slurm_text(record: SlurmRecord) -> str:
    """ "slurm 1234 PENDING (Priority)", as squeue last said it to the daemon."""
    if record.slurm_id is None:
        return "slurm (being submitted)"
    reason = f" ({record.reason})" if record.reason and record.reason != "None" else ""
    return f"slurm {record.slurm_id} {record.state or '?'}{reason}"


# --- the command ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser, load_config
    from watcher.setup import resolve_setup_paths

    parser = _Parser(prog="ckpt-watch status", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", type=Path,
                        help="the training run's output_dir (default: every run the config file names)")  # fmt: skip
    parser.add_argument("--runs-root", type=Path, metavar="DIR", help="every run under DIR (as the daemon's)")
    parser.add_argument("--config", type=Path, help="the daemon's config file (for its results dir and journal)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    parser.add_argument("--preset", dest="only_preset", metavar="NAME", help="only this preset's jobs")
    # Which sinks a result waits for: as the daemon recorded them in the journal; these flags override that.
    parser.add_argument("--wandb", metavar="auto|off|...", help="as given to the daemon (off: W&B is no sink)")
    parser.add_argument("--tensorboard", metavar="auto|off|DIR", help="as given to the daemon")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows, for scripts")
    parser.add_argument("--pool", action="store_true", help='with --json: print {"jobs": rows, "pool": the '
                        "daemon's slots, queue and waiting jobs} instead of the list")  # fmt: skip
    parser.set_defaults(verbose=False, quiet=False)  # load_config reads them
    args = parser.parse_args(argv)
    if args.pool and not args.json:
        # The text output always shows the pool; --json alone keeps its list of rows for existing scripts.
        parser.error("--pool goes with --json (the table shows the pool already)")
    config = load_config(args, several_ok=True)
    if not config.several_runs:
        return show_run(config, args)
    # Several runs (a list of output dirs, or runs_root): each one's status in turn; with --json, by run name.
    dirs = config.output_dirs() or sorted(d for d in Path(config.runs_root).iterdir()
                                          if d.is_dir() and resolve_setup_paths(config.for_run(d))[1].is_file())
    if not dirs:
        raise ConfigError(f"no run under {config.runs_root} has a ckpt-watch journal yet")
    if args.json:
        print(json.dumps({d.name: _rows(config.for_run(d), args)[0] for d in dirs}, indent=2))
        return 0
    for folder in dirs:
        print(f"== run {folder.name} ({folder})")
        show_run(config.for_run(folder), args)
    return 0


def _rows(config, args) -> tuple[list[dict[str, Any]], Path, Path]:
    """One run's rows, its results dir and journal; a ConfigError when it has no journal."""
    from watcher.setup import resolve_setup_paths

    results_dir, journal_path = resolve_setup_paths(config)
    if not journal_path.is_file():
        raise ConfigError(f"no ckpt-watch journal for {config.output_dir} (looked for {journal_path}; has the "
                          "daemon run on it? --results-dir or --config tell where its results are)")  # fmt: skip
    sinks = None  # as the daemon recorded them
    if args.wandb is not None or args.tensorboard is not None:
        sinks = ["files"] + [name for name in ("wandb", "tensorboard") if getattr(config, name) != "off"]
    return read_status(journal_path, sinks, args.only_preset), results_dir, journal_path


def show_run(config, args) -> int:
    """Print one run's status (the table, or --json)."""
    rows, results_dir, journal_path = _rows(config, args)
    problems = resource_problems(journal_path, results_dir)
    pool = read_pool(journal_path, Path(config.output_dir).name)
    queue = queue_by_preset(rows, [entry.preset for entry in config.schedule_entries()])
    if args.json and args.pool:
        print(json.dumps({"jobs": rows, "pool": pool_json(pool, queue)}, indent=2))
    elif args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, results_dir, pool_lines(pool, queue))
        from watcher.sinks.wandb_run import upload_note  # reads local files only: no wandb import

        note = upload_note(config.wandb, Path(config.output_dir), results_dir)
        if note:
            print(note)
    for problem in problems:  # after the table (on stderr with --json, which stays a plain list of rows)
        print(f"ckpt-watch status: {problem}", file=sys.stderr if args.json else sys.stdout)
    sys.stdout.flush()
    return 0


def print_table(rows: list[dict[str, Any]], results_dir: Path, above: list[str] | None = None) -> None:
    """The job table under a header line; `above`: lines between the two (the pool)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        print(f"ckpt-watch status: {results_dir}: no jobs yet", *(above or []), sep="\n")
        return
    headlines = list(rows[0]["metrics"])
    table = Table()
    for column in ("checkpoint", "variant", "preset", "state", "tries", "started", "time", *headlines, "pending"):
        numeric = column in ("tries", "time") or column in headlines
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        name = row["checkpoint"] + (f" (gen {row['generation']})" if row["generation"] > 1 else "")
        cells = [name, row["variant"], row["preset"], _state_text(row), str(row["attempts"]),
                 _short_time(row["started_at"]), _duration(row),
                 *(_number(row["metrics"][m]) + _mark(row, m) for m in headlines),
                 ", ".join(row["pending_sinks"])]  # fmt: skip
        table.add_row(*map(escape, cells))  # names are data, not rich markup
    console = Console()
    if not console.is_terminal:  # a pipe or a file: one line per row, for grep; rich writes no colour codes there
        console = Console(width=max(200, console.width))
    console.print(f"ckpt-watch status: {results_dir}", highlight=False, markup=False)
    for line in above or []:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(table)
    for row in rows:  # errors below the table: they are long, and a column of them would squeeze the rest
        if row["error"] and row["state"] in ("failed", "pending"):
            error = row["error"] if len(row["error"]) <= 500 else row["error"][:497] + "..."
            what = "failed" if row["state"] == "failed" else "last attempt"
            console.print(f"{row['checkpoint']} {row['variant']} {row['preset']} {what}: {error}", highlight=False,
                          markup=False, soft_wrap=True)  # fmt: skip
    for row in rows:
        for flag in row.get("regressions") or []:
            console.print(f"{row['checkpoint']} {row['variant']} {row['preset']}: {Regression(**flag).text()}",
                          highlight=False, markup=False, soft_wrap=True)  # fmt: skip
    if any(row.get("regressions") for row in rows):
        console.print(f"▼: significantly worse than the best earlier checkpoint (two-sided z-test on the standard "
                      f"errors, p < {REGRESSION_LEVEL:g})", highlight=False, markup=False, soft_wrap=True)  # fmt: skip
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    pending: dict[str, int] = {}
    for row in rows:
        for sink in row["pending_sinks"]:
            pending[sink] = pending.get(sink, 0) + 1
    summary = f"{len({(r['checkpoint'], r['generation']) for r in rows})} checkpoint(s), {len(rows)} job(s): "
    summary += ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "none yet"
    if pending:
        summary += "; results waiting for delivery: " + ", ".join(f"{s} {n}" for s, n in sorted(pending.items()))
    console.print(summary, highlight=False)
    if pending:
        console.print(waiting_explained(pending), highlight=False, markup=False, soft_wrap=True)


def waiting_explained(pending: dict[str, int]) -> str:
    """What "waiting for delivery" means, for someone who has not read the README's W&B section."""
    why = ["they are safe in the journal and the daemon delivers them by itself"]
    if "wandb" in pending:
        why.append("W&B results wait until the training run has finished (wandb_live = defer) or while W&B is "
                   "unreachable")  # fmt: skip
    return "(" + "; ".join(why) + "; `ckpt-watch sync OUTPUT_DIR` delivers them now, when no daemon runs)"


def _number(value: float | None) -> str:
    """4 significant digits; big counts (parameters, FLOPs) as 90.62k, 1.236B rather than 9.062e+04."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= 10 * scale and float(value).is_integer():
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def _mark(row: dict[str, Any], metric: str) -> str:
    return " ▼" if any(flag["metric"] == metric for flag in row.get("regressions") or []) else ""


def _state_text(row: dict[str, Any]) -> str:
    if row["state"] == "pending" and row["next_attempt_at"]:
        return "pending (retry)"
    return row["state"] + (" (ckpt gone)" if row["checkpoint_gone"] and row["state"] != "gone" else "")


def _short_time(iso: str | None) -> str:
    """Local time; the date too unless it is today."""
    if not iso:
        return ""
    moment = datetime.fromisoformat(iso).astimezone()
    return moment.strftime("%H:%M:%S" if moment.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M")


def _duration(row: dict[str, Any]) -> str:
    """The wall time; for a running job the time so far; for a job waiting to retry, how long it waits."""
    if row["next_attempt_at"]:
        wait = datetime.fromisoformat(row["next_attempt_at"]).timestamp() - time.time()
        return f"retry in {_seconds(wait)}" if wait > 0 else "retry due"
    if row["walltime_s"] is None:
        return ""
    text = _seconds(float(row["walltime_s"]))
    return f"{text} so far" if row["state"] in ("preparing", "evaluating") else text


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
