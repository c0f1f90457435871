"""Sinks: where committed results are delivered (files, W&B, TensorBoard), one module each, built by name.

The contract (`Sink`, its capabilities and `SinkUnavailable`) is in watcher/sinks/base.py. Each sink's module
has a `build(config, place)` that returns the sink as the configuration asks for it, or None when it is off;
`build_sinks` asks every registered one, in delivery order (the files sink first: it is the record). Sink
modules are imported only when built, like the evaluators (watcher/evaluators/__init__.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from watcher.sinks.base import Sink, SinkBase, SinkSettings, SinkUnavailable
from watcher.sinks.files import FileSink, read_results

if TYPE_CHECKING:
    from watcher.processes import Ledger

__all__ = ["FileSink", "Sink", "SinkBase", "SinkPlace", "SinkSettings", "SinkUnavailable", "build_sink",
           "build_sinks", "known_sinks", "read_results"]  # fmt: skip

# sink name (its key in the journal) -> the module whose `build(config, place)` makes it; in delivery order.
_SINKS: dict[str, str] = {
    "files": "watcher.sinks.files",
    "wandb": "watcher.sinks.wandb_run",
    "tensorboard": "watcher.sinks.tensorboard",
}


@dataclass(frozen=True)
class SinkPlace:
    """Where a daemon's sinks deliver, resolved by watcher/setup.py."""

    output_dir: Path  # the training run's output_dir
    results_dir: Path
    force: bool = False  # `ckpt-watch sync`: a person says training is over (watcher/sinks/wandb_run.py)
    ledger: Ledger | None = None  # where a sink's child processes are recorded while they run


def known_sinks() -> list[str]:
    """The registered sinks, in delivery order."""
    return list(_SINKS)


def build_sink(name: str, config: SinkSettings, place: SinkPlace) -> Sink | None:
    """The sink registered as `name`, as `config` asks for it; None when the configuration turns it off."""
    try:
        module = _SINKS[name]
    except KeyError:
        raise ValueError(f"unknown sink {name!r}; known sinks: {', '.join(known_sinks())}") from None
    return importlib.import_module(module).build(config, place)


def build_sinks(config: SinkSettings, place: SinkPlace) -> list[Sink]:
    """Every sink the configuration turns on, in delivery order."""
    return [sink for name in _SINKS if (sink := build_sink(name, config, place)) is not None]
