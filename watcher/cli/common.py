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


def load_config(args: argparse.Namespace, missing_ok: bool = False, several_ok: bool = False) -> WatchConfig:
    """The configuration from the config file and the flags. `missing_ok`: an output dir that does not exist
    yet is accepted (the daemon waits for training to create it). `several_ok`: the command takes several runs
    (a list of output dirs, or runs_root); others need one run."""
    file_values = load_toml(args.config) if args.config else {}
    verbosity = 1 if args.verbose else (-1 if args.quiet else None)
    # Flags a command does not have (`sync` has no --device) count as not given.
    flags = ("output_dir", "runs_root", "device", "preset", "policy", "results_dir", "poll", "settle", "sentinel",
             "wandb", "wandb_live", "tensorboard", "log_format")  # fmt: skip
    given = {name: getattr(args, name, None) for name in flags}
    if isinstance(given["output_dir"], list):  # `ckpt-watch DIR [DIR ...]`
        given["output_dir"] = (given["output_dir"] if len(given["output_dir"]) > 1 else given["output_dir"][0]) \
            if given["output_dir"] else None
    # What the command line names replaces what the file names: runs given there are the runs.
    if given["output_dir"] is not None:
        file_values.pop("runs_root", None)
    if given["runs_root"] is not None:
        file_values.pop("output_dir", None)
    config = build_config(file_values, {**given, "verbosity": verbosity})
    if config.output_dir is None and config.runs_root is None:
        raise ConfigError("no output dir: give OUTPUT_DIR or set output_dir in the config file")
    if config.several_runs and not several_ok:
        raise ConfigError("the config file names several runs: give the one OUTPUT_DIR this command is for")
    if config.runs_root is not None:
        if not Path(config.runs_root).is_dir():
            raise ConfigError(f"runs_root not found: {config.runs_root}")
        config.runs_root = Path(config.runs_root).resolve()
        return config
    dirs = config.output_dirs()
    for folder in dirs:
        if not (missing_ok and len(dirs) == 1) and not folder.is_dir():
            raise ConfigError(f"output dir not found: {folder}")
    resolved = [folder.resolve() for folder in dirs]
    config.output_dir = resolved if len(resolved) > 1 else resolved[0]
    return config


def setup_logging(verbosity: int, log_format: str = "plain", console=None) -> None:
    """See watcher/logs.py; `log_format` is plain, json or live (resolve `auto` with `resolve_log_format`)."""
    from watcher.logs import setup_logging as setup  # lazy: `--help` and the quick commands skip rich's import

    setup(verbosity, log_format, console)


def resolve_log_format(log_format: str) -> str:
    from watcher.logs import resolve_log_format as resolve

    return resolve(log_format)
