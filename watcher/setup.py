"""The daemon's set-up: everything it needs, resolved from the configuration before anything starts.

Also used by the commands that work on a daemon's results without running one (`sync`, `status`): where the
results and the journal are, which sinks deliver, and the lock that allows one of them per results dir.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from watcher.completion import checkpoint_files_in
from watcher.config import ConfigError, ScheduleEntry, WatchConfig
from watcher.devices import DeviceSpec, resolve_device
from watcher.ledgers import ProcessLedger
from watcher.presets import Preset, get_preset
from watcher.sinks import Sink, SinkPlace, build_sinks
from watcher.watch import is_network_filesystem

NETWORK_POLL = 10.0
NETWORK_SETTLE = 30.0
LOCAL_SETTLE = 1.0


@dataclass
class RunSetup:
    """One watched run's places, resolved and checked: as if it had a daemon of its own."""

    name: str  # its folder's name (unique among the runs)
    config: WatchConfig  # the run's own (WatchConfig.for_run): its output_dir, results, journal, scratch dirs
    results_dir: Path
    journal_path: Path
    settle: float
    poll: float | None  # None: inotify
    sinks: list[Sink] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass
class Setup:
    """Everything `Daemon` needs, resolved and checked by the CLI before anything starts."""

    config: WatchConfig  # as loaded: output_dir may be a list, or runs_root set
    schedule: list[ScheduleEntry]  # the effective entries (config.schedule_entries(): defaults filled in)
    presets: dict[str, Preset]  # every preset the schedule names, by name
    device: DeviceSpec  # the pool: its GPUs (plain `cuda` resolved to every visible one), or cpu
    gpu_entries: list[str]  # CUDA_VISIBLE_DEVICES entries of the pool's GPUs, in the order of device.indices
    runs: list[RunSetup]  # the runs known at start (runs_root: those already holding checkpoint folders)
    retry_failed: bool = False
    reload: Callable[[], "Setup"] | None = None  # builds a fresh Setup from the config file (SIGHUP)

    def schedule_text(self) -> str:
        """The schedule in a few words: "preset smoke" (the default: one preset on every checkpoint), or
        "schedule quick, full (final)"."""
        if not self.config.schedule:
            return f"preset {self.schedule[0].preset}"
        return "schedule " + ", ".join(entry.preset + (" (final)" if entry.final else "") for entry in self.schedule)

    def new_runs(self, known: set[str]) -> list[Path]:
        """Under runs_root: subfolders that hold checkpoint folders and are not among `known` run names."""
        if self.config.runs_root is None:
            return []
        return [child for child in _subfolders(Path(self.config.runs_root))
                if child.name not in known and _checkpoint_children(child, self.config)]  # fmt: skip


def resolve_setup(config: WatchConfig) -> Setup:
    """Check everything (device, presets, the watched folders) and create nothing; a ConfigError otherwise."""
    slurm = config.executor == "slurm"
    if slurm:  # Slurm gives each job its GPUs on a compute node; this machine's devices do not matter
        from watcher.slurm import missing_tools

        why = missing_tools()
        if why:
            raise ConfigError(f"executor = slurm, but {why}")
    device, gpu_entries = resolve_device("cpu" if slurm else config.device)
    schedule = config.schedule_entries()
    presets = {entry.preset: get_preset(entry.preset, config.presets, config.backends) for entry in schedule}
    for preset in presets.values():
        if device.kind == "cuda" and preset.gpus > len(device.indices):
            raise ConfigError(f"preset {preset.name} takes {preset.gpus} GPUs per job (gpus = {preset.gpus}), but "
                              f"device {device} has {len(device.indices)}")  # fmt: skip
    setup = Setup(config, schedule, presets, device, gpu_entries, runs=[])
    dirs = config.output_dirs() or setup.new_runs(set())
    setup.runs = [resolve_run(config, folder) for folder in dirs]
    return setup


def resolve_run(config: WatchConfig, output_dir: Path) -> RunSetup:
    """One run's set-up (its folder checked, nothing created)."""
    run_config = config.for_run(output_dir)
    check_watch_target(run_config)
    results_dir, journal_path = resolve_setup_paths(run_config)
    network = is_network_filesystem(output_dir)
    settle = config.settle if config.settle is not None else (NETWORK_SETTLE if network else LOCAL_SETTLE)
    poll = config.poll if config.poll is not None else (NETWORK_POLL if network else None)
    return RunSetup(Path(output_dir).name, run_config, results_dir, journal_path, settle, poll,
                    make_sinks(run_config, results_dir, journal_path=journal_path))  # fmt: skip


def check_watch_target(config: WatchConfig) -> None:
    """Refuse a folder that is not a training run's output_dir before anything is created in it.

    The journal, lock and results would otherwise land inside a trainer's checkpoint (which ckpt-watch promises
    never to write into) or in whatever folder was named by mistake. Refused, with the likely right folder named:
    a checkpoint itself (its name matches checkpoint_pattern, or it holds checkpoint files and no checkpoint
    folders), a folder inside one, and a folder holding no checkpoint whose subfolders hold some (the run's
    parent). An empty folder is accepted: a daemon may start before training saves anything.
    """
    target = Path(config.output_dir)
    for depth, folder in enumerate((target, *target.parents)):
        # By its files only the target and its parent: a stray model file far up (in ~) says nothing.
        reason = _checkpoint_reason(folder, config, by_files=depth < 2)
        if reason is None:
            continue
        inside = "" if folder == target else f" is inside the checkpoint {folder}, which"
        where = folder.parent if _checkpoint_children(folder.parent, config) else None
        hint = f"watch the folder that holds it: ckpt-watch {where}" if where else (
            "watch the training run's output_dir, the folder that holds its checkpoint folders")
        raise ConfigError(f"{target}{inside} looks like a checkpoint ({reason}), not a training run's output dir; "
                          f"{hint}")  # fmt: skip
    if not _checkpoint_children(target, config):
        holders = [child for child in _subfolders(target) if _checkpoint_children(child, config)]
        if holders:
            named = " or ".join(f"ckpt-watch {child}" for child in holders[:3])
            raise ConfigError(f"{target} holds no checkpoint folder, but {holders[0].name}/ does: did you mean "
                              f"{named}?")  # fmt: skip


def _checkpoint_reason(folder: Path, config: WatchConfig, by_files: bool) -> str | None:
    """Why `folder` looks like a checkpoint, or None."""
    if config.step_of(folder.name) is not None:
        return f"its name matches checkpoint_pattern {config.checkpoint_pattern}"
    files = checkpoint_files_in(folder) if by_files else []
    if files and not _checkpoint_children(folder, config):  # a run's output_dir may hold a final saved model too
        return f"it holds {', '.join(files[:3])}"
    return None


def _checkpoint_children(folder: Path, config: WatchConfig) -> list[str]:
    return [child.name for child in _subfolders(folder) if config.step_of(child.name) is not None]


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(entry for entry in folder.iterdir() if entry.is_dir())
    except OSError:  # missing (a daemon waiting for it) or unreadable: nothing to say about it here
        return []


def has_checkpoint_folders(config: WatchConfig) -> bool:
    return bool(_checkpoint_children(Path(config.output_dir), config))


def checkpoint_folder_steps(config: WatchConfig) -> dict[int, str]:
    """step -> folder name of the checkpoint folders in the output dir now (complete or not); empty if none."""
    return {config.step_of(name): name for name in _checkpoint_children(Path(config.output_dir), config)}


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


def make_sinks(config: WatchConfig, results_dir: Path, force: bool = False, journal_path: Path | None = None) -> list[Sink]:
    """The registered sinks the configuration turns on (watcher/sinks/__init__.py): files always, W&B and
    TensorBoard unless "off". `force`: `ckpt-watch sync` (see WandbSink). `journal_path`: where a sink's child
    processes (the W&B delivery child) are recorded while they run."""
    ledger = ProcessLedger(journal_path) if journal_path is not None else None
    return build_sinks(config, SinkPlace(Path(config.output_dir), results_dir, force, ledger))


def create_dir(path: Path, what: str) -> None:
    """Create a folder the daemon needs, or say in one line why it cannot be (a ConfigError: exit 2)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} {path}: {exc.strerror or exc}") from None


def lock_path(journal_path: Path) -> Path:
    """The one-daemon-per-results-dir lock file: beside the journal (on local disk, like it)."""
    return journal_path.parent / "ckpt-watch.lock"


def lock_holder(journal_path: Path) -> tuple[bool, str | None]:
    """Whether a daemon holds the results dir's lock (`take_lock`), and the pid it wrote there.
    (`ckpt-watch sync` takes the same lock for the seconds it runs.)

    Tried with a shared, non-blocking flock on a read-only open of our own: it neither creates nor truncates the
    file, and is released at once; a daemon starting in that instant tries again (`_lock_soon`). Reading
    /proc/locks would need no lock at all, but it is Linux-only and names a file by device and inode, which on
    overlay filesystems need not be what stat() says."""
    try:
        fd = os.open(lock_path(journal_path), os.O_RDONLY)
    except OSError:
        return False, None  # no lock file: no daemon ever ran here (or one from before the lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            return True, pid or None
        return False, None
    finally:
        os.close(fd)  # releases our lock, if we got it


def _lock_soon(handle, tries: int = 10, pause: float = 0.05) -> None:
    """flock it exclusively, trying again for half a second: `ckpt-watch status` holds a shared lock for an
    instant to see whether a daemon runs, and a daemon starting in that instant must not take it for another."""
    for attempt in range(tries):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(pause)


def take_lock(path: Path, results_dir: Path):
    """One daemon per results dir: a second one would run every job twice."""
    create_dir(path.parent, "journal dir")
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        _lock_soon(handle)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"another ckpt-watch (pid {holder}) is already using {results_dir}") from None
    try:  # the holder's pid, for the message above; the lock itself needs no room on the disk
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
    except OSError:
        pass
    return handle
