"""`ckpt-watch plot OUTPUT_DIR -o FILE.png`: metrics against training step, regular and EMA weights as separate lines.

    ckpt-watch plot OUTPUT_DIR -o FILE.png [--metric NAME ...] [--preset NAME] [--config FILE] [--results-dir DIR]

Reads RESULTS_DIR/results.jsonl (so it works beside a running daemon, on the results as they are delivered) and
draws one panel per metric. Failed results are left out; where a step was evaluated more than once (a re-saved
checkpoint, --retry-failed) its newest result counts. The default metrics are the headline metrics of
`ckpt-watch status` that change with training (parameter counts are left out). The file's extension picks the
format: .png, .svg or .pdf. Rendering uses matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

from watcher.config import ConfigError
from watcher.metrics import group_of, headline_metrics, higher_is_better, is_spread
from watcher.records import Result

FORMATS = (".png", ".svg", ".pdf")
STYLES = {  # variant -> line style: EMA dashed with hollow squares, so the two read apart in grey scale too
    "regular": {"linestyle": "-", "marker": "o"},
    "ema": {"linestyle": "--", "marker": "s", "markerfacecolor": "none"},
}


def collect(results: list[Result], preset: str | None = None) -> dict[tuple[str, str], dict[int, dict]]:
    """(preset, variant) -> step -> metrics of the newest successful result."""
    series: dict[tuple[str, str], dict[int, dict]] = {}
    for result in results:
        if not result.ok or (preset is not None and result.preset != preset) or not result.metrics:
            continue
        series.setdefault((result.preset, result.variant), {})[result.step] = result.metrics
    return series


def default_metrics(series: dict[tuple[str, str], dict[int, dict]]) -> list[str]:
    names = {m for points in series.values() for metrics in points.values() for m in metrics}
    headlines = headline_metrics(names)
    return [m for m in headlines if group_of(m) != "cost"] or headlines


def plot(series: dict[tuple[str, str], dict[int, dict]], metrics: list[str], output: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 1.2 + 2.6 * len(metrics)), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, explicitly: never a GUI backend, whatever MPLBACKEND or matplotlibrc says
    axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    presets = sorted({p for p, _ in series})
    order = sorted(series, key=lambda key: (key[0], key[1] != "regular", key[1]))  # regular before ema
    colors = {key: f"C{i % 10}" for i, key in enumerate(order)}  # the same line has the same colour in every panel
    for ax, metric in zip(axes, metrics):
        for preset, variant in order:
            points = sorted((step, m[metric]) for step, m in series[(preset, variant)].items() if metric in m)
            if not points:
                continue
            label = variant if len(presets) == 1 else f"{preset} {variant}"
            style = STYLES.get(variant, {"linestyle": ":", "marker": "^"})
            ax.plot([s for s, _ in points], [v for _, v in points], label=label, color=colors[(preset, variant)],
                    markersize=4, linewidth=1.5, **style)  # fmt: skip
        direction = higher_is_better(metric)
        ax.set_title(metric + {True: "  (higher is better)", False: "  (lower is better)"}.get(direction, ""),
                     loc="left", fontsize=10)  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("training step")
    steps = sorted({step for points in series.values() for step in points})
    if len(steps) <= 12:
        axes[-1].set_xticks(steps)  # few checkpoints: a tick at each one
    else:
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title, fontsize=10)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp-{os.getpid()}{output.suffix}")
    try:
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, output)  # a web page or a watcher of the file never sees half a picture
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser, load_config
    from watcher.sinks import read_results

    parser = _Parser(prog="ckpt-watch plot", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", type=Path, help="the training run's output_dir")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="the picture to write: .png, .svg or .pdf")  # fmt: skip
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="a metric to plot (repeatable; default: the headline metrics)")  # fmt: skip
    parser.add_argument("--preset", dest="only_preset", metavar="NAME", help="only this preset's results")
    parser.add_argument("--config", type=Path, help="the daemon's config file (for its results dir)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    parser.set_defaults(verbose=False, quiet=False)  # load_config reads them
    args = parser.parse_args(argv)
    if args.output.suffix.lower() not in FORMATS:
        raise ConfigError(f"unsupported picture format {args.output.suffix or '(none)'!r}: name the file "
                          f"{' or '.join('*' + f for f in FORMATS)}")  # fmt: skip
    config = load_config(args)
    results_dir = config.resolved_results_dir()
    series = collect(read_results(results_dir), args.only_preset)
    if not series:
        which = f"{args.only_preset} " if args.only_preset else ""
        raise ConfigError(f"no successful {which}results to plot in {results_dir / 'results.jsonl'}")
    known = sorted({m for points in series.values() for metrics in points.values() for m in metrics})
    metrics = list(dict.fromkeys(args.metric)) if args.metric else default_metrics(series)
    for metric in metrics:
        if metric not in known:
            close = difflib.get_close_matches(metric, known, n=5, cutoff=0.4)
            shown = close or [m for m in known if not is_spread(m)][:8]
            more = "" if close or len(known) <= len(shown) else f" and {len(known) - len(shown)} more"
            raise ConfigError(f"unknown metric {metric!r}; {'close' if close else 'known'}: "
                              f"{', '.join(shown)}{more}")  # fmt: skip
    if not metrics:
        raise ConfigError(f"no metric to plot by default; choose with --metric from: {', '.join(known[:8])}")
    plot(series, metrics, args.output, f"ckpt-watch: {config.output_dir}")
    print(f"wrote {args.output} ({len(metrics)} metric(s), {sum(len(p) for p in series.values())} result(s))")
    sys.stdout.flush()
    return 0
