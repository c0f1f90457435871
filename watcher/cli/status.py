"""`ckpt-watch status OUTPUT_DIR [--json]`: every checkpoint x variant x preset, where it stands, at a glance.

    ckpt-watch status OUTPUT_DIR [--preset NAME] [--config FILE] [--results-dir DIR] [--json]

Reads the journal (read-only, safe while the daemon runs: SQLite's WAL lets a reader see the last committed
state while the daemon writes) and lists each job with its state, attempts, start and finish times, wall
time, its error if it failed, the sinks its result is still waiting for, and a few headline metrics.

The headline metrics shown are chosen by watcher/metrics.py (`headline_metrics`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from watcher.config import ConfigError
from watcher.journal import JobRow, JournalReader
from watcher.metrics import headline_metrics
from watcher.records import Result, iso_time


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
    rows = []
    for job in jobs:
        result = latest.get(job.id)
        metrics = result.metrics if result and job.state == "done" else {}
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
        })  # fmt: skip
    return rows


ROW_KEYS = ("checkpoint", "step", "generation", "checkpoint_gone", "variant", "preset", "state", "attempts",
            "created_at", "started_at", "finished_at", "walltime_s", "next_attempt_at", "error", "result_id",
            "pending_sinks", "metrics")  # fmt: skip


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


# --- the command ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser, load_config
    from watcher.setup import resolve_setup_paths

    parser = _Parser(prog="ckpt-watch status", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", type=Path, help="the training run's output_dir")
    parser.add_argument("--config", type=Path, help="the daemon's config file (for its results dir and journal)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    parser.add_argument("--preset", dest="only_preset", metavar="NAME", help="only this preset's jobs")
    # Which sinks a result waits for: as the daemon recorded them in the journal; these flags override that.
    parser.add_argument("--wandb", metavar="auto|off|...", help="as given to the daemon (off: W&B is no sink)")
    parser.add_argument("--tensorboard", metavar="auto|off|DIR", help="as given to the daemon")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows, for scripts")
    parser.set_defaults(verbose=False, quiet=False)  # load_config reads them
    args = parser.parse_args(argv)
    config = load_config(args)
    results_dir, journal_path = resolve_setup_paths(config)
    if not journal_path.is_file():
        raise ConfigError(f"no ckpt-watch journal for {config.output_dir} (looked for {journal_path}; has the "
                          "daemon run on it? --results-dir or --config tell where its results are)")  # fmt: skip
    sinks = None  # as the daemon recorded them
    if args.wandb is not None or args.tensorboard is not None:
        sinks = ["files"] + [name for name in ("wandb", "tensorboard") if getattr(config, name) != "off"]
    rows = read_status(journal_path, sinks, args.only_preset)
    problems = resource_problems(journal_path, results_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, results_dir)
        from watcher.sinks.wandb_run import upload_note  # reads local files only: no wandb import

        note = upload_note(config.wandb, Path(config.output_dir), results_dir)
        if note:
            print(note)
    for problem in problems:  # after the table (on stderr with --json, which stays a plain list of rows)
        print(f"ckpt-watch status: {problem}", file=sys.stderr if args.json else sys.stdout)
    sys.stdout.flush()
    return 0


def print_table(rows: list[dict[str, Any]], results_dir: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        print(f"ckpt-watch status: {results_dir}: no jobs yet")
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
                 *(_number(row["metrics"][m]) for m in headlines),
                 ", ".join(row["pending_sinks"])]  # fmt: skip
        table.add_row(*map(escape, cells))  # names are data, not rich markup
    console = Console()
    if not console.is_terminal:  # a pipe or a file: one line per row, for grep; rich writes no colour codes there
        console = Console(width=max(200, console.width))
    console.print(f"ckpt-watch status: {results_dir}", highlight=False, markup=False)
    console.print(table)
    for row in rows:  # errors below the table: they are long, and a column of them would squeeze the rest
        if row["error"] and row["state"] in ("failed", "pending"):
            error = row["error"] if len(row["error"]) <= 500 else row["error"][:497] + "..."
            what = "failed" if row["state"] == "failed" else "last attempt"
            console.print(f"{row['checkpoint']} {row['variant']} {row['preset']} {what}: {error}", highlight=False,
                          markup=False, soft_wrap=True)  # fmt: skip
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
