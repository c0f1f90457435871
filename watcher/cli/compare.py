"""`ckpt-watch compare`: two results side by side, each metric's difference and which one is better.

    ckpt-watch compare A.json B.json [--json]
    ckpt-watch compare OUTPUT_DIR STEP_A STEP_B [--variant regular] [--preset smoke] [--results-dir DIR] [--json]

A and B are per-job result files (RESULTS_DIR/<checkpoint>/<variant>/<preset>.json, <preset>.gN.json for a
re-save's generation N). Whether higher or lower is better comes from lm-eval's own `higher_is_better` in the raw
output where it has one, else from the metric's name. Where both results carry the metric's standard error
(`task/metric_stderr`), a difference within NOISE_STDERRS combined standard errors is not called better: the
column says "~" (within noise). Metrics are grouped as accuracy, perplexity, routing, inference and cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from watcher.config import ConfigError
from watcher.metrics import GROUPS, group_of, higher_is_better, stderr_name
from watcher.records import Result
from watcher.sinks import FileSink, read_results

NOISE_STDERRS = 2.0  # a difference within 2 combined standard errors (about 95%) is noise


def compare(a: Result, b: Result) -> list[dict[str, Any]]:
    rows = []
    for metric in sorted(set(a.metrics) | set(b.metrics)):
        if metric.endswith("_stderr"):
            continue
        va, vb = a.metrics.get(metric), b.metrics.get(metric)
        direction = higher_is_better(metric, (a if metric in a.metrics else b).raw)
        better = None
        noise = _noise(metric, a, b)
        if va is not None and vb is not None and direction is not None and va != vb:
            better = "~" if noise is not None and abs(vb - va) <= noise else ("B" if (vb > va) == direction else "A")
        rows.append({"group": group_of(metric), "metric": metric, "a": va, "b": vb,
                     "difference": vb - va if va is not None and vb is not None else None,
                     "noise": noise, "higher_is_better": direction, "better": better})  # fmt: skip
    rows.sort(key=lambda r: (GROUPS.index(r["group"]), r["metric"]))
    return rows


def _noise(metric: str, a: Result, b: Result) -> float | None:
    """NOISE_STDERRS x the combined standard error of the difference, when both results have the stderr."""
    errors = [result.metrics.get(stderr_name(metric)) for result in (a, b)]
    if any(not isinstance(e, (int, float)) for e in errors):
        return None
    return NOISE_STDERRS * (errors[0] ** 2 + errors[1] ** 2) ** 0.5


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
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
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
    rows = compare(a, b)
    if args.json:
        print(json.dumps({"a": labels[0], "b": labels[1], "rows": rows}, indent=2))
    else:
        _print_table(rows, labels)
    sys.stdout.flush()
    return 0


def _results_dir_and_preset(output_dir: Path, args: Any) -> tuple[Path, str]:
    """The results dir and preset from the flags, else the config file, else the defaults."""
    from watcher.config import build_config, load_toml

    file_values = load_toml(args.config) if args.config else {}
    config = build_config(file_values, {"output_dir": output_dir, "results_dir": args.results_dir,
                                        "preset": args.preset})  # fmt: skip
    return config.resolved_results_dir(), config.preset


def _print_table(rows: list[dict[str, Any]], labels: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"A = {labels[0]}, B = {labels[1]}")
    for column in ("group", "metric", "A", "B", "B - A", "better"):
        table.add_column(column, justify="right" if column in ("A", "B", "B - A") else "left")
    for row in rows:
        cells = [f"{row[k]:.4g}" if row[k] is not None else "-" for k in ("a", "b", "difference")]
        table.add_row(row["group"], row["metric"], *cells, row["better"] or "")
    console = Console(width=max(120, Console().width))
    console.print(table)
    if any(row["better"] == "~" for row in rows):
        console.print(f"~: the difference is within {NOISE_STDERRS:g} standard errors (the results' own *_stderr): "
                      "no clear winner", highlight=False)  # fmt: skip
