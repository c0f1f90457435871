"""`ckpt-watch sync OUTPUT_DIR`: deliver every pending result now (W&B after an outage, or once training ended).

Run it once the training run has finished (in `defer` mode, results wait for that), or to flush results that
waited while W&B was unreachable. It takes the results dir's lock, so it refuses to run beside a daemon (which
delivers by itself, retrying with backoff). Exit status 0 when nothing is left pending, 1 otherwise (the reason
is logged), 2 for a usage error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("ckpt-watch")


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser, add_wandb_arguments, load_config, setup_logging
    from watcher.setup import lock_path, make_sinks, resolve_setup_paths, take_lock
    from watcher.journal import Journal
    from watcher.outbox import Outbox
    from watcher.sinks.wandb_run import upload_note

    parser = _Parser(prog="ckpt-watch sync", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", type=Path, help="the training run's output_dir")
    parser.add_argument("--config", type=Path, help="the daemon's config file (for its results dir and W&B settings)")
    parser.add_argument("--results-dir", type=Path, help="default: OUTPUT_DIR/ckpt-watch")
    add_wandb_arguments(parser)
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(argv)
    config = load_config(args)
    setup_logging(config.verbosity, "json" if config.log_format == "json" else "plain")  # no live view here
    results_dir, journal_path = resolve_setup_paths(config)
    if not journal_path.is_file():
        log.info("nothing to deliver: no journal at %s", journal_path)
        return 0
    lock = take_lock(lock_path(journal_path), results_dir)
    journal = Journal(journal_path)
    outbox = Outbox(journal, make_sinks(config, results_dir, force=True, journal_path=journal_path))
    try:
        pending = outbox.deliver_pending(force=True)
    finally:
        outbox.close()
        journal.close()
        lock.close()
    waiting = {name: count for name, count in pending.items() if count}
    note = upload_note(config.wandb, Path(config.output_dir), results_dir)
    if note:
        print(note, flush=True)  # on stdout: the command is this command's product
    if waiting:
        log.error("still pending: %s", ", ".join(f"{count} result(s) for {name}" for name, count in waiting.items()))
        return 1
    sinks = [f"{name} (as offline runs: upload them with the command above)" if name == "wandb" and note else name
             for name in pending]  # fmt: skip
    log.info("every result is delivered: %s", ", ".join(sinks))
    sys.stdout.flush()
    return 0
