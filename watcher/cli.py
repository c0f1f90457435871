"""Command line: `ckpt-watch OUTPUT_DIR [options]` (daemon or `--scan`) and `ckpt-watch demo`.

Exit status: 0 success (or nothing to do), 1 at least one job failed, 2 usage or configuration error.
Every usage or configuration problem is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from watcher import __version__
from watcher.config import LOG_FORMATS, POLICIES, ConfigError, WatchConfig, build_config, load_toml

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUBCOMMANDS = {  # name -> module with main(argv)
    "demo": "watcher.demo",
    "merge": "watcher.merge_command",
    "presets": "watcher.presets_command",
    "compare": "watcher.compare",
    "sync": "watcher.sync_command",
    "status": "watcher.status_command",
    "plot": "watcher.plot_command",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
        "device of its own. Other commands: demo, merge, presets, compare, sync, status, plot "
        "(`ckpt-watch COMMAND --help`).",
    )
    parser.add_argument("output_dir", nargs="?", type=Path, help="the training run's output_dir")
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


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="auto (default: the live view at a terminal, else plain), plain, json")  # fmt: skip


def add_wandb_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb", metavar="auto|off|[ENTITY/]PROJECT/RUN_ID",
                        help="the W&B run that gets the results (default: auto, the training run)")  # fmt: skip
    parser.add_argument("--wandb-live", choices=("defer", "shared"),
                        help="while training still writes the run: defer (default) or shared")  # fmt: skip
    parser.add_argument("--tensorboard", metavar="auto|off|DIR", help="TensorBoard event files (default: auto)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return watch_main(argv)
    except ConfigError as exc:
        print(f"ckpt-watch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def load_config(args: argparse.Namespace, missing_ok: bool = False) -> WatchConfig:
    """The configuration from the config file and the flags. `missing_ok`: an output dir that does not exist
    yet is accepted (the daemon waits for training to create it)."""
    file_values = load_toml(args.config) if args.config else {}
    verbosity = 1 if args.verbose else (-1 if args.quiet else None)
    # Flags a command does not have (`sync` has no --device) count as not given.
    flags = ("output_dir", "device", "preset", "policy", "results_dir", "poll", "settle", "sentinel", "wandb",
             "wandb_live", "tensorboard", "log_format")  # fmt: skip
    config = build_config(file_values, {**{name: getattr(args, name, None) for name in flags}, "verbosity": verbosity})
    if config.output_dir is None:
        raise ConfigError("no output dir: give OUTPUT_DIR or set output_dir in the config file")
    if not missing_ok and not Path(config.output_dir).is_dir():
        raise ConfigError(f"output dir not found: {config.output_dir}")
    config.output_dir = Path(config.output_dir).resolve()
    return config


def watch_main(argv: list[str]) -> int:
    from watcher.daemon import Daemon, wait_for_output_dir
    from watcher.setup import check_watch_target, has_checkpoint_folders, resolve_setup
    from watcher.devices import check_available, parse_device
    from watcher.presets import get_preset

    args = watch_parser().parse_args(argv)
    first = load_config(args, missing_ok=not args.scan)  # --scan of a missing dir is an error; a daemon waits
    log_format = resolve_log_format(first.log_format)
    if log_format != "live":
        setup_logging(first.verbosity, log_format)
    if not first.output_dir.is_dir():
        check_watch_target(first)  # a path inside a checkpoint is wrong whether or not it exists yet
        if not wait_for_output_dir(first.output_dir, live=log_format == "live"):
            return EXIT_OK  # stopped (SIGTERM, Ctrl-C) while waiting
    def build_setup():
        """The whole set-up from the flags and the config file: at start, and again at each SIGHUP."""
        config = load_config(args)
        preset = get_preset(config.preset, config.presets, config.backends)
        device = parse_device(config.device)
        setup = resolve_setup(config, preset, device, check_available(device))
        setup.retry_failed = args.retry_failed
        setup.reload = build_setup
        return setup

    setup = build_setup()  # checks everything, creates nothing
    if args.scan and not has_checkpoint_folders(setup.config) and not setup.journal_path.exists():
        # Nothing to evaluate and no earlier results to deliver: create nothing in a folder named by mistake.
        print(f"ckpt-watch: nothing to do: no checkpoint folders (checkpoint-N, step-N) in {setup.config.output_dir}",
              file=sys.stderr)  # fmt: skip
        return EXIT_OK
    if log_format != "live":
        return Daemon(setup).run(scan=args.scan)
    from watcher.live_view import LiveView

    with LiveView() as view:
        setup_logging(setup.config.verbosity, "live", console=view.console)
        return Daemon(setup, view=view).run(scan=args.scan)


def setup_logging(verbosity: int, log_format: str = "plain", console=None) -> None:
    """See watcher/logs.py; `log_format` is plain, json or live (resolve `auto` with `resolve_log_format`)."""
    from watcher.logs import setup_logging as setup

    setup(verbosity, log_format, console)


def resolve_log_format(log_format: str) -> str:
    from watcher.logs import resolve_log_format as resolve

    return resolve(log_format)


if __name__ == "__main__":
    sys.exit(main())
