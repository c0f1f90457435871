"""`ckpt-watch best`: the best checkpoint(s) by an eval metric, with their values and where they are on disk.

    ckpt-watch best OUTPUT_DIR [--metric M] [--variant V] [--json] [--path-only]

With `keep_best` rules, what the daemon kept (RESULTS_DIR/best/best.json: the folders under best/, safe from the
trainer's rotation); else, or for a `--metric` no rule keeps, the checkpoints ranked from results.jsonl (their
original folders, marked where they no longer exist). `--path-only` prints the best one's folder, one line, for
scripts: `cp -r "$(ckpt-watch best ./output --path-only)" ./release`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.config import VARIANTS, ConfigError
from watcher.retention import BEST_DIR, read_index
from watcher.standings import MODES, ranked, resolve_mode

DEFAULT_TOP = 5  # rows ranked from results.jsonl (a keep_best rule shows its k)


@dataclass(frozen=True)
class Ranking:
    """One metric's best checkpoints as this command shows them."""

    metric: str
    variant: str
    mode: str
    source: str  # "best.json" (kept by a keep_best rule) or "results.jsonl" (ranked here, nothing kept)
    entries: list[dict[str, Any]]  # rank, checkpoint, step, value, stderr, path (kept or None), original, ...
    folder: str | None = None  # the rule's folder under best/

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "variant": self.variant, "mode": self.mode, "source": self.source,
                "folder": self.folder, "checkpoints": self.entries}  # fmt: skip


def main(argv: list[str]) -> int:
    from watcher.cli.common import EXIT_FAILED, _Parser, print_error

    parser = _Parser(prog="ckpt-watch best", description=__doc__.splitlines()[0],
                     epilog="e.g. ckpt-watch best ./output --metric ckpt_watch_smoke_mc/acc")  # fmt: skip
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="the training run's output_dir")
    parser.add_argument("--metric", help="the metric (default: every keep_best rule's)")
    parser.add_argument("--variant", choices=VARIANTS, help="whose results: regular or ema (default: regular, "
                                                            "or every keep_best rule's)")  # fmt: skip
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="ranking from results.jsonl: max, min, or auto (default: from the metric)")  # fmt: skip
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                        help=f"rows ranked from results.jsonl (default: {DEFAULT_TOP})")  # fmt: skip
    parser.add_argument("--config", type=Path, help="the daemon's config file (its results dir)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the rankings as JSON")
    shown.add_argument("--path-only", action="store_true", help="print only the best checkpoint's folder")
    args = parser.parse_args(argv)
    if args.top < 1:
        raise ConfigError(f"--top must be a positive integer, got {args.top}")
    rankings = find_rankings(_results_dir(args), args.metric, args.variant, args.mode, args.top)
    if args.path_only:
        if len(rankings) > 1:
            raise ConfigError("several keep_best rules: give --metric (and --variant) to say whose best, one of: "
                              + ", ".join(f"{r.metric} ({r.variant})" for r in rankings))  # fmt: skip
        path = best_path(rankings[0])
        if path is None:
            first = rankings[0].entries[0]
            print_error("ckpt-watch best", f"the best checkpoint by {rankings[0].metric}, {first['checkpoint']}, is "
                        f"no longer on disk (it was at {first['original']})")  # fmt: skip
            return EXIT_FAILED
        print(path)
    elif args.json:
        print(json.dumps({"rankings": [r.to_dict() for r in rankings]}, indent=2))
    else:
        _print_tables(rankings)
    sys.stdout.flush()
    return 0


def find_rankings(results_dir: Path, metric: str | None, variant: str | None, mode: str, top: int) -> list[Ranking]:
    """The rankings asked for: the keep_best rules' (best.json) that match, else `metric` from results.jsonl."""
    rules = [rule for rule in read_index(results_dir / BEST_DIR).get("rules", [])
             if metric in (None, rule.get("metric")) and variant in (None, rule.get("variant"))]  # fmt: skip
    if rules:
        return [_kept_ranking(rule) for rule in rules]
    if metric is None:
        raise ConfigError(f"no keep_best rules in {results_dir / BEST_DIR / 'best.json'}: give --metric to rank the "
                          "checkpoints by it")  # fmt: skip
    return [_ranking_of_results(results_dir, metric, variant or "regular", mode, top)]


def best_path(ranking: Ranking) -> str | None:
    """The best checkpoint's folder that exists: its kept copy, else its original; None when neither does."""
    if not ranking.entries:
        return None
    first = ranking.entries[0]
    return next((p for p in (first.get("path"), first.get("original")) if p and Path(p).is_dir()), None)


def _kept_ranking(rule: dict[str, Any]) -> Ranking:
    entries = [{**entry, "path_exists": bool(entry.get("path")) and Path(entry["path"]).is_dir(),
                "original_exists": Path(entry["original"]).is_dir()} for entry in rule.get("kept", [])]  # fmt: skip
    if not entries:
        raise ConfigError(f"keep_best {rule['metric']} ({rule['variant']}): no checkpoint has a result with it yet")
    return Ranking(rule["metric"], rule["variant"], rule["mode"], "best.json", entries, rule.get("folder"))


def _ranking_of_results(results_dir: Path, metric: str, variant: str, mode: str, top: int) -> Ranking:
    from watcher.sinks import read_results

    results = read_results(results_dir)
    if not results:
        raise ConfigError(f"no results in {results_dir} (results.jsonl is missing or empty)")
    if not any(metric in result.metrics for result in results if result.variant == variant):
        names = sorted({name for result in results for name in result.metrics if not name.endswith("_stderr")})
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ConfigError(f"no {variant} result in {results_dir} has the metric {metric!r}; metrics: {shown or 'none'}")
    try:
        mode = resolve_mode(mode, metric, results)
    except ValueError as exc:
        raise ConfigError(f"{exc} (--mode max or --mode min)") from None
    entries = [{"rank": rank, "checkpoint": s.checkpoint, "step": s.step, "generation": s.generation, "value": s.value,
                "stderr": s.stderr, "path": None, "path_exists": False, "original": s.checkpoint_path,
                "original_exists": Path(s.checkpoint_path).is_dir(), "result_id": s.result.result_id}
               for rank, s in enumerate(ranked(results, metric, mode, variant)[:top], 1)]  # fmt: skip
    if not entries:
        raise ConfigError(f"no successful {variant} result in {results_dir} has a value of {metric!r}")
    return Ranking(metric, variant, mode, "results.jsonl", entries)


def _results_dir(args: Any) -> Path:
    """The results dir from the flags, else the config file, else OUTPUT_DIR/ckpt-watch."""
    from watcher.config import build_config, load_toml

    if not args.output_dir.is_dir():
        raise ConfigError(f"output dir not found: {args.output_dir}")
    file_values = load_toml(args.config) if args.config else {}
    config = build_config(file_values, {"output_dir": args.output_dir, "results_dir": args.results_dir})
    return config.resolved_results_dir()


def _print_tables(rankings: list[Ranking]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console = Console(width=max(160, console.width))
    for ranking in rankings:
        how = "higher is better" if ranking.mode == "max" else "lower is better"
        where = f"kept in {ranking.folder}" if ranking.source == "best.json" else "ranked from results.jsonl, not kept"
        console.print(escape(f"{ranking.metric} ({ranking.variant}, {how}): {where}"), highlight=False)
        table = Table()
        for column in ("#", "step", "checkpoint", "value", "folder"):
            table.add_column(column, justify="right" if column in ("#", "step", "value") else "left")
        for entry in ranking.entries:
            value = f"{entry['value']:.4g}" + (f" ± {entry['stderr']:.2g}" if entry.get("stderr") is not None else "")
            table.add_row(str(entry["rank"]), str(entry["step"]), escape(entry["checkpoint"]), value,
                          escape(_folder_text(entry)))
        console.print(table)


def _folder_text(entry: dict[str, Any]) -> str:
    """Where the checkpoint is: its kept folder, else its original; "(deleted)" where that no longer exists."""
    if entry.get("path"):
        return entry["path"] + ("" if entry["path_exists"] else " (deleted)") + \
            (" (+ merged/)" if entry.get("merged") else "")  # fmt: skip
    original = entry["original"] + ("" if entry["original_exists"] else " (deleted)")
    return f"{original}" + (f" (not kept: {entry['note']})" if entry.get("note") else "")
