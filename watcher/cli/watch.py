"""`ckpt-watch OUTPUT_DIR [options]`: the daemon that watches a training run, or a one-shot `--scan`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from watcher import __version__
from watcher.cli.common import (EXIT_OK, _Parser, add_logging_arguments, add_wandb_arguments, load_config,
                                resolve_log_format, setup_logging)  # fmt: skip
from watcher.config import POLICIES


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def watch_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckpt-watch",
        description="Evaluate every checkpoint of a training run as soon as it is completely written, on a "
        "device of its own. Other commands: demo, merge, presets, compare, sync, status, plot, finalize, best "
        "(`ckpt-watch COMMAND --help`).",
    )
    parser.add_argument("output_dir", nargs="*", type=Path,
                        help="the training run's output_dir (several: one daemon watches them all)")  # fmt: skip
    parser.add_argument("--runs-root", type=Path, metavar="DIR",
                        help="watch every run under DIR: each subfolder that holds checkpoint folders")  # fmt: skip
    parser.add_argument("--config", type=Path, help="TOML file setting any option below (flags override it)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or cuda:N,M (default: cpu)")
    parser.add_argument("--preset", help="evaluation preset (default: smoke)")
    parser.add_argument("--policy", choices=POLICIES, help="all: every checkpoint in order; latest: newest only")
    parser.add_argument("--scan", action="store_true", help="one-shot backfill: process what is there, then exit")
    parser.add_argument("--retry-failed", action="store_true", help="run jobs that failed every attempt again")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    parser.add_argument("--poll", type=_seconds, metavar="SECONDS", help="poll instead of inotify, this often")
    parser.add_argument("--settle", type=_seconds, metavar="SECONDS", help="quiet time before a checkpoint counts")
    parser.add_argument("--sentinel", metavar="NAME", help="a checkpoint is complete when this file exists in it")
    add_wandb_arguments(parser)
    add_logging_arguments(parser)
    parser.add_argument("--version", action="version", version=f"ckpt-watch {__version__}")
    return parser


def watch_main(argv: list[str]) -> int:
    from watcher.daemon import Daemon
    from watcher.startup import wait_for_output_dir
    from watcher.setup import check_watch_target, has_checkpoint_folders, resolve_setup

    args = watch_parser().parse_args(argv)
    # --scan of a missing dir is an error; a daemon waits for one run's dir (several must all be there)
    first = load_config(args, missing_ok=not args.scan, several_ok=True)
    log_format = resolve_log_format(first.log_format)
    if log_format != "live":
        setup_logging(first.verbosity, log_format)
    if not first.several_runs and first.runs_root is None and not first.output_dir.is_dir():
        check_watch_target(first)  # a path inside a checkpoint is wrong whether or not it exists yet
        if not wait_for_output_dir(first.output_dir, live=log_format == "live"):
            return EXIT_OK  # stopped (SIGTERM, Ctrl-C) while waiting
    def build_setup():
        """The whole set-up from the flags and the config file: at start, and again at each SIGHUP."""
        setup = resolve_setup(load_config(args, several_ok=True))
        setup.retry_failed = args.retry_failed
        setup.reload = build_setup
        return setup

    setup = build_setup()  # checks everything, creates nothing
    if args.scan and all(not has_checkpoint_folders(run.config) and not run.journal_path.exists()
                         for run in setup.runs):  # fmt: skip
        # Nothing to evaluate and no earlier results to deliver: create nothing in a folder named by mistake.
        where = setup.config.runs_root or ", ".join(str(run.output_dir) for run in setup.runs)
        print(f"ckpt-watch: nothing to do: no checkpoint folders (checkpoint-N, step-N) in {where}", file=sys.stderr)
        return EXIT_OK
    if log_format != "live":
        return Daemon(setup).run(scan=args.scan)
    from watcher.live_view import LiveView

    with LiveView() as view:
        setup_logging(setup.config.verbosity, "live", console=view.console)
        return Daemon(setup, view=view).run(scan=args.scan)
