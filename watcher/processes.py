"""Process handling: every process ckpt-watch starts dies with its parent and can always be found and stopped.

The rules, used by the job child (watcher/jobs.py, watcher/worker.py), the evaluators' programs
(evaluators/command.py, lmms_eval_backend.py, lm_eval_parallel.py) and the W&B delivery child
(sinks/wandb_run.py):

- `spawn` starts a child in its own process group, so that a stop reaches everything it started, with a
  parent-death signal (PR_SET_PDEATHSIG), so that it goes when its parent goes, even by SIGKILL.
- A child that starts programs of its own (the job child, the W&B delivery child) is spawned as a
  `guardian` and calls `guard` first: it
  becomes a child subreaper (orphans of its descendants, e.g. a program's background grandchild or the
  `wandb-core` service that wandb starts in a new session, are re-parented to it instead of to init), and its
  parent-death signal is SIGTERM, on which it stops its whole tree and exits. So a kill -9 of the daemon leaves
  nothing behind, at once.
- `stop` stops a group: SIGTERM, a grace period, SIGKILL, and a final SIGKILL for stragglers of the group.
- `Identity` (a group leader's pid and its start time in clock ticks, /proc/<pid>/stat field 22) is what the
  journal records for each group; `stop_leftover` stops a recorded group of a previous daemon only if it is
  provably the same one, so a recycled pid is never killed.

Linux only (prctl and /proc); elsewhere spawning works and only the parent-death and subreaper parts are
skipped. The /proc reader is written here rather than taken from psutil because three fields of one file are
all that is needed, and the raw start ticks are what makes an identity exact.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36
try:  # resolved once, here: between fork and exec only an already loaded function may be called
    _PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
except OSError:  # pragma: no cover - not Linux
    _PRCTL = None

KILL_WAIT = 10.0  # seconds to wait for a group leader after SIGKILL (it can be stuck in the kernel briefly)
PIPE_DRAIN = 2.0  # seconds to finish reading a program's output after it ended
GUARD_GRACE = 2.0  # seconds a guarded tree gets between SIGTERM and SIGKILL when its guardian is told to go


@dataclass(frozen=True)
class Identity:
    """A process (group leader) as it can be recognised later: pid plus start time (clock ticks since boot)."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> "Identity | None":
        stat = _stat(pid)
        return cls(pid, stat.start_time) if stat else None


class Ledger(Protocol):
    """Where running process groups are recorded (the journal's `processes` table, watcher/journal.py)."""

    def add(self, pgid: int, start_time: int, role: str, folder: Path | None) -> None: ...

    def remove(self, pgid: int) -> None: ...

    def all(self) -> list[Any]: ...  # records with pgid, start_time, role, folder


@dataclass(frozen=True)
class _Stat:
    pid: int
    state: str
    ppid: int
    pgid: int
    start_time: int


def _stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after its last ")".
    fields = text[text.rfind(")") + 2 :].split()
    try:  # fields[0] is field 3 (state); field 22 (starttime) is fields[19]
        return _Stat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _all_stats() -> list[_Stat]:
    stats = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children, theirs, ...), found through /proc's parent links."""
    by_parent: dict[int, list[int]] = {}
    for stat in _all_stats():
        if stat.state != "Z":
            by_parent.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], list(by_parent.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(by_parent.get(child, []))
    return found


# --- starting children ------------------------------------------------------------------------------------


def _set_death_signal(sig: int) -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig))


def spawn(argv: Sequence[str], guardian: bool = False, ledger: Ledger | None = None, role: str = "",
          folder: Path | None = None, **popen: Any) -> subprocess.Popen:  # fmt: skip
    """Start `argv` in a new process group (and session) that dies when this process dies.

    Any program gets SIGKILL then, set between fork and exec. `guardian`: a Python child of ours that calls
    `guard` first thing and so sets its own death signal (no code runs between fork and exec then, which is
    the safe way in a process with threads, like the daemon). `ledger`: record the group there (as `role`,
    owning `folder`) for the next daemon, should this one be killed; `run` forgets it at the end, otherwise
    the caller does. Other keyword arguments go to subprocess.Popen.
    """
    death = None if guardian else (lambda: _set_death_signal(signal.SIGKILL))
    proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=death, **popen)
    identity = Identity.of(proc.pid)
    if ledger is not None and identity is not None:  # None: already ended and reaped, nothing to record
        try:
            ledger.add(proc.pid, identity.start_time, role, folder)
        except BaseException:  # e.g. the disk is full: no child may run that the next daemon could not find
            stop(proc, 0.0)
            raise
    return proc


def run(argv: Sequence[str], timeout: float | None = None, grace: float = 10.0, **spawn_args: Any) -> subprocess.CompletedProcess:
    """Like subprocess.run, but in a process group of its own that dies with us (see `spawn` for the
    arguments). On a timeout (or any interruption) the whole group is stopped, not only the direct child (then
    subprocess.TimeoutExpired is raised); nothing of the group outlives the call. The call ends when the
    program does: a background process it left holding its stdout does not keep us waiting (subprocess.run
    would wait for it, possibly forever)."""
    text = spawn_args.pop("text", False)
    if spawn_args.pop("capture_output", False):
        spawn_args.setdefault("stdout", subprocess.PIPE)
        spawn_args.setdefault("stderr", subprocess.PIPE)
    proc = spawn(argv, **spawn_args)
    readers = [_Drain(stream) for stream in (proc.stdout, proc.stderr)]
    try:
        proc.wait(timeout=timeout)
    except BaseException:
        stop(proc, grace)
        raise
    finally:
        kill_group(proc.pid, signal.SIGKILL)  # a background grandchild the program did not wait for
        for reader in readers:
            reader.join(PIPE_DRAIN)
        if spawn_args.get("ledger") is not None:
            spawn_args["ledger"].remove(proc.pid)
    out, err = (reader.data(text) for reader in readers)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class _Drain:
    """Read a child's pipe to the end in a thread (nothing, for a stream that is not a pipe)."""

    def __init__(self, stream: Any):
        self._chunks: list[bytes] = []
        self._thread = None
        if stream is not None:
            self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
            self._thread.start()

    def _read(self, stream: Any) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            self._chunks.append(chunk)
        stream.close()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def data(self, text: bool) -> str | bytes | None:
        if self._thread is None:
            return None
        data = b"".join(self._chunks)
        return data.decode(errors="replace") if text else data


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """For a Python child started by something other than `spawn` (accelerate's ranks): get `sig` when the
    parent dies; if the parent is already gone (we were re-parented before prctl took effect), exit at once."""
    _set_death_signal(sig)
    if os.getppid() != parent_pid:
        os._exit(1)


def guard(parent_pid: int | None) -> None:
    """Make this process the guardian of everything it will start (see the module docstring).

    Call it first thing in a child started by `spawn(..., guardian=True)`. On SIGTERM (the parent died,
    or the parent is stopping us) every descendant gets SIGTERM, then SIGKILL after GUARD_GRACE, and we exit.
    `parent_pid` None: no parent to follow (a Slurm job: Slurm's SIGTERM is the only stop).
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_CHILD_SUBREAPER, 1)

    def stop_tree(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_descendants(os.getpid(), GUARD_GRACE)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop_tree)
    if parent_pid is not None:
        die_with_parent(parent_pid, signal.SIGTERM)


def stop_descendants(pid: int, grace: float) -> None:
    """SIGTERM every descendant of `pid` (our own: we must be `pid` or an ancestor of it), SIGKILL what is left
    after `grace` seconds, and reap the zombies a subreaper collects."""
    deadline = time.monotonic() + grace
    termed: set[int] = set()
    while True:
        _reap_zombies()
        pids = descendants(pid)
        if not pids:
            return
        late = time.monotonic() >= deadline
        for child in pids:
            if late or child not in termed:  # SIGTERM once each (a second one makes some programs skip cleanup)
                try:
                    os.kill(child, signal.SIGKILL if late else signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
                termed.add(child)
        if time.monotonic() >= deadline + KILL_WAIT:
            return  # stuck in the kernel (D state): nothing more a signal can do
        time.sleep(0.05)


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --- stopping groups --------------------------------------------------------------------------------------


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the process group that `proc` leads: SIGTERM, up to `grace` seconds, then SIGKILL; reap `proc`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        if not kill_group(proc.pid, sig):
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    kill_group(proc.pid, signal.SIGKILL)  # grandchildren the leader did not wait for


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal every process of group `pgid`; False if the group has no member left."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_leftover(leader: Identity) -> int:
    """Stop a process group recorded by an earlier daemon, if it is provably that group; returns how many
    processes were signalled.

    The leader alive with the recorded start time: it is the same process. The leader gone: a pid is not reused
    while a process group of that number has members, so processes still in group `leader.pid` that started no
    earlier than the leader are its leftovers. A leader whose pid now belongs to another process is left alone.
    """
    stat = _stat(leader.pid)
    if stat is not None and stat.state != "Z" and stat.start_time != leader.start_time:
        return 0  # recycled pid: not ours
    members = [s for s in _all_stats() if s.pgid == leader.pid and s.state != "Z" and s.start_time >= leader.start_time]
    targets = {s.pid for s in members}
    if stat is not None and stat.state != "Z" and stat.pgid == leader.pid:
        targets |= set(descendants(leader.pid))  # a guardian's tree (subreaper), also outside its group
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(targets)


def stop_leftovers(ledger: Ledger) -> tuple[int, list[str]]:
    """Stop what a previous daemon recorded in `ledger` and left running (it was killed), remove each group's
    folder, and forget them. Only for a daemon that holds the results dir's lock: then none of them is ours.
    Returns the number of processes stopped and the roles of the groups they belonged to."""
    count, roles = 0, []
    for record in ledger.all():
        stopped = stop_leftover(Identity(record.pgid, record.start_time))
        if stopped:
            count += stopped
            roles.append(record.role)
        if record.folder is not None:
            shutil.rmtree(record.folder, ignore_errors=True)
        ledger.remove(record.pgid)
    return count, roles
