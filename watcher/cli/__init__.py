"""Command line: `ckpt-watch OUTPUT_DIR [options]` (daemon or `--scan`) and its subcommands, one module each.

Exit status: 0 success (or nothing to do), 1 at least one job failed, 2 usage or configuration error.
Every usage or configuration problem is one line on stderr, never a traceback.

    watch.py     ckpt-watch OUTPUT_DIR: the daemon, or a one-shot --scan
    status.py    ckpt-watch status        plot.py      ckpt-watch plot
    compare.py   ckpt-watch compare       merge.py     ckpt-watch merge
    sync.py      ckpt-watch sync          presets.py   ckpt-watch presets
    demo.py      ckpt-watch demo          finalize.py  ckpt-watch finalize
    best.py      ckpt-watch best
    common.py    what they share (exit statuses, the parser, load_config, logging set-up): a leaf

Nothing outside this package imports from it (an import-linter contract in pyproject.toml says so).
"""

from __future__ import annotations

import importlib
import sys

from watcher.cli.common import EXIT_USAGE, print_error
from watcher.config import ConfigError

SUBCOMMANDS = {  # name -> module with main(argv); imported only when used, so `ckpt-watch --help` stays quick
    "demo": "watcher.cli.demo",
    "merge": "watcher.cli.merge",
    "presets": "watcher.cli.presets",
    "compare": "watcher.cli.compare",
    "sync": "watcher.cli.sync",
    "status": "watcher.cli.status",
    "plot": "watcher.cli.plot",
    "finalize": "watcher.cli.finalize",
    "best": "watcher.cli.best",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        from watcher.cli.watch import watch_main

        return watch_main(argv)
    except ConfigError as exc:
        print_error("ckpt-watch", str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
