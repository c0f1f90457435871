"""Detection: turn "something changed in the output dir" into "checkpoint-N is complete and settled".

A folder becomes ready only when (1) its completion rule holds (see `watcher.completion`) and (2) nothing in it
is written for the whole settle window: any write (a file's size, mtime or ctime) starts the window again. A
folder whose newest change is already older than the settle window (a backfill) is settled at once. Whether a
folder is new, a re-save or already journaled is decided by its fingerprint (see `watcher.fingerprint`), which
leaves out what does not change the model. The detector only reads; it never
writes inside the output dir.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watcher.completion import Verdict, check_checkpoint
from watcher.fingerprint import snapshot
from watcher.config import BadCheckpointName

log = logging.getLogger("ckpt-watch")

# An incomplete folder with no write for this long is reported (once) as stuck: no writer pauses that long
# between two files of one checkpoint, so it is a crashed save or a file the producer never writes.
STALLED_AFTER = 120.0


@dataclass(frozen=True)
class Ready:
    """A complete, settled checkpoint folder."""

    name: str
    step: int
    path: Path
    fingerprint: str
    verdict: Verdict
    progress: dict[str, float]  # train/epoch, train/tokens as it records them (`read_progress`), for the journal


@dataclass
class _Settling:
    activity: str  # Snapshot.activity when the window (re)started
    since: float
    verdict: Verdict


class Detector:
    def __init__(
        self,
        output_dir: Path,
        checked_step: Callable[[str], int | None],
        known_fingerprint: Callable[[str], str | None],
        settle: float,
        sentinel: str | None,
        clock: Callable[[], float] = time.time,
        base_model: Callable[[], Path | None] = lambda: None,
    ):
        self.output_dir = Path(output_dir)
        self._checked_step = checked_step  # raises BadCheckpointName (see WatchConfig.checked_step)
        self._known = known_fingerprint  # the journal's fingerprint of the latest present generation
        self.settle = settle
        self.sentinel = sentinel
        self._clock = clock
        self._settling: dict[str, _Settling] = {}
        self._last_reason: dict[str, str] = {}
        self._verified: dict[str, tuple[int, int]] = {}  # folder stat when it last matched the journal
        self._rejected: set[str] = set()  # names already logged as unusable
        self._base_model = base_model  # the config's base_model now (it may change on reload)
        # Folders the pattern matches that are not being evaluated, and why (for --scan's summary): incomplete
        # for good (the Verdict is final), or incomplete with no write for STALLED_AFTER seconds (a crashed
        # writer, or a file the producer will never write). Each is logged once, at warning level.
        self.stuck: dict[str, str] = {}

    def candidates(self) -> list[str] | None:
        """Checkpoint folder names present in the output dir, one level deep; None if it cannot be listed
        (a network filesystem hiccup must not look like every checkpoint being deleted)."""
        try:
            entries = list(os.scandir(self.output_dir))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.output_dir, exc)
            return None
        return sorted(e.name for e in entries if self._admits(e.name) and _is_dir(e))

    def _admits(self, name: str) -> bool:
        """Whether a listed name is a usable checkpoint name; a name the pattern admits but that cannot be one
        (an absurd step, control characters) is logged once and ignored, so it never stops the others."""
        try:
            return self._checked_step(name) is not None
        except BadCheckpointName as exc:
            if name not in self._rejected:
                self._rejected.add(name)
                log.warning("ignoring %s", exc)
            return False

    def _step_of(self, name: str) -> int | None:
        try:
            return self._checked_step(name)
        except BadCheckpointName:
            return None

    def check(self, names: set[str] | list[str], thorough: bool = True) -> list[Ready]:
        """Look at these folders now. With `thorough=False`, a folder already matching the journal is skipped
        while its own stat (inode, mtime) is unchanged: a one-level poll that does not walk every checkpoint,
        which matters on network filesystems whose metadata servers are shared with the training job."""
        ready = []
        for name in sorted(names, key=lambda n: (self._step_of(n) or 0, n)):
            try:
                found = self._check_one(name, thorough)
            except OSError as exc:  # e.g. a folder we may not read: that checkpoint only, looked at again later
                self._settling.pop(name, None)
                reason = f"cannot read it: {exc.strerror or exc}"
                if self._last_reason.get(name) != reason:  # once, not at every rescan
                    self._last_reason[name] = reason
                    log.warning("%s is skipped: %s (it is looked at again at every rescan)", name, reason)
                continue
            if found:
                ready.append(found)
        return ready

    def due(self) -> list[str]:
        """Folders whose settle window has passed and that must be looked at again."""
        now = self._clock()
        return [name for name, s in self._settling.items() if now - s.since >= self.settle]

    def next_due(self) -> float | None:
        """Seconds until the next settle window ends, or None when nothing is settling."""
        if not self._settling:
            return None
        now = self._clock()
        return max(0.0, min(s.since + self.settle - now for s in self._settling.values()))

    @property
    def settling(self) -> bool:
        return bool(self._settling)

    def settling_steps(self) -> list[int]:
        """Steps of complete checkpoints still inside their settle window (about to be admitted)."""
        return [step for step in map(self._step_of, self._settling) if step is not None]

    def _check_one(self, name: str, thorough: bool = True) -> Ready | None:
        step = self._step_of(name)
        if step is None:
            return None
        path = self.output_dir / name
        try:
            folder = os.stat(path)
            if not thorough and self._verified.get(name) == (folder.st_ino, folder.st_mtime_ns):
                return None
            state = snapshot(path)
        except FileNotFoundError:
            self._settling.pop(name, None)
            self._verified.pop(name, None)
            self.stuck.pop(name, None)
            return None
        digest = state.digest
        known = self._known(name)
        if known is not None and known in (digest, state.legacy_digest):
            self._settling.pop(name, None)
            self._verified[name] = (folder.st_ino, folder.st_mtime_ns)
            return None
        self._verified.pop(name, None)
        verdict = check_checkpoint(path, step, self.sentinel, self._base_model())
        if not verdict.complete:
            self._settling.pop(name, None)
            self._note_incomplete(name, verdict, state.newest_change)
            return None
        self._last_reason.pop(name, None)
        self.stuck.pop(name, None)
        try:
            # Again, after the verdict: a file created between the first walk and the verdict's own listing would
            # otherwise be missing from `newest_change`, and a folder quiet before it would look settled at once.
            state = snapshot(path)
        except FileNotFoundError:  # deleted meanwhile: nothing of it may stay in the settle window
            self._settling.pop(name, None)
            return None
        digest = state.digest
        now = self._clock()
        current = self._settling.get(name)
        if current is None or current.activity != state.activity:
            # First sight of this state, or any write since the last look (any file's size, mtime or ctime: a
            # copy that keeps old mtimes still changes ctimes): the window starts again. A folder untouched for
            # longer than the window has settled already.
            since = now
            if current is None and now - state.newest_change >= self.settle:
                since = now - self.settle
            current = self._settling[name] = _Settling(state.activity, since, verdict)
        if now - current.since < self.settle:
            return None
        del self._settling[name]
        return Ready(name, step, path, digest, verdict, read_progress(path))

    def _note_incomplete(self, name: str, verdict: Verdict, newest_change: float) -> None:
        quiet = self._clock() - newest_change
        if verdict.final:
            stuck = f"will not be evaluated: {verdict.reason}"
        elif quiet >= max(STALLED_AFTER, 4 * self.settle):
            stuck = f"incomplete and untouched for {quiet:.0f} s: {verdict.reason}"
        else:
            stuck = None
        if stuck is None:
            self.stuck.pop(name, None)
            if self._last_reason.get(name) != verdict.reason:
                log.debug("%s not complete yet: %s", name, verdict.reason)
        elif self._last_reason.get(name) != verdict.reason or name not in self.stuck:
            log.warning("%s %s", name, stuck)
            self.stuck[name] = stuck
        self._last_reason[name] = verdict.reason


def read_progress(folder: Path) -> dict[str, float]:
    """`train/epoch` and `train/tokens` when the checkpoint records them (our sentinel or trainer_state.json).

    Read once, when the checkpoint is admitted, and journaled with it: its results carry it (as "progress") even
    when they are delivered after the trainer rotated the checkpoint away.
    """
    found: dict[str, float] = {}
    for name in ("ckpt-watch-complete.json", "trainer_state.json"):
        try:
            state = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict):
            continue
        for key, target in (("epoch", "train/epoch"), ("num_input_tokens_seen", "train/tokens")):
            value = state.get(key)
            if target not in found and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found[target] = float(value)
    return found


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
