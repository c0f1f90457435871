"""Checkpoint layouts: their names, their file patterns, and where each one keeps the weights of a variant.

The one owner of these facts. `watcher.completion` detects a folder's layout (`detect_layout`), applies that
layout's completion rule and journals the name; the prepare stage hands the journaled name back to
`merge.open_weights(..., layout=...)`, which looks up `weight_home` instead of guessing again. Detection from
disk is only for a folder nothing has journaled (`ckpt-watch merge DIR`) and for the layouts that name no
weights ("sentinel", "unknown").

Names only: nothing here reads a file's contents or imports torch (the watcher daemon imports it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from merge.dcp_metadata import METADATA_FILE


class Layout(StrEnum):
    """How a producer laid out a checkpoint folder. The values are what the journal stores."""

    SENTINEL = "sentinel"  # judged by a sentinel file alone, the layout unrecognised or not checked
    HF = "hf"  # Hugging Face Trainer: consolidated weights (safetensors or .bin) in the folder
    HF_FSDP_DCP = "hf-fsdp-dcp"  # accelerate / HF Trainer FSDP SHARDED_STATE_DICT: pytorch_model_fsdp_0/ is DCP
    DCP = "dcp"  # the folder is a DCP checkpoint (torchtitan's step-N/)
    HF_EXPORT = "hf-export"  # torchtitan's last_save_in_hf: consolidated safetensors beside sharded/
    RANK_SHARDS = "rank-shards"  # per-rank DTensor files, in the folder or in pytorch_model_fsdp_0/
    LMMS_ENGINE = "lmms-engine"  # LMMs-Engine: rank files in pytorch_model_fsdp_0/ beside optimizer/ etc.
    VERL = "verl"  # veRL's global_step_N/: the actor's rank files in actor/
    UNKNOWN = "unknown"  # no recognised weights


VARIANTS = ("regular", "ema")

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
FSDP_EMA_DIR = "pytorch_ema_model_fsdp_0"
TRAINER_STATE = "trainer_state.json"
DCP_DATA_SUFFIX = ".distcp"
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
VERL_ACTOR_DIR = "actor"
VERL_ROLES = (VERL_ACTOR_DIR, "critic")
VERL_LAST = "data.pt"
VERL_HF_DIR = "huggingface"

# Per-rank files: `{stem}_world_size_{W}_rank_{R}.pt`; the model's stem is "model".
RANK_SHARD = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")
RANK_SHARD_PATTERN = "model_world_size_*_rank_*.pt"  # the same files, as said in messages


def rank_file_name(stem: str, world: int, rank: int) -> str:
    return f"{stem}_world_size_{world}_rank_{rank}.pt"


def rank_shard_names(names: set[str]) -> dict[str, tuple[int, int]]:
    """file name -> (world size, rank) for every model_world_size_W_rank_R.pt among `names`."""
    found = {}
    for name in names:
        match = RANK_SHARD.fullmatch(name)
        if match:
            found[name] = (int(match[1]), int(match[2]))
    return found


HF_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def hf_weight_names(names: set[str]) -> list[str]:
    """The Hugging Face weight files (single files, indexes, numbered shards) among `names`."""
    return [n for n in names if n in HF_SINGLE_FILES or n in HF_INDEX_FILES or HF_SHARD.fullmatch(n)]


def is_dcp_names(names: set[str]) -> bool:
    return METADATA_FILE in names or any(n.endswith(DCP_DATA_SUFFIX) for n in names)


# ---------------------------------------------------------------------------------------------------
# Detection: from names alone (the folder's, and for FSDP subfolders theirs), no file is read.


def list_names(directory: Path) -> set[str]:
    return set(os.listdir(directory))


def detect_layout(folder: Path, names: set[str] | None = None) -> Layout:
    """The layout of `folder` judged by file names (`names`: its listing, when the caller has it already).

    Raises OSError when the folder or a subfolder it must look into cannot be listed (vanished mid-look)."""
    folder = Path(folder)
    names = list_names(folder) if names is None else names
    if is_dcp_names(names):
        return Layout.DCP
    if rank_shard_names(names):
        return Layout.RANK_SHARDS
    if VERL_ACTOR_DIR in names and is_dir(folder / VERL_ACTOR_DIR):
        return Layout.VERL
    for sub in (FSDP_MODEL_DIR, FSDP_EMA_DIR):
        if sub in names:
            if any(d in names for d in LMMS_STATE_DIRS):
                return Layout.LMMS_ENGINE
            # An empty subfolder (just created) is taken for DCP, accelerate's default.
            return Layout.RANK_SHARDS if rank_shard_names(list_names(folder / sub)) else Layout.HF_FSDP_DCP
    if HF_EXPORT_SHARDS_DIR in names and TRAINER_STATE not in names and is_dir(folder / HF_EXPORT_SHARDS_DIR):
        return Layout.HF_EXPORT
    if TRAINER_STATE in names or hf_weight_names(names):
        return Layout.HF
    return Layout.UNKNOWN


def variants_in(folder: Path, names: set[str], layout: Layout) -> tuple[str, ...]:
    """The weight variants `folder` holds: ("regular",), ("regular", "ema"), or () for an unknown layout."""
    if FSDP_EMA_DIR in names and is_dir(folder / FSDP_EMA_DIR):
        # LMMs-Engine creates the EMA folder even when its EMA is not initialised yet, and then writes nothing.
        if not (layout == Layout.LMMS_ENGINE and "config.json" in names
                and not rank_shard_names(list_names(folder / FSDP_EMA_DIR))):  # fmt: skip
            return ("regular", "ema")
    return () if layout == Layout.UNKNOWN else ("regular",)


# ---------------------------------------------------------------------------------------------------
# Where each layout keeps the weights of a variant


class WeightFormat(StrEnum):
    HF = "hf"  # consolidated Hugging Face files (model.safetensors, an index, pytorch_model.bin)
    DCP = "dcp"  # a torch.distributed.checkpoint directory (.metadata + *.distcp)
    RANK_SHARDS = "rank-shards"  # model_world_size_W_rank_R.pt per rank


@dataclass(frozen=True)
class WeightHome:
    """Where a variant's weights are: the first of `dirs` (relative to the checkpoint, "" for the folder
    itself) that holds files of `format`, else the first of them; `format` None: whatever format the files
    in that folder have (a layout that names no format for this variant)."""

    dirs: tuple[str, ...]
    format: WeightFormat | None

    @property
    def consolidated(self) -> bool:
        """Already Hugging Face weights: nothing to merge."""
        return self.format == WeightFormat.HF


_REGULAR = {
    Layout.HF: WeightHome(("",), WeightFormat.HF),
    Layout.HF_EXPORT: WeightHome(("",), WeightFormat.HF),
    Layout.DCP: WeightHome(("",), WeightFormat.DCP),
    Layout.HF_FSDP_DCP: WeightHome((FSDP_MODEL_DIR,), WeightFormat.DCP),
    Layout.RANK_SHARDS: WeightHome(("", FSDP_MODEL_DIR), WeightFormat.RANK_SHARDS),
    Layout.LMMS_ENGINE: WeightHome((FSDP_MODEL_DIR,), WeightFormat.RANK_SHARDS),
    Layout.VERL: WeightHome((VERL_ACTOR_DIR,), WeightFormat.RANK_SHARDS),  # the actor is the model being trained
}
# The EMA twin is saved like the regular weights, beside them; in layouts that have no EMA of their own the
# files in the folder say what it is.
_SHARDED_EMA = (Layout.HF_FSDP_DCP, Layout.RANK_SHARDS, Layout.LMMS_ENGINE)


def weight_home(layout: Layout | str, variant: str) -> WeightHome | None:
    """Where `layout` keeps `variant`'s weights; None for a layout that does not say ("sentinel", "unknown", or
    a name this version does not know): the caller detects the layout from disk instead."""
    try:
        layout = Layout(layout)
    except ValueError:
        return None
    regular = _REGULAR.get(layout)
    if regular is None or variant == "regular":
        return regular
    return WeightHome((FSDP_EMA_DIR,), regular.format if layout in _SHARDED_EMA else None)


def format_of(names: set[str]) -> WeightFormat | None:
    """The weight format of a folder's files, by name (DCP before rank shards before Hugging Face files)."""
    if is_dcp_names(names):
        return WeightFormat.DCP
    if rank_shard_names(names):
        return WeightFormat.RANK_SHARDS
    if hf_weight_names(names):
        return WeightFormat.HF
    return None


def is_dir(path: Path) -> bool:
    """A folder; False, not an error, when it vanished or cannot be looked at."""
    try:
        return path.is_dir()
    except OSError:
        return False
