"""The daemon's set-up: everything it needs, resolved from the configuration before anything starts.

Also used by the commands that work on a daemon's results without running one (`sync`, `status`): where the
results and the journal are, which sinks deliver, and the lock that allows one of them per results dir.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from watcher.config import ConfigError, WatchConfig
from watcher.devices import DeviceSpec
from watcher.presets import Preset
from watcher.sinks import FileSink, Sink
from watcher.sinks.tensorboard import AutoTensorBoardSink
from watcher.sinks.wandb_run import WandbSink
from watcher.watch import is_network_filesystem

NETWORK_POLL = 10.0
NETWORK_SETTLE = 30.0
LOCAL_SETTLE = 1.0


@dataclass
class Setup:
    """Everything `Daemon` needs, resolved and checked by the CLI before anything starts."""

    config: WatchConfig
    preset: Preset
    device: DeviceSpec
    gpu_entries: list[str]  # CUDA_VISIBLE_DEVICES entries for jobs
    results_dir: Path
    journal_path: Path
    network_fs: bool
    settle: float
    poll: float | None  # None: inotify
    retry_failed: bool = False
    sinks: list[Sink] = field(default_factory=list)
    reload: Callable[[], "Setup"] | None = None  # builds a fresh Setup from the config file (SIGHUP)


def resolve_setup(config: WatchConfig, preset: Preset, device: DeviceSpec, gpu_entries: list[str]) -> Setup:
    output_dir = Path(config.output_dir)
    results_dir, journal_path = resolve_setup_paths(config)
    network = is_network_filesystem(output_dir)
    settle = config.settle if config.settle is not None else (NETWORK_SETTLE if network else LOCAL_SETTLE)
    poll = config.poll if config.poll is not None else (NETWORK_POLL if network else None)
    return Setup(
        config=config,
        preset=preset,
        device=device,
        gpu_entries=gpu_entries,
        results_dir=results_dir,
        journal_path=journal_path,
        network_fs=network,
        settle=settle,
        poll=poll,
        sinks=make_sinks(config, results_dir),
    )


def resolve_setup_paths(config: WatchConfig) -> tuple[Path, Path]:
    """The results dir and the journal's path (kept on local disk when the results dir is on a network fs)."""
    results_dir = config.resolved_results_dir()
    journal_dir = config.journal_dir
    if journal_dir is None:
        journal_dir = results_dir
        if is_network_filesystem(results_dir.parent if not results_dir.exists() else results_dir):
            # SQLite's locking and WAL need a local disk; keep the journal in the local state dir instead.
            state_home = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
            key = hashlib.sha256(str(results_dir.resolve()).encode()).hexdigest()[:16]
            journal_dir = state_home / "ckpt-watch" / key
    return results_dir, Path(journal_dir) / "journal.sqlite"


def make_sinks(config: WatchConfig, results_dir: Path, force: bool = False) -> list[Sink]:
    """Files always; W&B and TensorBoard unless "off". `force`: `ckpt-watch sync` (see WandbSink)."""
    sinks: list[Sink] = [FileSink(results_dir)]
    if config.wandb != "off":
        sinks.append(WandbSink(config.wandb, config.wandb_live, Path(config.output_dir), results_dir, force))
    if config.tensorboard != "off":
        sinks.append(AutoTensorBoardSink(config.tensorboard, Path(config.output_dir)))
    return sinks


def take_lock(path: Path, results_dir: Path):
    """One daemon per results dir: a second one would run every job twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"another ckpt-watch (pid {holder}) is already using {results_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
