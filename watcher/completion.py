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

The layout names, their file patterns and the detection from names are merge/layouts.py's (merge uses them
too); whether a journaled folder changed since (its fingerprint) is watcher/fingerprint.py's.

The check only stats and reads (headers, JSON, zip directories), never writes, never imports torch,
and never raises for a folder that is half-written or vanishing underneath it: any such surprise is
an incomplete Verdict whose reason names the file.
"""

from __future__ import annotations

import json
import os
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
from merge.layouts import (
    DCP_DATA_SUFFIX,
    FSDP_EMA_DIR,
    FSDP_MODEL_DIR,
    HF_INDEX_FILES,
    HF_SHARD,
    HF_SINGLE_FILES,
    LMMS_STATE_DIRS,
    RANK_SHARD,
    RANK_SHARD_PATTERN,
    TRAINER_STATE,
    VERL_ACTOR_DIR,
    VERL_HF_DIR,
    VERL_LAST,
    VERL_ROLES,
    Layout,
    detect_layout,
    hf_weight_names,
    is_dir,
    list_names,
    rank_file_name,
    rank_shard_names,
    variants_in,
)

DEFAULT_SENTINEL = "ckpt-watch-complete.json"
FOLDER_GONE = "folder is gone"
CONFIG = "config.json"

# A tokenizer needs one of these; the other tokenizer files (tokenizer_config.json, ...) come with it.
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format refuses larger headers too


@dataclass(frozen=True)
class Verdict:
    complete: bool
    layout: Layout
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
    layout, variants, final = Layout.UNKNOWN, (), False
    try:
        if not folder.is_dir():
            return Verdict(False, Layout.UNKNOWN, FOLDER_GONE, ())
        names = list_names(folder)
        detected = detect_layout(folder, names)
        variants = variants_in(folder, names, detected)
        if sentinel == DEFAULT_SENTINEL or (sentinel is None and DEFAULT_SENTINEL in names):
            # Our own sentinel: verified against its manifest when it has one, else presence-only.
            layout = detected if detected != Layout.UNKNOWN else Layout.SENTINEL
            if not _check_manifest(folder, step):
                layout = Layout.SENTINEL
        elif sentinel is not None:
            layout = Layout.SENTINEL
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
    if not is_dir(folder):
        reason, final = FOLDER_GONE, False
    return Verdict(False, layout, reason, variants, final)


# ---------------------------------------------------------------------------------------------------
# The per-layout rules (the layouts, their file names and their detection: merge/layouts.py).


def checkpoint_files_in(folder: Path) -> list[str]:
    """The names in `folder` that only a checkpoint holds (weights, DCP metadata, the Trainer's state, our
    sentinel), by name alone; [] for an ordinary folder or one that cannot be listed."""
    try:
        names = list_names(folder)
    except OSError:
        return []
    if DEFAULT_SENTINEL in names or detect_layout(folder, names) != Layout.UNKNOWN:
        found = [n for n in names if n in (DEFAULT_SENTINEL, TRAINER_STATE, METADATA_FILE, FSDP_MODEL_DIR, FSDP_EMA_DIR)
                 or n.endswith(DCP_DATA_SUFFIX) or RANK_SHARD.fullmatch(n)]  # fmt: skip
        return sorted(found + hf_weight_names(names))
    return []


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
    if rank_shard_names(names):
        _check_rank_shards(folder, names, "")
    else:
        _check_fsdp_dirs(folder, names)
    # veRL and LMMs-Engine write no trainer_state.json, so it cannot be required here.
    _check_trainer_state(folder, step, required=False)


def _rule_hf_export(folder: Path, names: set[str], step: int) -> None:
    if HF_INDEX_FILES[0] not in names:
        raise _Incomplete(f"{HF_INDEX_FILES[0]} missing (torch's Hugging Face writer writes it last)")
    _check_hf_weights(folder, names)


def _rule_lmms_engine(folder: Path, names: set[str], step: int) -> None:
    model_shards = rank_shard_names(list_names(folder / FSDP_MODEL_DIR)) if FSDP_MODEL_DIR in names else {}
    if not model_shards:
        raise _Incomplete(f"{FSDP_MODEL_DIR}/{RANK_SHARD_PATTERN} not written yet")
    world = _check_rank_shards(folder / FSDP_MODEL_DIR, set(model_shards), f"{FSDP_MODEL_DIR}/")
    if FSDP_EMA_DIR in names:
        ema_names = list_names(folder / FSDP_EMA_DIR)
        if rank_shard_names(ema_names):
            _check_rank_shards(folder / FSDP_EMA_DIR, ema_names, f"{FSDP_EMA_DIR}/", world)
    for sub, stem in LMMS_STATE_DIRS.items():
        if sub in names:
            _check_rank_files(folder / sub, stem, world, f"{sub}/")
    _check_config_written(folder, "LMMs-Engine writes it last")
    _check_trainer_state(folder, step, required=False)


def _rule_verl(folder: Path, names: set[str], step: int) -> None:
    for role in VERL_ROLES:
        if role in names:
            role_names = list_names(folder / role)
            if not rank_shard_names(role_names):
                raise _Incomplete(f"{role}/{RANK_SHARD_PATTERN} not written yet")
            _check_rank_shards(folder / role, role_names, f"{role}/")
    if VERL_LAST not in names:
        raise _Incomplete(f"{VERL_LAST} missing (veRL writes it last)")
    _check_zip(folder / VERL_LAST, VERL_LAST)


def _rule_unknown(folder: Path, names: set[str], step: int) -> None:
    raise _Incomplete(
        "no recognised weights yet (model.safetensors, pytorch_model.bin, an index, adapter_model.*, "
        f"{FSDP_MODEL_DIR}/, .metadata or {RANK_SHARD_PATTERN}) and no {TRAINER_STATE}"
    )


_RULES = {
    Layout.HF: _rule_hf,
    Layout.HF_FSDP_DCP: _rule_hf_fsdp,
    Layout.DCP: _rule_dcp,
    Layout.HF_EXPORT: _rule_hf_export,
    Layout.RANK_SHARDS: _rule_rank_shards,
    Layout.LMMS_ENGINE: _rule_lmms_engine,
    Layout.VERL: _rule_verl,
    Layout.UNKNOWN: _rule_unknown,
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
_CONFIG_MAY_ARRIVE = {Layout.HF: True, Layout.HF_FSDP_DCP: True, Layout.RANK_SHARDS: True, Layout.LMMS_ENGINE: True,
                      Layout.VERL: False, Layout.DCP: False, Layout.HF_EXPORT: False}  # fmt: skip


def _check_model_files(folder: Path, names: set[str], layout: Layout, base_model: Path | None) -> None:
    homes = [folder]
    if layout == Layout.VERL:
        homes.append(folder / VERL_ACTOR_DIR / VERL_HF_DIR)
    if not any(_is_file(home / CONFIG) for home in homes) and not (base_model and _is_file(Path(base_model) / CONFIG)):
        if _CONFIG_MAY_ARRIVE.get(layout, True):
            raise _Incomplete(f"{CONFIG} not written yet (or set base_model to a folder that has one)")
        raise _Unusable(f"no {CONFIG} ({_producer(layout)} does not write one here): set base_model to a Hugging "
                        "Face folder of the same model")  # fmt: skip
    if layout != Layout.HF:
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


def _producer(layout: Layout) -> str:
    names = {Layout.DCP: "torchtitan", Layout.HF_EXPORT: "torchtitan's Hugging Face export", Layout.VERL: "veRL"}
    return names.get(layout, layout)


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


def _check_hf_weights(folder: Path, names: set[str]) -> None:
    if not hf_weight_names(names):
        raise _Incomplete(
            f"no model weights (model.safetensors, pytorch_model.bin, an index, adapter_model.* or {FSDP_MODEL_DIR}/)"
        )
    indexed: set[str] = set()
    for index_name in HF_INDEX_FILES:
        if index_name in names:
            shards = _read_index(folder / index_name, index_name)
            for shard in shards:
                _check_weight_file(folder / shard, shard)
            indexed.update(shards)
    # save_pretrained writes the shards first and the index after them.
    for name in sorted(names):
        if HF_SHARD.fullmatch(name) and name not in indexed:
            index_name = HF_INDEX_FILES[0] if name.endswith(".safetensors") else HF_INDEX_FILES[1]
            if index_name not in names:
                raise _Incomplete(f"{name}: shard present but {index_name} missing")
    for name in HF_SINGLE_FILES:
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
            sub_names = list_names(folder / sub)
            if rank_shard_names(sub_names):
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


def _check_rank_shards(directory: Path, names: set[str], label: str, world: int | None = None) -> int:
    """All of ranks 0..W-1's model shards whole (W from the names, or `world` when given); returns W."""
    shards = rank_shard_names(names)
    worlds = sorted({world for world, _ in shards.values()})
    if len(worlds) != 1 or (world is not None and worlds != [world]):
        raise _Incomplete(f"{label}{RANK_SHARD_PATTERN} disagree on the world size: {worlds}")
    world = worlds[0]
    stray = sorted(name for name, (_, rank) in shards.items() if rank >= world)
    if stray:
        raise _Incomplete(f"{label}{stray[0]}: rank out of range for world size {world}")
    _check_rank_files(directory, "model", world, label)
    return world


def _check_rank_files(directory: Path, stem: str, world: int, label: str) -> None:
    """`{stem}_world_size_{world}_rank_{R}.pt` present and a whole zip for every rank R."""
    for rank in range(world):
        name = rank_file_name(stem, world, rank)
        _check_zip(directory / name, f"{label}{name}")


# ---------------------------------------------------------------------------------------------------
# Small filesystem helpers


def is_default_sentinel_name(name: str) -> bool:
    """DEFAULT_SENTINEL, or the temporary file watcher.atomic writes it through."""
    return name == DEFAULT_SENTINEL or name.startswith(f".{DEFAULT_SENTINEL}.tmp-")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
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
