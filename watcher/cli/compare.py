"""`ckpt-watch compare`: two results side by side, each metric's difference, whether it is noise, which is better.

    ckpt-watch compare A.json B.json [--level 0.05] [--json]
    ckpt-watch compare OUTPUT_DIR STEP_A STEP_B [--variant regular] [--preset smoke] [--results-dir DIR] [--json]

A and B are per-job result files (RESULTS_DIR/<checkpoint>/<variant>/<preset>.json, <preset>.gN.json for a
re-save's generation N). Whether higher or lower is better comes from lm-eval's own `higher_is_better` in the raw
output where it has one, else from the metric's name. Where both results carry the metric's standard error
(lm-eval's `task/metric_stderr`; for a probe repeated in trials, stdev / sqrt(trials)), each difference gets the
two-sided z-test of watcher/significance.py (its assumptions are there): z, p, and whether p < --level. A
difference that is not significant is not called better: the column says "~" (within noise). Without a standard
error on both sides the better one is decided by value alone, and the row says "no stderr". Metrics are grouped as
accuracy, perplexity, routing, inference and cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from watcher.config import ConfigError
from watcher.metrics import GROUPS, group_of, higher_is_better, is_spread
from watcher.records import Result
from watcher.significance import DEFAULT_LEVEL, check_level, standard_error, z_test
from watcher.sinks import FileSink, read_results


def compare(a: Result, b: Result, level: float = DEFAULT_LEVEL) -> list[dict[str, Any]]:
    """One row per metric (standard errors, standard deviations and trial counts are not rows of their own: they
    go into the rows of the metrics they are about)."""
    rows = []
    for metric in sorted(set(a.metrics) | set(b.metrics)):
        if is_spread(metric):
            continue
        va, vb = a.metrics.get(metric), b.metrics.get(metric)
        se_a, se_b = standard_error(a.metrics, metric), standard_error(b.metrics, metric)
        direction = higher_is_better(metric, (a if metric in a.metrics else b).raw)
        both = va is not None and vb is not None
        test = z_test(va, se_a, vb, se_b) if both else None
        significant = test.significant(level) if test is not None else None
        better = None
        if both and direction is not None and va != vb:
            better = "~" if significant is False else ("B" if (vb > va) == direction else "A")
        rows.append({"group": group_of(metric), "metric": metric, "a": va, "b": vb,
                     "difference": vb - va if both else None, "stderr_a": se_a, "stderr_b": se_b,
                     "z": test.z if test else None, "p": test.p if test else None, "significant": significant,
                     "higher_is_better": direction, "better": better})  # fmt: skip
    rows.sort(key=lambda r: (GROUPS.index(r["group"]), r["metric"]))
    return rows


def load_record(path: Path) -> Result:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"result file not found: {path}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"not a result file: {path} ({exc})") from None
    if not Result.is_record(record):
        raise ConfigError(f"not a result file: {path} (not a result record)")
    return Result.from_dict(record)


def find_records(results_dir: Path, steps: list[int], variant: str, preset: str) -> list[Result]:
    """The newest successful result for each step (this variant and preset), from one read of
    RESULTS_DIR/results.jsonl; the per-job file's full record where it is there."""
    if not (results_dir / "results.jsonl").is_file():
        raise ConfigError(f"no results in {results_dir} (results.jsonl is missing)")
    newest: dict[int, Result] = {}
    for result in read_results(results_dir):
        if (result.variant, result.preset, result.ok) == (variant, preset, True):
            newest[result.step] = result
    found = []
    for step in steps:
        if step not in newest:
            raise ConfigError(f"no successful {preset} result for step {step} ({variant}) in {results_dir}")
        full = FileSink(results_dir).result_path(newest[step])
        found.append(load_record(full) if full.is_file() else newest[step])
    return found


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser

    parser = _Parser(prog="ckpt-watch compare", description=__doc__.splitlines()[0],
                     epilog="e.g. ckpt-watch compare ./output 500 1000, or ckpt-watch compare A.json B.json")  # fmt: skip
    parser.add_argument("things", nargs="+", metavar="A B | OUTPUT_DIR STEP_A STEP_B",
                        help="two result files, or the training run's output_dir and two steps")  # fmt: skip
    parser.add_argument("--variant", default="regular", choices=("regular", "ema"),
                        help="which weights' results, with OUTPUT_DIR STEP STEP (default: regular)")  # fmt: skip
    parser.add_argument("--preset", help="which preset's results, with OUTPUT_DIR STEP STEP (default: the "
                                         "config's preset, else smoke)")  # fmt: skip
    parser.add_argument("--config", type=Path, help="the daemon's config file (its results dir and preset)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    parser.add_argument("--level", type=_level, default=DEFAULT_LEVEL,
                        help="significance level of the z-test: a difference counts when p < LEVEL (default "
                             f"{DEFAULT_LEVEL:g}; in (0, 0.5])")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (with the level)")
    args = parser.parse_args(argv)
    first_is_dir = Path(args.things[0]).is_dir()
    if len(args.things) == 2 and not first_is_dir:
        a, b = (load_record(Path(p)) for p in args.things)
        labels = [Path(p).as_posix() for p in args.things]
    elif len(args.things) == 3 and first_is_dir:
        output_dir, *steps = args.things
        if not all(s.isdigit() for s in steps):
            raise ConfigError(f"steps must be numbers, got {steps[0]!r} and {steps[1]!r}")
        results_dir, preset = _results_dir_and_preset(Path(output_dir), args)
        a, b = find_records(results_dir, [int(s) for s in steps], args.variant, preset)
        labels = [f"step {s}" for s in steps]
    elif first_is_dir:
        given = " ".join(args.things[1:]) or "none"
        raise ConfigError(f"{args.things[0]} is an output dir: give it two steps to compare, e.g. "
                          f"`ckpt-watch compare {args.things[0]} 500 1000` (steps given: {given})")  # fmt: skip
    else:
        raise ConfigError("give two result files, or OUTPUT_DIR and two steps")
    rows = compare(a, b, args.level)
    if args.json:
        print(json.dumps({"a": labels[0], "b": labels[1], "level": args.level, "rows": rows}, indent=2))
    else:
        _print_table(rows, labels, args.level)
    sys.stdout.flush()
    return 0


def _results_dir_and_preset(output_dir: Path, args: Any) -> tuple[Path, str]:
    """The results dir and preset from the flags, else the config file, else the defaults."""
    from watcher.config import build_config, load_toml

    file_values = load_toml(args.config) if args.config else {}
    config = build_config(file_values, {"output_dir": output_dir, "results_dir": args.results_dir,
                                        "preset": args.preset})  # fmt: skip
    return config.resolved_results_dir(), config.preset


def _level(text: str) -> float:
    """--level: a number in (0, 0.5]; argparse turns the error into one line and exit 2."""
    try:
        level = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_level(level)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_table(rows: list[dict[str, Any]], labels: list[str], level: float) -> None:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    table = Table(title=f"A = {labels[0]}, B = {labels[1]}")
    longest = max((len(row["metric"]) for row in rows), default=6)
    for column in ("group", "metric", "A", "B", "B - A", "z", "p", f"p < {level:g}", "better"):
        # The metric's name whole (the other columns give way): two cut to "ckpt_watch_smoke_mc/…" look the same.
        table.add_column(column, justify="left" if column in ("group", "metric", "better") else "right",
                         min_width=longest if column == "metric" else None)  # fmt: skip
    for row in rows:
        values = [_value(row["a"], row["stderr_a"]), _value(row["b"], row["stderr_b"]),
                  f"{row['difference']:.4g}" if row["difference"] is not None else "-"]  # fmt: skip
        if row["significant"] is None:
            tested = ["", "", "no stderr" if row["difference"] is not None else "-"]
        else:
            tested = [f"{row['z']:+.2f}", f"{row['p']:.2g}", "yes" if row["significant"] else "no"]
        table.add_row(row["group"], row["metric"], *values, *tested, row["better"] or "")
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table needs, one line per metric
        unbounded = Console(width=10_000)
        console = Console(width=max(120, Measurement.get(unbounded, unbounded.options, table).maximum))
    console.print(table)
    console.print(f"± standard error; z, p: two-sided z-test of B - A; p < {level:g}: significant (--level), else "
                  "~ (noise, no winner); no stderr: better by value alone", highlight=False, soft_wrap=True)  # fmt: skip


def _value(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g} ± {stderr:.2g}" if stderr is not None else f"{value:.4g}"
