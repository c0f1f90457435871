"""What every subcommand of the command line shares: exit statuses, the argument parser, the configuration from
the config file and the flags, logging set-up and the one-line error.

A leaf of the cli package: subcommands import from here, never from each other or from `watcher.cli` itself,
so the command line has no import cycle however it grows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from watcher.config import LOG_FORMATS, ConfigError, WatchConfig, build_config, load_toml

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(prog: str, message: str) -> None:
    """The one line a command prints for a problem it cannot get past (never a traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)


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


def setup_logging(verbosity: int, log_format: str = "plain", console=None) -> None:
    """See watcher/logs.py; `log_format` is plain, json or live (resolve `auto` with `resolve_log_format`)."""
    from watcher.logs import setup_logging as setup  # lazy: `--help` and the quick commands skip rich's import

    setup(verbosity, log_format, console)


def resolve_log_format(log_format: str) -> str:
    from watcher.logs import resolve_log_format as resolve

    return resolve(log_format)
