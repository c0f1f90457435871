"""`ckpt-watch demo`: the whole pipeline on an embedded default, with nothing to download.

A tiny causal LM is trained by the real `transformers.Trainer` on the CPU in a child process, saving a
checkpoint every few seconds into an output dir, while the daemon watches that dir with the offline `smoke`
preset (shown in the live view at a terminal, as plain log lines otherwise). When training has ended and every
checkpoint is evaluated, the results table is printed, then the commands that look at the run further. The run
is kept (in a new temporary folder unless --output-dir names one), so those commands have something to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from watcher.cli import demo_decisions
from watcher.cli.common import EXIT_FAILED, EXIT_OK, _Parser, resolve_log_format, setup_logging
from watcher.config import LOG_FORMATS, WatchConfig, build_config
from watcher.records import Result
from watcher.sinks import read_results

# The eval events go here whether or not the trainer logs TensorBoard (that needs the tensorboard package).
TENSORBOARD_DIR = "runs/ckpt-watch-eval"


def main(argv: list[str]) -> int:
    parser = _Parser(prog="ckpt-watch demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where evaluation jobs run (default: cpu)")
    parser.add_argument("--decisions", action="store_true",
                        help="also keep the best checkpoints, alert and stop training on a regression, and compare "
                             "with noise in mind (watcher/cli/demo_decisions.py)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps (default: 30; 100 with --decisions)")
    parser.add_argument("--save-steps", type=int, default=10, help="steps between checkpoints (default: 10)")
    parser.add_argument("--step-delay", type=float,
                        help="seconds slept per step (default: 0.15; 0.3 with --decisions)")  # fmt: skip
    parser.add_argument("--output-dir", type=Path,
                        help="the training run's folder, kept afterwards (default: a new ckpt-watch-demo-* folder "
                             "in the temporary directory, also kept)")  # fmt: skip
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                        help="auto (default: the live view at a terminal, else plain), plain, json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = demo_decisions.STEPS if args.decisions else 30
    if args.step_delay is None:
        args.step_delay = demo_decisions.STEP_DELAY if args.decisions else 0.15
    args.log_format = resolve_log_format(args.log_format)
    if args.log_format != "live":
        setup_logging(0, args.log_format)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        output_dir = args.output_dir.resolve()
    else:
        output_dir = Path(tempfile.mkdtemp(prefix="ckpt-watch-demo-"))
    return run_demo(args, output_dir)


def run_demo(args: argparse.Namespace, output_dir: Path) -> int:
    from watcher.setup import resolve_setup

    decisions = getattr(args, "decisions", False)
    # No W&B in the plain demo: its tiny training run logs to none. With --decisions it logs to an offline run, and
    # the daemon writes the evals and the alert into that run.
    config: WatchConfig = build_config(demo_decisions.CONFIG if decisions else {},
                                       {"output_dir": output_dir, "device": args.device, "preset": "smoke",
                                        "wandb": "auto" if decisions else "off", "tensorboard": TENSORBOARD_DIR})  # fmt: skip
    setup = resolve_setup(config)
    print(f"ckpt-watch demo: training a tiny model into {output_dir}; the daemon evaluates each checkpoint\n",
          flush=True)  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(demo_decisions.trainer_environment(output_dir) if decisions else {})}  # fmt: skip
    # The trainer's own curves in TensorBoard too, when the package that writes them is installed.
    report_to = ["--report-to", "tensorboard"] if _tensorboard_installed() else []
    train_log = open(output_dir / "train.log", "wb")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "watcher.tiny", str(output_dir), "--steps", str(args.steps),
         "--save-steps", str(args.save_steps), "--step-delay", str(args.step_delay), *report_to,
         *(demo_decisions.trainer_arguments() if decisions else [])],
        stdout=train_log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip

    def idle_text() -> str | None:
        if trainer.poll() is None:
            return f"training is running ({output_dir / 'train.log'}); waiting for its next checkpoint"
        return None

    try:
        log_format = getattr(args, "log_format", "plain")
        status = _run_daemon(setup, log_format, finish_when=lambda: trainer.poll() is not None, idle_text=idle_text)
    finally:
        if trainer.poll() is None:
            trainer.terminate()
        trainer.wait()
        train_log.close()
    if trainer.returncode != 0:
        print(f"ckpt-watch demo: the trainer failed (status {trainer.returncode}); see {output_dir / 'train.log'}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    records = read_results(setup.runs[0].results_dir)
    print_results(records)
    if decisions:
        demo_decisions.report(output_dir, setup.runs[0].results_dir)
    print(next_steps(output_dir, sorted({r.step for r in records if r.ok})), flush=True)
    failed = any(not r.ok for r in records)
    return EXIT_FAILED if failed or status else EXIT_OK


def _tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def next_steps(output_dir: Path, steps: list[int]) -> str:
    """Where the run is and the commands that look at its results."""
    lines = [f"\nThe run is kept in {output_dir} (delete it when done). Look at its results:",
             f"  ckpt-watch status {output_dir}",
             f"  ckpt-watch plot {output_dir} -o {output_dir / 'metrics.png'}"]  # fmt: skip
    if len(steps) >= 2:
        lines.append(f"  ckpt-watch compare {output_dir} {steps[0]} {steps[-1]}")
    trainer_curves = "" if _tensorboard_installed() else " (pip install tensorboard for the trainer's curves too)"
    lines.append(f"  tensorboard --logdir {output_dir / 'runs'}   # eval events in {output_dir / TENSORBOARD_DIR}"
                 f"{trainer_curves}")  # fmt: skip
    return "\n".join(lines)


def _run_daemon(setup, log_format: str, finish_when, idle_text) -> int:
    from watcher.daemon import Daemon

    if log_format != "live":
        daemon = Daemon(setup)
        return daemon.run(finish_when=finish_when)
    from watcher.live_view import LiveView

    with LiveView() as view:
        setup_logging(0, "live", console=view.console)
        daemon = Daemon(setup, view=view)
        daemon.idle_text = idle_text
        return daemon.run(finish_when=finish_when)


def print_results(records: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = sorted({k for r in records for k in r.metrics if not k.endswith("_stderr")})
    # Task names share long prefixes (ckpt_watch_smoke_mc, ckpt_watch_smoke_ppl): show only what differs.
    tasks = sorted({n.rpartition("/")[0] for n in names})
    common = os.path.commonprefix(tasks) if len(tasks) > 1 else ""
    common = common[: common.rfind("_") + 1]
    table = Table(title="ckpt-watch results" + (f" (tasks {common}*)" if common else ""))
    table.add_column("step", justify="right")
    table.add_column("variant")
    table.add_column("status")
    for name in names:
        table.add_column(name[len(common) :], justify="right", min_width=len(name) - len(common))
    table.add_column("time (s)", justify="right")
    for r in sorted(records, key=lambda r: (r.step, r.variant)):
        cells = [f"{r.metrics[n]:.4g}" if n in r.metrics else "" for n in names]
        table.add_row(str(r.step), r.variant, r.status, *cells, f"{r.walltime_s:.1f}")
    Console(width=max(140, Console().width)).print(table)
