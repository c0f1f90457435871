"""Change feeds: tell the main loop which checkpoint folders may have changed.

Two backends behind one contract, `Feed` (as watchdog's observers share `observers/api.py`): `InotifyFeed`
(watchdog, recursive, for local disks) and `PollingFeed` (no watching at all; the main loop re-lists the output
dir one level deep every poll interval). Network filesystems (NFS, Lustre, GPFS, CIFS, FUSE, ...) deliver no
inotify events for writes made on other hosts, so they get polling. Either way the main loop also runs a periodic reconciliation scan; an
inotify queue overflow (events dropped by the kernel) is reported by `overflowed()` so that the loop rescans at
once instead of waiting for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Literal, Protocol

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


class Feed(Protocol):
    """What the main loop asks of a change feed. Only `wake` may be called from another thread or a signal
    handler; everything else is called from the main loop."""

    mode: Literal["inotify", "polling"]  # how the daemon says it watches (the live view, the start-up line)
    notify: Callable[[], None]  # called (from any thread) whenever `wait` would return at once: FeedSet's wake-up

    def start(self) -> None:
        """Begin watching; raises OSError when the backend cannot (the caller falls back to polling)."""
        ...

    def wait(self, timeout: float) -> set[str]:
        """The checkpoint folder names that may have changed since the last call, waiting up to `timeout`
        seconds for the first one; an empty set when nothing is known (polling) or `wake` was called."""
        ...

    def wake(self) -> None:
        """End the current `wait` early (safe to call from a signal handler or another thread)."""
        ...

    def overflowed(self) -> bool:
        """True once after events were lost: the caller must rescan everything now."""
        ...

    def stop(self) -> None:
        """Stop watching and end a `wait` in progress."""
        ...


class PollingFeed:
    """No events: the main loop re-lists the output dir every poll interval."""

    mode: Literal["polling"] = "polling"

    def __init__(self, interval: float):
        self.interval = interval
        self._wake = threading.Event()
        self.notify: Callable[[], None] = lambda: None  # also told of a wake (FeedSet)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.wake()

    def wake(self) -> None:
        """End the current `wait` early (safe to call from a signal handler)."""
        self._wake.set()
        self.notify()

    def wait(self, timeout: float) -> set[str]:
        self._wake.wait(timeout)
        self._wake.clear()
        return set()

    def overflowed(self) -> bool:
        return False  # nothing to drop: every poll lists the output dir


class InotifyFeed:
    """watchdog observer; reports the checkpoint folder names under which something happened.

    The output dir itself is watched one level deep and each checkpoint folder recursively, rather than the
    whole tree: the results dir, TensorBoard's `runs/` or W&B's `wandb/` would otherwise flood the queue.
    """

    mode: Literal["inotify"] = "inotify"

    def __init__(self, output_dir: Path, is_checkpoint: Callable[[str], bool]):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self._root = os.path.realpath(output_dir)
        self._is_checkpoint = is_checkpoint
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.notify: Callable[[], None] = lambda: None  # also told of every name queued (FeedSet)
        self._watches: dict[str, object] = {}  # name -> watchdog's watch of that checkpoint folder
        self._gone: set[str] = set()  # folders deleted (or moved away) since their watch was made
        self._overflows = 0  # set by watchdog's thread, read by `overflowed` in the main loop
        self._overflows_seen = 0
        self._overflow_signal = _OverflowSignal(self)
        feed = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory and event.event_type in ("deleted", "moved"):
                    feed._note_gone(os.fsdecode(event.src_path))
                for path in (event.src_path, event.dest_path):  # dest_path: "" unless moved
                    if path:
                        feed._note(os.fsdecode(path))

        self._handler = _Handler()
        self._observer = Observer()
        self._observer.schedule(self._handler, self._root, recursive=False)

    def _note(self, path: str) -> None:
        top = os.path.relpath(path, self._root).split(os.sep, 1)[0]
        if self._is_checkpoint(top):
            self._queue.put(top)
            self.notify()

    def _note_gone(self, path: str) -> None:
        """Called from watchdog's thread for a folder deleted or moved away."""
        name = os.path.relpath(path, self._root)
        if os.sep not in name and self._is_checkpoint(name):
            self._gone.add(name)

    def start(self) -> None:
        self._overflow_signal.install()
        self._observer.start()
        self._follow_all()

    def _follow_all(self) -> None:
        try:
            present = {entry.name for entry in os.scandir(self._root) if self._is_checkpoint(entry.name)}
        except OSError:
            return  # the rescan that follows reports it
        for name in present | set(self._watches):
            self._follow(name)

    def stop(self) -> None:
        self._observer.stop()
        self.wake()
        self._observer.join(timeout=5)
        self._overflow_signal.remove()

    def wake(self) -> None:
        """End the current `wait` early (safe to call from a signal handler)."""
        self._queue.put("")
        self.notify()

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

    def overflowed(self) -> bool:
        """True once after the kernel dropped events (its queue overflowed): the caller must rescan everything.
        Logged once per daemon (a busy output dir may overflow again and again; each time it is rescanned)."""
        count = self._overflows
        if count == self._overflows_seen:
            return False
        if not self._overflows_seen:
            log.warning("inotify dropped events (its queue overflowed; raise fs.inotify.max_queued_events, now %s, "
                        "to avoid it); rescanning %s now", _max_queued_events(), self._root)  # fmt: skip
        else:
            log.debug("inotify queue overflowed again; rescanning")
        self._overflows_seen = count
        self._follow_all()  # folders created or deleted while events were lost
        return True

    def _overflowed(self) -> None:
        """Called from watchdog's thread on an overflow."""
        self._overflows += 1
        self.wake()

    def _follow(self, name: str) -> None:
        """Watch a checkpoint folder recursively while it exists. The caller checks the folder after this, so
        writes made before the watch was in place are not missed.

        A folder deleted and created again under the same name needs a new watch: watchdog's emitter for the old
        one stopped itself at the deletion (IN_DELETE_SELF) but stays scheduled, and scheduling the same path
        again would reuse it. Without this, writes inside the new folder were seen only by the next rescan (24.6 s
        instead of 0.4 s). The deletion event says so; the inode cannot, as the new folder may reuse it."""
        path = os.path.join(self._root, name)
        exists = os.path.isdir(path)
        if name in self._watches and (not exists or name in self._gone):
            try:
                self._observer.unschedule(self._watches.pop(name))
            except (KeyError, OSError):
                pass
        self._gone.discard(name)
        if exists and name not in self._watches:
            try:
                self._watches[name] = self._observer.schedule(self._handler, path, recursive=True)
            except FileNotFoundError:  # vanished in between
                pass
            except OSError as exc:  # watch limit reached: the reconciliation scan still sees this folder
                log.warning("cannot watch %s (%s); relying on the periodic scan for it", path, exc)


class _OverflowSignal(logging.Filter):
    """Tells the feed when the kernel's inotify queue overflowed.

    watchdog (7.1.0, watchdog/observers/inotify_c.py, `InotifyFD.handle_event`) handles IN_Q_OVERFLOW by logging
    "Inotify queue overflowed; filesystem events were lost" on its logger `watchdog.observers.inotify_c` and
    re-adding its recursive watches; no event reaches the handlers, so that log record is the only sign of it
    (watchdog before 7.1 dropped the overflow event, wd -1, without a trace). This filter on that logger turns the
    record into a call to the feed and keeps watchdog's own records out of our log, as watcher/logs.py wants.
    """

    LOGGER = "watchdog.observers.inotify_c"
    MESSAGE = "Inotify queue overflowed"

    def __init__(self, feed: InotifyFeed):
        super().__init__()
        self._feed = feed

    def install(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.addFilter(self)
        logger.setLevel(logging.WARNING)  # its parent `watchdog` is silenced; this record must still be made

    def remove(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeFilter(self)
        logger.setLevel(logging.NOTSET)

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.MESSAGE):
            self._feed._overflowed()
        return False


class FeedSet:
    """Several runs' feeds waited on as one (the daemon's loop has one wait): each feed tells a shared event of
    what it queues, and `wait` then collects every feed's names without blocking."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.feeds: dict[str, Feed] = {}  # run name -> its feed

    def add(self, name: str, feed: Feed) -> None:
        feed.notify = self._event.set
        self.feeds[name] = feed
        self._event.set()  # what it queued before this is collected at the next wait

    def wait(self, timeout: float) -> dict[str, set[str]]:
        """Per run, the checkpoint names that may have changed; waits up to `timeout` for the first one."""
        self._event.wait(timeout)
        self._event.clear()  # before collecting: a name queued from here on sets it again
        return {name: feed.wait(0) for name, feed in self.feeds.items()}

    def wake(self) -> None:
        """End the current `wait` early (safe to call from a signal handler)."""
        self._event.set()

    def overflowed(self) -> bool:
        """True once after some feed lost events (see Feed.overflowed): rescan every run."""
        return any([feed.overflowed() for feed in self.feeds.values()])  # a list: ask every feed (each says once)

    def stop(self) -> None:
        for feed in self.feeds.values():
            feed.stop()
        self.wake()


def _max_queued_events() -> str:
    try:
        with open("/proc/sys/fs/inotify/max_queued_events", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return "?"
