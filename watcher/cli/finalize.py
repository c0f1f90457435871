"""`ckpt-watch finalize OUTPUT_DIR`: say that a training run has finished, so `final = true` schedules run.

    ckpt-watch finalize OUTPUT_DIR [--step N] [--undo] [--config FILE] [--results-dir DIR]

For trainers without the ckpt-watch callback (whose run record says `state = finished` by itself), or to name
another final checkpoint. Writes RESULTS_DIR/finalized.json (watcher/final.py) atomically with the step of the
final checkpoint: --step N, else the highest checkpoint step in OUTPUT_DIR now. It takes no lock, so it works
beside a running daemon, which picks it up at its next rescan, and before any daemon ran (the results dir is
then created; OUTPUT_DIR itself must exist). `--undo` removes the file again. Exit status 0, or 2 for a usage
error (one line on stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser, load_config
    from watcher.config import ConfigError
    from watcher.final import clear_finalized, write_finalized
    from watcher.integrations.run_record import read_run_record
    from watcher.setup import check_watch_target, checkpoint_folder_steps, resolve_setup_paths

    parser = _Parser(prog="ckpt-watch finalize", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", type=Path, help="the training run's output_dir")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, metavar="N", help="the final checkpoint's step (default: the highest "
                       "checkpoint step in OUTPUT_DIR now)")  # fmt: skip
    which.add_argument("--undo", action="store_true", help="remove what an earlier `finalize` wrote")
    parser.add_argument("--config", type=Path, help="the daemon's config file (for its results dir)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    parser.set_defaults(verbose=False, quiet=False)  # load_config reads them
    args = parser.parse_args(argv)
    if args.step is not None and args.step < 0:
        parser.error(f"argument --step: must not be negative: {args.step}")
    config = load_config(args)
    check_watch_target(config)  # never write into a checkpoint folder named by mistake
    results_dir, _ = resolve_setup_paths(config)
    output_dir = config.output_dir
    if args.undo:
        if not clear_finalized(results_dir):
            print(f"ckpt-watch finalize: nothing to undo: {output_dir} was not finalized")
            return 0
        record = read_run_record(output_dir)
        still = (" (its run record still says the training finished, so `final` schedules still apply)"
                 if record is not None and record.get("state") == "finished" else "")  # fmt: skip
        print(f"ckpt-watch finalize: {output_dir} is no longer finalized{still}")
        return 0
    folders = checkpoint_folder_steps(config)
    step = args.step
    if step is None:
        if not folders:
            raise ConfigError(f"no checkpoint folder in {output_dir} (none matches checkpoint_pattern "
                              f"{config.checkpoint_pattern}): give the final step with --step N")  # fmt: skip
        step = max(folders)
    try:
        write_finalized(results_dir, step)
    except OSError as exc:
        raise ConfigError(f"cannot write to the results dir {results_dir}: {exc.strerror or exc}") from None
    if step in folders:
        what = f"{folders[step]} is now the final checkpoint of {output_dir}"
    else:
        what = (f"step {step} is now the final step of {output_dir} (no checkpoint folder for it yet: until one "
                "appears, the last checkpoint counts as final)")  # fmt: skip
    print(f"ckpt-watch finalize: {what}; a running ckpt-watch picks this up at its next rescan "
          f"(`ckpt-watch finalize {output_dir} --undo` takes it back)")  # fmt: skip
    sys.stdout.flush()
    return 0
