"""Change feeds: tell the main loop which checkpoint folders may have changed.

Two backends with one shape, like watchdog's own observers: `InotifyFeed` (watchdog, recursive, for local
disks) and `PollingFeed` (no watching at all; the main loop re-lists the output dir one level deep every poll
interval). Network filesystems (NFS, Lustre, GPFS, CIFS, FUSE, ...) deliver no inotify events for writes made
on other hosts, so they get polling. Either way the main loop also runs a periodic reconciliation scan, because
inotify silently drops events when its queue overflows.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger("ckpt-watch")

NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "beegfs",
    "panfs", "wekafs", "9p", "afs", "ncpfs", "davfs", "sshfs", "fuse",
}  # fmt: skip


def filesystem_type(path: Path, mounts_file: str = "/proc/self/mounts") -> str:
    """The filesystem type of the mount holding `path` (the longest matching mount point), or "unknown"."""
    target = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open(mounts_file, encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # The mount table escapes spaces and friends as octal (\040).
                mount_point = fields[1].encode().decode("unicode_escape")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fields[2]
    except OSError:
        pass
    return best_type


def is_network_filesystem(path: Path) -> bool:
    fstype = filesystem_type(path)
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.") or fstype.startswith("nfs")


class PollingFeed:
    """No events: the main loop re-lists the output dir every poll interval."""

    mode = "polling"

    def __init__(self, interval: float):
        self.interval = interval
        self._wake = threading.Event()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.wake()

    def wake(self) -> None:
        """End the current `wait` early (safe to call from a signal handler)."""
        self._wake.set()

    def wait(self, timeout: float) -> set[str]:
        self._wake.wait(timeout)
        self._wake.clear()
        return set()


class InotifyFeed:
    """watchdog observer; reports the checkpoint folder names under which something happened.

    The output dir itself is watched one level deep and each checkpoint folder recursively, rather than the
    whole tree: the results dir, TensorBoard's `runs/` or W&B's `wandb/` would otherwise flood the queue.
    """

    mode = "inotify"

    def __init__(self, output_dir: Path, is_checkpoint: Callable[[str], bool]):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self._root = os.path.realpath(output_dir)
        self._is_checkpoint = is_checkpoint
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._watches: dict[str, object] = {}
        feed = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if path:
                        feed._note(os.fsdecode(path))

        self._handler = _Handler()
        self._observer = Observer()
        self._observer.schedule(self._handler, self._root, recursive=False)

    def _note(self, path: str) -> None:
        top = os.path.relpath(path, self._root).split(os.sep, 1)[0]
        if self._is_checkpoint(top):
            self._queue.put(top)

    def start(self) -> None:
        self._observer.start()
        for entry in os.scandir(self._root):
            if self._is_checkpoint(entry.name):
                self._follow(entry.name)

    def stop(self) -> None:
        self._observer.stop()
        self.wake()
        self._observer.join(timeout=5)

    def wake(self) -> None:
        """End the current `wait` early (safe to call from a signal handler)."""
        self._queue.put("")

    def wait(self, timeout: float) -> set[str]:
        """Names changed since the last call; waits up to `timeout` seconds for the first one."""
        names: set[str] = set()
        try:
            names.add(self._queue.get(timeout=timeout))
            while True:
                names.add(self._queue.get_nowait())
        except queue.Empty:
            pass
        names.discard("")
        for name in names:
            self._follow(name)
        return names

    def _follow(self, name: str) -> None:
        """Watch a checkpoint folder recursively while it exists. The caller checks the folder after this, so
        writes made before the watch was in place are not missed."""
        path = os.path.join(self._root, name)
        exists = os.path.isdir(path)
        if exists and name not in self._watches:
            try:
                self._watches[name] = self._observer.schedule(self._handler, path, recursive=True)
            except FileNotFoundError:  # vanished in between
                pass
            except OSError as exc:  # watch limit reached: the reconciliation scan still sees this folder
                log.warning("cannot watch %s (%s); relying on the periodic scan for it", path, exc)
        elif not exists and name in self._watches:
            try:
                self._observer.unschedule(self._watches.pop(name))
            except (KeyError, OSError):
                pass
