"""Decide whether a `checkpoint-N` / `step-N` folder is COMPLETELY written.

Trainers write checkpoints file by file, over seconds to minutes, with no lock and usually no marker,
so the watcher must judge a folder by what is on disk. The rules, in order:

1. Sentinel. If the folder holds `DEFAULT_SENTINEL` (`ckpt-watch-complete.json`, written last by
   ckpt-watch's trainer callback, see watcher.integrations.sentinel) with a manifest (a "files" object of
   relative path -> size in bytes), the folder is complete exactly when every listed file exists with
   exactly the listed size (and the sentinel's "step", when given, is the N in the folder name); no layout
   rule is applied, and the Verdict still names the layout detected from the file names ("sentinel" only
   when none is recognised). A malformed manifest (listed paths leaving the folder, sizes that are not
   integers) is never complete. A `DEFAULT_SENTINEL` that is not JSON, or JSON without "files" (an older
   ckpt-watch's sentinel, or a user's `touch`), counts by its presence alone, as does a sentinel named in
   the config (`sentinel = "NAME"`, unless NAME is `DEFAULT_SENTINEL`), which is then the only rule even
   when `DEFAULT_SENTINEL` is present too; those Verdicts have the layout "sentinel".
2. Otherwise the layout decides:

   * "hf": a Hugging Face Trainer folder (`trainer_state.json` or HF weight files). Every weight file
     must be whole: a safetensors file must be exactly 8 + header length + the largest data offset in
     its header; a `.bin` (torch.save) must be a zip whose central directory is readable (it sits at
     the very end, so a truncated file has none); an index (`*.index.json`) must parse and every shard
     in its `weight_map` must be whole. No recognised weights at all is incomplete.
   * "hf-fsdp-dcp": accelerate / HF Trainer FSDP SHARDED_STATE_DICT: the weights are a DCP directory
     `pytorch_model_fsdp_0/` (and the EMA twin `pytorch_ema_model_fsdp_0/`, when present).
   * "dcp": the folder itself is a DCP checkpoint (torchtitan `step-N/`). `.metadata` is written
     last, by atomic rename, after every rank's data; it must parse (safely, see merge.dcp_metadata)
     and each file it references must hold at least max(offset + length) bytes.
   * "hf-export": torchtitan's Hugging Face export (`last_save_in_hf`): torch's HuggingFaceStorageWriter puts
     each rank's safetensors into `sharded/`, consolidates them next to it and writes the index last; the
     index must parse and every file it lists must be whole.
   * "rank-shards": `model_world_size_W_rank_R.pt` per rank, in the folder or in `pytorch_model_fsdp_0/`
     (+ the EMA twin): ranks 0..W-1 all present, all agreeing on W, each a whole zip.
   * "lmms-engine": rank shards in `pytorch_model_fsdp_0/` next to LMMs-Engine's `optimizer/`, `extra_state/`
     and `dataloader_state/` folders: every rank's file in each of them whole (and the EMA twin's, when it
     has any), and `config.json`, LMMs-Engine's last write, present and parsable.
   * "verl": veRL's `global_step_N/` with `actor/` (and `critic/`) rank shards, each role's ranks all whole,
     and `data.pt`, veRL's last write, whole. The actor is the model evaluated.

   `trainer_state.json` is the HF Trainer's last write, so "hf" and "hf-fsdp-dcp" require it; in every
   layout, if present it must parse and its `global_step` must equal the N in the folder name.

3. Model files. A model needs `config.json` (from the folder, veRL's `actor/huggingface/`, or `base_model`)
   and, for "hf" folders evaluated in place, a tokenizer (the folder's or `base_model`'s). One the producer
   writes itself but has not written yet is a wait, never a failure (a slow writer may write config.json or
   the tokenizer seconds after the weights, even after trainer_state.json; a partly written tokenizer is a
   wait too). One the producer never writes (torchtitan writes no config.json) must come from `base_model`;
   without it the Verdict is `final`: incomplete for good, said once in the log and listed for --scan.

The check only stats and reads (headers, JSON, zip directories), never writes, never imports torch,
and never raises for a folder that is half-written or vanishing underneath it: any such surprise is
an incomplete Verdict whose reason names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from merge.dcp_metadata import (
    METADATA_FILE,
    DcpMetadataError,
    UnsafeCheckpointError,
    read_dcp_metadata,
    required_file_sizes,
)

DEFAULT_SENTINEL = "ckpt-watch-complete.json"
TRAINER_STATE = "trainer_state.json"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
FSDP_EMA_DIR = "pytorch_ema_model_fsdp_0"
FOLDER_GONE = "folder is gone"
CONFIG = "config.json"
# torch.distributed.checkpoint's HuggingFaceStorageWriter (torchtitan's `last_save_in_hf` export) saves each rank's
# safetensors into sharded/, then consolidates them next to it and writes model.safetensors.index.json last.
HF_EXPORT_SHARDS_DIR = "sharded"
# LMMs-Engine 0.1.4 (lmms_engine/train/fsdp2/fsdp2_trainer.py, save_checkpoints): after a barrier every rank
# torch.saves, in this order, pytorch_model_fsdp_0/model_world_size_W_rank_R.pt, the EMA twin (when the EMA is
# initialised), optimizer/optimizer_*, extra_state/extra_state_*, dataloader_state/dataloader_state_*; then rank 0
# saves the processor/tokenizer and, last, config.json. All these folders are created before the first write.
LMMS_STATE_DIRS = {"optimizer": "optimizer", "extra_state": "extra_state", "dataloader_state": "dataloader_state"}
# veRL (verl/trainer/ppo/ray_trainer.py _save_checkpoint, verl/utils/checkpoint/fsdp_checkpoint_manager.py):
# global_step_N/actor/ gets every rank's model_/optim_/extra_state_world_size_W_rank_R.pt, then rank 0 writes
# actor/huggingface/ (config, tokenizer) and actor/fsdp_config.json; the same for critic/; data.pt comes last.
VERL_ROLES = ("actor", "critic")
VERL_LAST = "data.pt"
VERL_HF_DIR = "huggingface"

LAYOUTS = ("sentinel", "hf", "hf-fsdp-dcp", "dcp", "hf-export", "rank-shards", "lmms-engine", "verl", "unknown")

_RANK_SHARD = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")
# A tokenizer needs one of these; the other tokenizer files (tokenizer_config.json, ...) come with it.
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt")
_HF_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format refuses larger headers too


@dataclass(frozen=True)
class Verdict:
    complete: bool
    layout: str  # one of LAYOUTS
    reason: str  # one human-readable line saying why it is incomplete; "" when complete
    variants: tuple[str, ...]  # ("regular",) or ("regular", "ema"); () if unknown
    # Incomplete for a reason that waiting will not change (the producer is done, a setting is missing): said once
    # in the log and listed by --scan, instead of waited for in silence.
    final: bool = False


class _Incomplete(Exception):
    """Raised by the rule helpers with the reason; caught in check_checkpoint."""


class _Unusable(_Incomplete):
    """Incomplete for good: the producer has finished this folder, but something it never writes is missing."""


def check_checkpoint(folder: Path, step: int, sentinel: str | None = None, base_model: Path | None = None) -> Verdict:
    """Judge whether `folder` (a checkpoint for step `step`) is completely written. Never raises.

    `base_model`: a Hugging Face folder that supplies `config.json` and tokenizer files the checkpoint lacks.
    """
    folder = Path(folder)
    layout, variants, final = "unknown", (), False
    try:
        if not folder.is_dir():
            return Verdict(False, "unknown", FOLDER_GONE, ())
        names = _listdir(folder)
        detected = _detect_layout(folder, names)
        variants = _variants(folder, names, detected)
        if sentinel == DEFAULT_SENTINEL or (sentinel is None and DEFAULT_SENTINEL in names):
            # Our own sentinel: verified against its manifest when it has one, else presence-only.
            layout = detected if detected != "unknown" else "sentinel"
            if not _check_manifest(folder, step):
                layout = "sentinel"
        elif sentinel is not None:
            layout = "sentinel"
            if not (folder / sentinel).exists():
                raise _Incomplete(f"{sentinel} missing")
        else:
            layout = detected
            _RULES[layout](folder, names, step)
            _check_model_files(folder, names, layout, base_model)
        return Verdict(True, layout, "", variants)
    except _Incomplete as err:
        reason, final = str(err), isinstance(err, _Unusable)
    except (OSError, ValueError) as err:  # something changed under our feet between two reads
        reason = _describe(err, folder)
    if not _is_dir(folder):
        reason, final = FOLDER_GONE, False
    return Verdict(False, layout, reason, variants, final)


@dataclass(frozen=True)
class Snapshot:
    digest: str  # fingerprint(): changes when the checkpoint's model may have changed (a re-save)
    activity: str  # changes on any write inside the folder at all: what the settle window waits out
    legacy_digest: str  # the fingerprint of ckpt-watch 0.1 (every file's mtime), to recognise what it journaled
    newest_change: float  # the newest mtime or ctime of the folder and its files: how long it has been quiet


# Training state a checkpoint carries beside the model (HF Trainer, accelerate FSDP, veRL): deleting it to save
# space, or rewriting it, leaves the model as it was (so does the Trainer's training_args.bin). Matched against the
# path's first component.
_TRAINING_STATE = re.compile(r"(optimizer|optim_|scheduler|lr_scheduler|scaler|rng_state|extra_state_|training_args)")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack")
_SMALL_FILE = 1 << 20  # bytes; below it, a file without a weight suffix is metadata (config, tokenizer, state)


def fingerprint(folder: Path) -> str:
    """A hex digest of the checkpoint's model files below `folder`, from stat alone: a new one means a re-save.

    Every file counts by its relative path and size; a weight file (by suffix, or any file of 1 MiB or more) also
    by its mtime, so rewriting the weights under the same names is a re-save. The mtime of a small non-weight file
    is left out (`touch config.json` is not a re-save), as is the training state next to the model (optimizer,
    scheduler, RNG and scaler state: deleting `optimizer.pt` to save space is not a re-save either), and
    `DEFAULT_SENTINEL` with its temporary file: the trainer callback writes it a moment after the checkpoint
    itself (possibly after the daemon has journaled the folder by its layout rule).

    Raises FileNotFoundError if `folder` itself is missing; files or subfolders vanishing during the
    walk are simply left out.
    """
    return snapshot(folder).digest


def snapshot(folder: Path) -> Snapshot:
    """The fingerprint, the activity digest and the newest change of a folder, in one stat-only walk."""
    folder = Path(folder)
    model: list[str] = []  # for the fingerprint
    legacy: list[str] = []
    everything: list[str] = []  # every file and folder with its mtime and ctime: any write shows
    newest = 0

    def walk(directory: Path, prefix: str) -> None:
        nonlocal newest
        try:
            scan = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            if not prefix:
                raise
            return  # a subfolder vanished mid-walk
        with scan:
            for entry in scan:
                rel = prefix + entry.name
                if not prefix and is_default_sentinel_name(entry.name):
                    continue
                try:
                    # Never follow symlinked folders (cycles); symlinked files count by their target.
                    if entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        everything.append(f"{rel}/\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
                        walk(Path(entry.path), rel + "/")
                        continue
                    st = entry.stat()
                except OSError:
                    continue  # vanished (or a dangling link): not part of the checkpoint any more
                legacy.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
                everything.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
                newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
                if _TRAINING_STATE.match(rel):
                    continue
                weights = entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name == METADATA_FILE
                if weights or st.st_size >= _SMALL_FILE:
                    model.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
                else:
                    model.append(f"{rel}\0{st.st_size}\n")

    walk(folder, "")
    if not newest:  # no file yet: the folder's own age, not 1970's (our sentinel's arrival must not count)
        own = folder.stat()
        newest = max(own.st_mtime_ns, own.st_ctime_ns)
    return Snapshot(_digest(model), _digest(everything), _digest(legacy), newest / 1e9)


def _digest(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Layout detection (names only, no reads) and the per-layout rules.


def checkpoint_files_in(folder: Path) -> list[str]:
    """The names in `folder` that only a checkpoint holds (weights, DCP metadata, the Trainer's state, our
    sentinel), by name alone; [] for an ordinary folder or one that cannot be listed."""
    try:
        names = _listdir(folder)
    except OSError:
        return []
    if DEFAULT_SENTINEL in names or _detect_layout(folder, names) != "unknown":
        found = [n for n in names if n in (DEFAULT_SENTINEL, TRAINER_STATE, METADATA_FILE, FSDP_MODEL_DIR, FSDP_EMA_DIR)
                 or n.endswith(".distcp") or _RANK_SHARD.fullmatch(n)]  # fmt: skip
        return sorted(found + _hf_weight_names(names))
    return []


def _detect_layout(folder: Path, names: set[str]) -> str:
    if METADATA_FILE in names or any(n.endswith(".distcp") for n in names):
        return "dcp"
    if any(_RANK_SHARD.fullmatch(n) for n in names):
        return "rank-shards"
    if "actor" in names and _is_dir(folder / "actor"):
        return "verl"
    for sub in (FSDP_MODEL_DIR, FSDP_EMA_DIR):
        if sub in names:
            if any(d in names for d in LMMS_STATE_DIRS):
                return "lmms-engine"
            # An empty subfolder (just created) is taken for DCP, accelerate's default.
            return "rank-shards" if _rank_shard_names(_listdir(folder / sub)) else "hf-fsdp-dcp"
    if HF_EXPORT_SHARDS_DIR in names and TRAINER_STATE not in names and _is_dir(folder / HF_EXPORT_SHARDS_DIR):
        return "hf-export"
    if TRAINER_STATE in names or _hf_weight_names(names):
        return "hf"
    return "unknown"


def _variants(folder: Path, names: set[str], layout: str) -> tuple[str, ...]:
    if FSDP_EMA_DIR in names and (folder / FSDP_EMA_DIR).is_dir():
        # LMMs-Engine creates the EMA folder even when its EMA is not initialised yet, and then writes nothing.
        if not (layout == "lmms-engine" and CONFIG in names and not _rank_shard_names(_listdir(folder / FSDP_EMA_DIR))):
            return ("regular", "ema")
    return () if layout == "unknown" else ("regular",)


def _rule_hf(folder: Path, names: set[str], step: int) -> None:
    _check_hf_weights(folder, names)
    _check_trainer_state(folder, step, required=True)


def _rule_hf_fsdp(folder: Path, names: set[str], step: int) -> None:
    _check_fsdp_dirs(folder, names)
    _check_trainer_state(folder, step, required=True)


def _rule_dcp(folder: Path, names: set[str], step: int) -> None:
    _check_dcp(folder, "")
    _check_trainer_state(folder, step, required=False)


def _rule_rank_shards(folder: Path, names: set[str], step: int) -> None:
    if _rank_shard_names(names):
        _check_rank_shards(folder, names, "")
    else:
        _check_fsdp_dirs(folder, names)
    # veRL and LMMs-Engine write no trainer_state.json, so it cannot be required here.
    _check_trainer_state(folder, step, required=False)


def _rule_hf_export(folder: Path, names: set[str], step: int) -> None:
    if _HF_INDEX_FILES[0] not in names:
        raise _Incomplete(f"{_HF_INDEX_FILES[0]} missing (torch's Hugging Face writer writes it last)")
    _check_hf_weights(folder, names)


def _rule_lmms_engine(folder: Path, names: set[str], step: int) -> None:
    model_shards = _rank_shard_names(_listdir(folder / FSDP_MODEL_DIR)) if FSDP_MODEL_DIR in names else {}
    if not model_shards:
        raise _Incomplete(f"{FSDP_MODEL_DIR}/model_world_size_*_rank_*.pt not written yet")
    world = _check_rank_shards(folder / FSDP_MODEL_DIR, set(model_shards), f"{FSDP_MODEL_DIR}/")
    if FSDP_EMA_DIR in names:
        ema_names = _listdir(folder / FSDP_EMA_DIR)
        if _rank_shard_names(ema_names):
            _check_rank_shards(folder / FSDP_EMA_DIR, ema_names, f"{FSDP_EMA_DIR}/", world)
    for sub, stem in LMMS_STATE_DIRS.items():
        if sub in names:
            _check_rank_files(folder / sub, stem, world, f"{sub}/")
    _check_config_written(folder, "LMMs-Engine writes it last")
    _check_trainer_state(folder, step, required=False)


def _rule_verl(folder: Path, names: set[str], step: int) -> None:
    for role in VERL_ROLES:
        if role in names:
            role_names = _listdir(folder / role)
            if not _rank_shard_names(role_names):
                raise _Incomplete(f"{role}/model_world_size_*_rank_*.pt not written yet")
            _check_rank_shards(folder / role, role_names, f"{role}/")
    if VERL_LAST not in names:
        raise _Incomplete(f"{VERL_LAST} missing (veRL writes it last)")
    _check_zip(folder / VERL_LAST, VERL_LAST)


def _rule_unknown(folder: Path, names: set[str], step: int) -> None:
    raise _Incomplete(
        "no recognised weights yet (model.safetensors, pytorch_model.bin, an index, adapter_model.*, "
        f"{FSDP_MODEL_DIR}/, .metadata or model_world_size_*_rank_*.pt) and no {TRAINER_STATE}"
    )


_RULES = {
    "hf": _rule_hf,
    "hf-fsdp-dcp": _rule_hf_fsdp,
    "dcp": _rule_dcp,
    "hf-export": _rule_hf_export,
    "rank-shards": _rule_rank_shards,
    "lmms-engine": _rule_lmms_engine,
    "verl": _rule_verl,
    "unknown": _rule_unknown,
}


# ---------------------------------------------------------------------------------------------------
# config.json and tokenizer: what a model folder needs besides weights.
#
# A file the producer writes itself but has not written yet is a wait, never a failure: a slow writer may put
# config.json or the tokenizer down seconds after the weights (and even after trainer_state.json). A file the
# producer never writes (torchtitan writes no config.json) must come from `base_model`; without it the folder is
# unusable for good, which is said once instead of waited for.

# Whether config.json can still arrive once the layout rule holds. veRL writes actor/huggingface/ before data.pt,
# its last write, so by then it is too late; torchtitan never writes one.
_CONFIG_MAY_ARRIVE = {"hf": True, "hf-fsdp-dcp": True, "rank-shards": True, "lmms-engine": True, "verl": False,
                      "dcp": False, "hf-export": False}  # fmt: skip


def _check_model_files(folder: Path, names: set[str], layout: str, base_model: Path | None) -> None:
    homes = [folder]
    if layout == "verl":
        homes.append(folder / "actor" / VERL_HF_DIR)
    if not any(_is_file(home / CONFIG) for home in homes) and not (base_model and _is_file(Path(base_model) / CONFIG)):
        if _CONFIG_MAY_ARRIVE.get(layout, True):
            raise _Incomplete(f"{CONFIG} not written yet (or set base_model to a folder that has one)")
        raise _Unusable(f"no {CONFIG} ({_producer(layout)} does not write one here): set base_model to a Hugging "
                        "Face folder of the same model")  # fmt: skip
    if layout != "hf":
        return  # merged layouts take the tokenizer from base_model at merge time (a warning if there is none)
    has_side = any(n in names for n in TOKENIZER_SIDE_FILES)
    has_main = any(n in names for n in TOKENIZER_MAIN_FILES)
    if has_side and not has_main:
        raise _Incomplete(f"tokenizer files partly written ({', '.join(sorted(n for n in TOKENIZER_SIDE_FILES if n in names))}"
                          " but no tokenizer.json / tokenizer.model / vocab file yet)")  # fmt: skip
    if not has_main and not (base_model and any(_is_file(Path(base_model) / n) for n in TOKENIZER_MAIN_FILES)):
        raise _Incomplete("no tokenizer files yet (tokenizer.json, tokenizer.model, ...; set base_model if the trainer "
                          "saves none)")  # fmt: skip


def _check_config_written(folder: Path, why: str) -> None:
    try:
        raw = (folder / CONFIG).read_bytes()
    except FileNotFoundError:
        raise _Incomplete(f"{CONFIG} missing ({why})") from None
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        raise _Incomplete(f"{CONFIG}: not valid JSON ({len(raw)} bytes; half-written?)") from None


def _producer(layout: str) -> str:
    return {"dcp": "torchtitan", "hf-export": "torchtitan's Hugging Face export", "verl": "veRL"}.get(layout, layout)


# ---------------------------------------------------------------------------------------------------
# The default sentinel's manifest


def _check_manifest(folder: Path, step: int) -> bool:
    """True when DEFAULT_SENTINEL holds a manifest that matches the folder; False when it holds none (the
    presence rule applies); raises _Incomplete when it is missing, malformed or does not match."""
    label = DEFAULT_SENTINEL
    try:
        raw = (folder / label).read_bytes()
    except FileNotFoundError:
        raise _Incomplete(f"{label} missing") from None
    try:
        sentinel = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (a `touch`): presence-only
        return False
    if not isinstance(sentinel, dict) or "files" not in sentinel:
        return False
    files = sentinel["files"]
    if not isinstance(files, dict):
        raise _Incomplete(f"{label}: \"files\" is not an object")
    listed_step = sentinel.get("step")
    if listed_step is not None and (type(listed_step) is not int or listed_step != step):
        raise _Incomplete(f"{label}: step {listed_step!r}, folder says {step}")
    for rel, size in sorted(files.items()):
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
            raise _Incomplete(f"{label}: listed path {rel!r} is not inside the folder")
        if type(size) is not int or size < 0:
            raise _Incomplete(f"{label}: size of {rel} is not a byte count: {size!r}")
        try:
            st = os.stat(folder / rel)
        except (FileNotFoundError, NotADirectoryError):
            raise _Incomplete(f"{label} lists {rel} ({size} bytes) but it is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise _Incomplete(f"{label} lists {rel} ({size} bytes) but it is not a regular file")
        if st.st_size != size:
            raise _Incomplete(f"{label} lists {rel} ({size} bytes) but it has {st.st_size}")
    return True


# ---------------------------------------------------------------------------------------------------
# trainer_state.json


def _check_trainer_state(folder: Path, step: int, required: bool) -> None:
    try:
        raw = (folder / TRAINER_STATE).read_bytes()
    except FileNotFoundError:
        if required:
            raise _Incomplete(f"{TRAINER_STATE} missing (the Trainer writes it last)") from None
        return
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Incomplete(f"{TRAINER_STATE}: not valid JSON ({len(raw)} bytes; half-written?)") from None
    global_step = state.get("global_step") if isinstance(state, dict) else None
    if type(global_step) is not int:
        raise _Incomplete(f"{TRAINER_STATE}: no integer global_step")
    if global_step != step:
        raise _Incomplete(f"{TRAINER_STATE}: global_step {global_step}, folder says {step}")


# ---------------------------------------------------------------------------------------------------
# Hugging Face weight files


def _hf_weight_names(names: set[str]) -> list[str]:
    return [n for n in names if n in _HF_SINGLE_FILES or n in _HF_INDEX_FILES or _HF_SHARD.fullmatch(n)]


def _check_hf_weights(folder: Path, names: set[str]) -> None:
    if not _hf_weight_names(names):
        raise _Incomplete(
            f"no model weights (model.safetensors, pytorch_model.bin, an index, adapter_model.* or {FSDP_MODEL_DIR}/)"
        )
    indexed: set[str] = set()
    for index_name in _HF_INDEX_FILES:
        if index_name in names:
            shards = _read_index(folder / index_name, index_name)
            for shard in shards:
                _check_weight_file(folder / shard, shard)
            indexed.update(shards)
    # save_pretrained writes the shards first and the index after them.
    for name in sorted(names):
        if _HF_SHARD.fullmatch(name) and name not in indexed:
            index_name = _HF_INDEX_FILES[0] if name.endswith(".safetensors") else _HF_INDEX_FILES[1]
            if index_name not in names:
                raise _Incomplete(f"{name}: shard present but {index_name} missing")
    for name in _HF_SINGLE_FILES:
        if name in names:
            _check_weight_file(folder / name, name)


def _read_index(path: Path, label: str) -> list[str]:
    raw = path.read_bytes()
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise _Incomplete(f"{label}: not a valid index yet ({len(raw)} bytes; half-written?)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _Incomplete(f"{label}: weight_map is malformed")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in (".", ".."):
            raise _Incomplete(f"{label}: shard name {shard!r} points outside the folder")
    return shards


def _check_weight_file(path: Path, label: str) -> None:
    if label.endswith(".safetensors"):
        _check_safetensors(path, label)
    else:
        _check_zip(path, label)


def _check_safetensors(path: Path, label: str) -> None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size  # of the very file we read, not of a later replacement
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _Incomplete(f"{label}: {size} bytes on disk, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _SAFETENSORS_MAX_HEADER or 8 + header_len > size:
                raise _Incomplete(f"{label}: {size} bytes on disk, header alone says {8 + header_len}")
            header_bytes = f.read(header_len)
    except FileNotFoundError:
        raise _Incomplete(f"{label} missing") from None
    try:
        header = json.loads(header_bytes)
        data_end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise _Incomplete(f"{label}: safetensors header is not valid") from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise _Incomplete(f"{label}: {size} bytes on disk, header says {expected}")


def _check_zip(path: Path, label: str) -> None:
    """torch.save writes a zip whose end-of-central-directory record comes last."""
    try:
        with open(path, "rb") as f:
            # zipfile.is_zipfile only looks for an end record near the end, and tensor bytes can
            # contain one by chance; opening also parses the central directory it points to, and a
            # torch.save zip always lists at least one entry.
            with zipfile.ZipFile(f) as archive:
                whole = bool(archive.infolist())
    except FileNotFoundError:
        raise _Incomplete(f"{label} missing") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError):
        whole = False
    if not whole:
        size = _size_or_none(path)
        raise _Incomplete(f"{label}: not a complete zip ({size} bytes; torch.save still writing?)")


# ---------------------------------------------------------------------------------------------------
# FSDP subfolders, DCP directories and per-rank shards


def _check_fsdp_dirs(folder: Path, names: set[str]) -> None:
    if FSDP_MODEL_DIR not in names:
        raise _Incomplete(f"{FSDP_MODEL_DIR}/ missing")
    for sub in (FSDP_MODEL_DIR, FSDP_EMA_DIR):
        if sub in names:
            sub_names = _listdir(folder / sub)
            if _rank_shard_names(sub_names):
                _check_rank_shards(folder / sub, sub_names, f"{sub}/")
            else:
                _check_dcp(folder / sub, f"{sub}/")


def _check_dcp(directory: Path, label: str) -> None:
    try:
        meta = read_dcp_metadata(directory / METADATA_FILE)
    except FileNotFoundError:
        raise _Incomplete(f"{label}{METADATA_FILE} missing (DCP writes it last)") from None
    except UnsafeCheckpointError as err:
        raise _Incomplete(f"{label}{METADATA_FILE}: {err}") from None
    except DcpMetadataError as err:
        raise _Incomplete(f"{label}{METADATA_FILE}: unreadable: {err}") from None
    for rel, needed in sorted(required_file_sizes(meta).items()):
        size = _size_or_none(directory / rel)
        if size is None:
            raise _Incomplete(f"{label}{rel} missing")
        if size < needed:
            raise _Incomplete(f"{label}{rel}: {size} bytes on disk, {METADATA_FILE} says at least {needed}")


def _rank_shard_names(names: set[str]) -> dict[str, tuple[int, int]]:
    """file name -> (world size, rank) for every model_world_size_W_rank_R.pt."""
    found = {}
    for name in names:
        match = _RANK_SHARD.fullmatch(name)
        if match:
            found[name] = (int(match[1]), int(match[2]))
    return found


def _check_rank_shards(directory: Path, names: set[str], label: str, world: int | None = None) -> int:
    """All of ranks 0..W-1's model shards whole (W from the names, or `world` when given); returns W."""
    shards = _rank_shard_names(names)
    worlds = sorted({world for world, _ in shards.values()})
    if len(worlds) != 1 or (world is not None and worlds != [world]):
        raise _Incomplete(f"{label}model_world_size_*_rank_*.pt disagree on the world size: {worlds}")
    world = worlds[0]
    stray = sorted(name for name, (_, rank) in shards.items() if rank >= world)
    if stray:
        raise _Incomplete(f"{label}{stray[0]}: rank out of range for world size {world}")
    _check_rank_files(directory, "model", world, label)
    return world


def _check_rank_files(directory: Path, stem: str, world: int, label: str) -> None:
    """`{stem}_world_size_{world}_rank_{R}.pt` present and a whole zip for every rank R."""
    for rank in range(world):
        name = f"{stem}_world_size_{world}_rank_{rank}.pt"
        _check_zip(directory / name, f"{label}{name}")


# ---------------------------------------------------------------------------------------------------
# Small filesystem helpers


def is_default_sentinel_name(name: str) -> bool:
    """DEFAULT_SENTINEL, or the temporary file watcher.atomic writes it through."""
    return name == DEFAULT_SENTINEL or name.startswith(f".{DEFAULT_SENTINEL}.tmp-")


def _listdir(directory: Path) -> set[str]:
    return set(os.listdir(directory))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _describe(err: OSError | ValueError, folder: Path) -> str:
    filename = getattr(err, "filename", None)
    if not filename:
        return f"changed while being checked: {err}"
    try:
        rel = Path(filename).relative_to(folder).as_posix()
    except ValueError:
        rel = str(filename)
    if isinstance(err, FileNotFoundError):
        return f"{rel} missing"
    return f"{rel}: {getattr(err, 'strerror', None) or err}"
