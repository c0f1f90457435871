"""Best-checkpoint retention (`keep_best`): which checkpoints are held and kept on disk under RESULTS_DIR/best, and
keeping that folder equal to the ranking (watcher/standings.py ranks; this module only makes the folders so).

    RESULTS_DIR/best/
        best.json                        per rule, the kept checkpoints best first (rewritten after every change)
        <metric>/checkpoint-N/           variant regular ("/" in the metric's name: subfolders)
        ema/<metric>/checkpoint-N/       variant ema
        <metric>/checkpoint-N/merged/    with keep_merged_best: the merged model it was evaluated from
        .held/checkpoint-N-gG/           every complete checkpoint (generation G) until its results decide
        .held/checkpoint-N-gG.merged-V/  its merged model for variant V (keep_merged_best), until then

Why hard links: a link costs no space while the original exists, and the trainer's rotation (`save_total_limit`
deletes the folder) leaves a linked file intact. Why a hold at detection: the rotation may delete a checkpoint
before its result exists (evaluation is slower than saving); the hold keeps its files, the job evaluates it from
there (`evaluable`), and the hold is promoted into best/ or released once its results are in. A hold of a deleted
checkpoint does cost its size until then.

Everything on disk is derived from the journal (results, checkpoints, jobs): `sync` computes the wanted state and
makes the folders so, after every result and at start. Each folder appears by a rename of a complete temporary
one, and a hold is released only after best.json names what was promoted from it, so a crash between any two steps
is mended by the next sync. A retention failure (a full disk, a permission) is one log line: the result is
already committed, and the next result (or the next look at the output dir) tries again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from watcher.atomic import write_json_atomic
from watcher.config import KeepBestRule, WatchConfig
from watcher.journal import Checkpoint, Job, Journal
from watcher.records import Outcome, Result, iso_time
from watcher.standings import Standing, better, ranked, resolve_mode

log = logging.getLogger("ckpt-watch")

BEST_DIR = "best"
HELD_DIR = ".held"
INDEX = "best.json"
TEMPORARY = ".tmp-"  # a folder being built: complete only once renamed without it
MERGED = "merged"
# A hold's folder name: the checkpoint's name and generation, and for a merged model the variant it was made of.
_HELD_NAME = re.compile(r"^(?P<name>.+)-g(?P<generation>\d+)(?:\.merged-(?P<variant>[a-z]+))?$")
# os.link's refusals that a copy gets past: another filesystem, or one without hard links (FAT, some FUSE).
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


@dataclass(frozen=True)
class KeptCheckpoint:
    """One entry of best.json: a checkpoint among a rule's best k, and where it is kept."""

    rank: int
    checkpoint: str
    step: int
    generation: int
    value: float
    stderr: float | None
    path: str | None  # its folder under best/; None when it could not be kept (`note` says why)
    original: str  # where the trainer saved it (and it was evaluated from)
    result_id: str
    merged: str | None = None  # its merged model under best/, with keep_merged_best
    note: str | None = None


def rule_folder(best_dir: Path, rule: KeepBestRule) -> Path:
    """best/<metric>/ for variant regular, best/ema/<metric>/ for ema (config.py refuses names that collide)."""
    return best_dir.joinpath(*(["ema"] if rule.variant == "ema" else []), *rule.metric.split("/"))


class Retention:
    """One watched run's best/ folder. `unfinished`: the run's jobs still to run or running (what keeps a
    checkpoint undecided); `prefix`: how this run's log lines begin."""

    def __init__(self, results_dir: Path, journal: Journal, config: WatchConfig,
                 unfinished: Callable[[], list[Job]], prefix: str = ""):  # fmt: skip
        self.best_dir = results_dir / BEST_DIR
        self.journal, self.unfinished, self.prefix = journal, unfinished, prefix
        self.configure(config)
        self._synced = False  # a sync went through since start (else the next look at the output dir tries)
        # Filesystems (st_dev) of sources that os.link refused (another filesystem than best/), and why: nothing
        # of theirs is held, and the best are copied at decision time (keep_best_copy).
        self._unlinkable: dict[int, str] = {}
        self._said: set[str] = set()  # warnings given once per run
        self._kept = self._read_index()  # (folder, checkpoint) -> generation, as best.json last said
        self._from_hold: set[int] = set()  # jobs started from a hold (`evaluable`)

    def configure(self, config: WatchConfig) -> None:
        """The rules and options (at start, and on a reload: folders of dropped rules are left as they are)."""
        self.rules: list[KeepBestRule] = list(config.keep_best)
        self.copy, self.keep_merged = config.keep_best_copy, config.keep_merged_best
        self.step_of = config.step_of
        self._synced = False

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    # --- what the daemon calls -------------------------------------------------------------------------------

    def hold(self, checkpoint: Checkpoint) -> None:
        """A checkpoint just journaled as complete: link its files under best/.held/ before the trainer's
        rotation can delete it."""
        if self.enabled:
            with self._guard(f"hold {checkpoint.name}"):
                self._hold(checkpoint)

    def holds(self, checkpoint: Checkpoint) -> bool:
        """Whether a complete hold of this checkpoint generation exists (then it is not gone for evaluation)."""
        return self.enabled and self._held_path(checkpoint.name, checkpoint.generation).is_dir()

    def evaluable(self, job: Job) -> Job:
        """The job as the worker is to see it: evaluated from its hold when the trainer deleted the original."""
        held = self._held_path(job.checkpoint.name, job.checkpoint.generation)
        if not self.enabled or job.checkpoint.path.is_dir() or not held.is_dir():
            return job
        log.info("%s%s: the trainer deleted it; evaluating the copy held in %s", self.prefix, job.label, held)
        self._from_hold.add(job.id)
        return replace(job, checkpoint=replace(job.checkpoint, path=held))

    def lost_original(self, job: Job) -> bool:
        """Whether the trainer deleted a running job's checkpoint under it while a hold has its files: the job
        need not fail, it can start again from the hold (one started from the hold never loses it)."""
        return job.id not in self._from_hold and self.holds(job.checkpoint) and not job.checkpoint.path.is_dir()

    def take_merged(self, job: Job, outcome: Outcome) -> None:
        """keep_merged_best: hold the merged model a job made (in its scratch folder, deleted next)."""
        merged = outcome.merged_model
        if not (self.enabled and self.keep_merged and outcome.ok and merged and Path(merged).is_dir()):
            return
        with self._guard(f"hold the merged model of {job.label}"):
            if not self._might_rank(job, outcome):
                return
            name = f"{job.checkpoint.name}-g{job.checkpoint.generation}.{MERGED}-{job.variant}"
            self._clone_into(Path(merged), self.best_dir / HELD_DIR / name, copy=self.copy)

    def result_recorded(self, result: Result) -> None:
        """A result was committed: the best folders follow the new ranking, and holds that are decided go."""
        if self.enabled:
            self.sync()

    def reconcile(self) -> None:
        """At each look at the output dir: a sync if none went through since start (or since a failure)."""
        if self.enabled and not self._synced:
            self.sync()

    def sync(self) -> None:
        with self._guard("update the best checkpoints"):
            self._sync()
            self._synced = True
            if any(key.startswith("failed ") for key in self._said):
                log.info("%skeep_best: the best checkpoints are up to date again", self.prefix)
                self._said = {key for key in self._said if not key.startswith("failed ")}  # said again if it recurs

    def _might_rank(self, job: Job, outcome: Outcome) -> bool:
        """Whether the job's own values would put its checkpoint among some rule's best k now: only then is its
        merged model worth holding (a copy of a whole model, where scratch is on another filesystem)."""
        results = self.journal.results()
        for rule in self.rules:
            value = outcome.metrics.get(rule.metric)
            if rule.variant != job.variant or not isinstance(value, (int, float)):
                continue
            try:
                mode = resolve_mode(rule.mode, rule.metric, results)
            except ValueError:  # nothing says yet which way is better: keep it, to be sure
                return True
            others = [s for s in ranked(results, rule.metric, mode, rule.variant) if s.checkpoint != job.checkpoint.name]
            if len(others) < rule.k or better(value, others[rule.k - 1].value, mode):
                return True
        return False

    # --- the sync ------------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        results = self.journal.results()
        checkpoints = self.journal.all_checkpoints()
        variants = {rule.variant for rule in self.rules}
        undecided = {job.checkpoint.id for job in self.unfinished() if job.variant in variants}
        held = self.best_dir / HELD_DIR
        _remove_temporary(held)
        for checkpoint in checkpoints:  # e.g. a crash between journaling a checkpoint and holding it
            if checkpoint.id in undecided and not self.holds(checkpoint) and checkpoint.path.is_dir():
                self._hold(checkpoint)
        index = [self._sync_rule(rule, results, checkpoints) for rule in self.rules]
        write_json_atomic(self.best_dir / INDEX, {"updated_at": iso_time(time.time()), "rules": index})
        self._kept = {(entry["folder"], kept["checkpoint"]): kept["generation"]
                      for entry in index for kept in entry["kept"] if kept["path"]}  # fmt: skip
        # Only now, with best.json naming what was promoted: holds whose results are all in go.
        by_key = {(c.name, c.generation): c for c in checkpoints}
        for folder in held.iterdir() if held.is_dir() else []:
            match = _HELD_NAME.match(folder.name)
            checkpoint = by_key.get((match["name"], int(match["generation"]))) if match else None
            if checkpoint is None or checkpoint.id not in undecided:
                shutil.rmtree(folder)

    def _sync_rule(self, rule: KeepBestRule, results: list[Result], checkpoints: list[Checkpoint]) -> dict:
        """Make one rule's folder hold exactly its best k; its best.json entry."""
        folder = rule_folder(self.best_dir, rule)
        try:
            mode = resolve_mode(rule.mode, rule.metric, results)
            top = ranked(results, rule.metric, mode, rule.variant)[: rule.k]
        except ValueError as exc:  # auto, and no result says yet which way is better
            mode, top = rule.mode, []
            if results and any(rule.metric in r.metrics for r in results):
                self._warn_once(f"mode {rule.metric}", f"keep_best {rule.metric}: {exc}")
        wanted = {standing.checkpoint for standing in top}
        _remove_temporary(folder)
        for present in folder.iterdir() if folder.is_dir() else []:
            if present.is_dir() and self.step_of(present.name) is not None and present.name not in wanted:
                shutil.rmtree(present)
                log.info("%skeep_best %s: %s left the best %d; removed from %s", self.prefix, rule.metric,
                         present.name, rule.k, folder)  # fmt: skip
        kept = [self._keep(rule, folder, rank, standing, checkpoints) for rank, standing in enumerate(top, 1)]
        return {"metric": rule.metric, "variant": rule.variant, "mode": mode, "k": rule.k, "folder": str(folder),
                "kept": [asdict(entry) for entry in kept]}  # fmt: skip

    def _keep(self, rule: KeepBestRule, folder: Path, rank: int, standing: Standing,
              checkpoints: list[Checkpoint]) -> KeptCheckpoint:  # fmt: skip
        """One of the best k in place under `folder` (made from its hold, another rule's copy or the original)."""
        destination = folder / standing.checkpoint
        entry = KeptCheckpoint(rank=rank, checkpoint=standing.checkpoint, step=standing.step,
                               generation=standing.generation, value=standing.value, stderr=standing.stderr,
                               path=str(destination), original=standing.checkpoint_path,
                               result_id=standing.result.result_id)  # fmt: skip
        known = self._kept.get((str(folder), standing.checkpoint))
        sources = self._sources(standing, checkpoints, folder)
        if not destination.is_dir() or (known != standing.generation and sources):
            if not sources:
                return replace(entry, path=None, note="deleted before it could be kept (no hold, no original)")
            building = folder / f"{TEMPORARY}{standing.checkpoint}"
            if not self._clone_into(sources[0], building, copy=self.copy, publish=False):
                self._warn_once("no copy", f"{self.prefix}keep_best: {self.best_dir} is on another filesystem "
                                "than the checkpoints and keep_best_copy = false: nothing is kept")  # fmt: skip
                return replace(entry, path=None, note="another filesystem and keep_best_copy = false")
            shutil.rmtree(destination, ignore_errors=True)
            os.rename(building, destination)
            log.info("%skeep_best %s: %s is number %d (%s = %.4g); kept in %s", self.prefix, rule.metric,
                     standing.checkpoint, rank, rule.metric, standing.value, destination)  # fmt: skip
        merged = self._held_path(standing.checkpoint, standing.generation, rule.variant)
        if self.keep_merged and merged.is_dir() and not (destination / MERGED).is_dir():
            self._clone_into(merged, destination / MERGED, copy=self.copy)
        return replace(entry, merged=str(destination / MERGED) if (destination / MERGED).is_dir() else None)

    def _sources(self, standing: Standing, checkpoints: list[Checkpoint], folder: Path) -> list[Path]:
        """Where the checkpoint's files can be had, best first: its hold, another rule's kept copy (best/'s own
        filesystem), the original (while the journal has it as present: a re-saved folder is another generation)."""
        found = [self._held_path(standing.checkpoint, standing.generation)]
        key = (standing.checkpoint, standing.generation)
        found += [Path(other) / name for (other, name), generation in self._kept.items()
                  if (name, generation) == key and other != str(folder)]  # fmt: skip
        found += [c.path for c in checkpoints
                  if (c.name, c.generation) == key and not c.gone]  # fmt: skip
        return [path for path in found if path.is_dir()]

    # --- holds and folders ---------------------------------------------------------------------------------------

    def _held_path(self, name: str, generation: int, variant: str | None = None) -> Path:
        suffix = f".{MERGED}-{variant}" if variant else ""
        return self.best_dir / HELD_DIR / f"{name}-g{generation}{suffix}"

    def _hold(self, checkpoint: Checkpoint) -> None:
        try:
            self._clone_into(checkpoint.path, self._held_path(checkpoint.name, checkpoint.generation), copy=False)
        except FileNotFoundError:  # the trainer deleted it while we linked: keep nothing half
            self._warn_once(f"hold {checkpoint.name}-{checkpoint.generation}",
                            f"{self.prefix}keep_best: {checkpoint.name} was deleted while it was being held; it "
                            "is kept only if its folder is back by the time its results are in")  # fmt: skip

    def _clone_into(self, source: Path, destination: Path, copy: bool, publish: bool = True) -> bool:
        """`source`'s files at `destination`: hard links, or copies where links cannot go (another filesystem)
        and `copy` allows. Built in a temporary folder renamed into place (`publish`; else built at `destination`
        itself, which the caller renames). False, leaving nothing behind, when links cannot go there and `copy`
        does not allow a copy."""
        building = destination.with_name(f"{TEMPORARY}{destination.name}") if publish else destination
        shutil.rmtree(building, ignore_errors=True)
        device = os.stat(source).st_dev
        if device not in self._unlinkable:
            try:
                _link_tree(source, building, copy_instead=False)
            except OSError as exc:
                shutil.rmtree(building, ignore_errors=True)
                if exc.errno not in _NO_LINKS:
                    raise
                self._unlinkable[device] = exc.strerror or str(exc)
        if device in self._unlinkable:
            if not copy:
                return False
            self._warn_once("copy", f"{self.prefix}keep_best: cannot hard-link {source} into {self.best_dir} "
                            f"({self._unlinkable[device]}): the best checkpoints are copied there instead, and "
                            "nothing is held before its results are in (keep_best_copy = false: nothing is "
                            "kept)")  # fmt: skip
            _link_tree(source, building, copy_instead=True)
        if publish:
            shutil.rmtree(destination, ignore_errors=True)
            os.rename(building, destination)
        return True

    # --- small things ----------------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """A retention failure is one log line, never a lost result or a stopped daemon: tried again later."""
        try:
            yield
        except OSError as exc:
            self._synced = False
            self._warn_once(f"failed {exc.errno}", f"{self.prefix}keep_best: cannot {what}: {exc}; results are safe in "
                            "the journal, tried again at the next result", error=True)  # fmt: skip

    def _warn_once(self, key: str, message: str, error: bool = False) -> None:
        if key not in self._said:
            self._said.add(key)
            (log.error if error else log.warning)("%s", message)

    def _read_index(self) -> dict[tuple[str, str], int]:
        """(folder, checkpoint) -> generation as best.json says (unknown folders are rebuilt from a source)."""
        kept = read_index(self.best_dir)
        return {(rule["folder"], entry["checkpoint"]): entry["generation"]
                for rule in kept.get("rules", []) for entry in rule.get("kept", []) if entry.get("path")}  # fmt: skip


def read_index(best_dir: Path) -> dict:
    """best.json as written by the last sync; {} when there is none (or it cannot be read)."""
    try:
        data = json.loads((best_dir / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


MAX_PASSES = 5  # walks of a folder whose files keep coming and going before it counts as being deleted


def _link_tree(source: Path, destination: Path, copy_instead: bool) -> None:
    """Recreate `source`'s folders at `destination` and hard-link (or stream-copy: shutil.copy2 copies in bounded
    memory) its files one by one. A file that comes or goes meanwhile (a marker written as a temporary file renamed
    into place, like the Trainer callback's sentinel) is followed by walking again until a walk finds the folder as
    the last one left it. FileNotFoundError when the folder went away (the trainer deleting it), or never held still
    (files vanishing walk after walk: the trainer's rmtree under way)."""
    for _ in range(MAX_PASSES):
        if not _link_pass(source, destination, copy_instead):
            return
    raise FileNotFoundError(errno.ENOENT, "checkpoint folder kept changing while it was linked", str(source))


def _link_pass(source: Path, destination: Path, copy_instead: bool) -> bool:
    """One walk: link what `destination` lacks, drop what `source` no longer has. Whether anything changed."""

    def fail(exc: OSError) -> None:
        if not source.is_dir():
            raise exc
        # A subfolder that went away while the folder stays: its files are missing from this walk, which the
        # next one sees.

    seen: set[Path] = set()
    changed = False
    for root, _folders, files in os.walk(source, onerror=fail):
        relative = Path(root).relative_to(source)
        (destination / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            seen.add(relative / name)
            if os.path.lexists(destination / relative / name):
                continue
            changed = True
            try:
                if copy_instead:
                    shutil.copy2(Path(root) / name, destination / relative / name)
                else:
                    os.link(Path(root) / name, destination / relative / name)
            except FileNotFoundError:
                if not source.is_dir():
                    raise
    if not destination.is_dir():  # the source was gone before the walk began (os.walk raised nothing)
        raise FileNotFoundError(errno.ENOENT, "checkpoint folder vanished", str(source))
    for root, _folders, files in os.walk(destination):
        for name in files:
            if (Path(root) / name).relative_to(destination) not in seen:
                (Path(root) / name).unlink()
                changed = True
    return changed


def _remove_temporary(folder: Path) -> None:
    """Half-built folders a crash left (they never count)."""
    for path in folder.glob(f"{TEMPORARY}*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
