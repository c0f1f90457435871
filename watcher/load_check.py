"""Would every weight load? Compare a model folder's tensors with what its config's model class expects.

transformers' `from_pretrained` loads a checkpoint whose names do not match the model (torchtitan's
`layers.0.attention.wq.weight`, a renamed or missing tensor) without failing: it logs the weights as
"newly initialized" and the model runs on random values, so every metric computed from it is wrong yet looks
like a result. This check runs in the prepare stage, before any evaluator (lm-eval included, which loads the
model itself), and turns such a folder into a permanent failure that names the first missing and unexpected
keys and the likely cause.

It asks transformers itself, so its own rules apply exactly as in a real load: the model class is built from
`config.json` on the meta device (no memory), the checkpoint's names and shapes are offered as meta tensors
to transformers' loader (`convert_and_load_state_dict_in_model`, with the class's weight conversions: fused
MoE experts, renamed prefixes, a base model's checkpoint in a task model), and what it re-creates itself is
allowed: tied weights (`all_tied_weights_keys`), non-persistent buffers (not in the state dict at all) and the
class's `_keys_to_ignore_on_load_*` patterns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge.safetensors_source import INDEX as SAFETENSORS_INDEX
from merge.safetensors_source import SINGLE as SAFETENSORS_SINGLE
from merge.safetensors_source import read_header
from merge.source import SAFETENSORS_TO_TORCH
from merge.torchtitan_source import INSTALL_HINT, looks_like_torchtitan

BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

TORCHTITAN_HINT = ("the names are torchtitan's: set base_model (a Hugging Face folder of the same model) and "
                   f"{INSTALL_HINT} so they are mapped to Hugging Face names")


@dataclass(frozen=True)
class LoadReport:
    model_class: str
    missing: tuple[str, ...]  # expected by the model, absent from the folder (tied weights excluded)
    unexpected: tuple[str, ...]  # in the folder, unknown to the model
    mismatched: tuple[str, ...]  # "name: folder shape vs model shape"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """name -> (torch dtype name, shape) of a Hugging Face model folder's weights, from headers only; None when
    the folder holds no full-model weights (an adapter, for instance)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS_SINGLE).is_file():
        files = [SAFETENSORS_SINGLE]
        if (folder / SAFETENSORS_INDEX).is_file():
            weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        tensors = {}
        for file in files:
            header, _ = read_header(folder / file)
            for name, entry in header.items():
                tensors[name] = (SAFETENSORS_TO_TORCH.get(entry["dtype"], "float32"), tuple(entry["shape"]))
        return tensors
    if (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file():
        import torch

        files = [BIN_SINGLE]
        if (folder / BIN_INDEX).is_file():
            files = sorted(set(json.loads((folder / BIN_INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        tensors = {}
        for file in files:
            # mmap: only the pickle is read; the tensor bytes stay on disk.
            state = torch.load(folder / file, map_location="cpu", mmap=True, weights_only=True)
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[name] = (str(value.dtype).removeprefix("torch."), tuple(value.shape))
            del state
        return tensors
    return None


def compare_with_model(folder: Path) -> LoadReport | None:
    """What transformers would leave unloaded if it loaded `folder`; None when the model class cannot be built
    here (custom code, an architecture this transformers does not know) or the folder has no full weights."""
    from transformers import AutoConfig

    folder = Path(folder)
    tensors = checkpoint_tensors(folder)
    if tensors is None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, ImportError, RuntimeError, AttributeError, TypeError):
        return None  # a config only custom code (trust_remote_code) can build: not checkable here
    return compare_tensors(config, tensors, str(folder))


def compare_tensors(config, tensors: dict[str, tuple[str, tuple[int, ...]]], where: str) -> LoadReport | None:
    """`compare_with_model` for tensors described by name -> (dtype, shape) and a transformers config object
    (a sharded checkpoint's, before any merge); `where` names them in transformers' own messages."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    try:
        model_class = _model_class(transformers, config)
        if model_class is None:
            return None
        with torch.device("meta"):
            model = model_class._from_config(config)
    except (ValueError, KeyError, ImportError, RuntimeError, AttributeError, TypeError):
        return None  # a config or class only custom code (trust_remote_code) can build: not checkable here
    state = {name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for name, (dtype, shape) in tensors.items()}
    load_config = LoadStateDictConfig(pretrained_model_name_or_path=where, device_map={"": "meta"},
                                      weight_mapping=get_model_conversion_mapping(model, None, None))  # fmt: skip
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its own "newly initialized" report: we say it ourselves, once
    transformers.logging.disable_progress_bar()  # nothing is loaded: a "Loading weights" bar would mislead
    try:
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    model._adjust_missing_and_unexpected_keys(info)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    # A tied weight (lm_head under tie_word_embeddings) is re-created from its source, if the source loaded.
    missing = sorted(key for key in info.missing_keys if not (key in tied and tied[key] not in info.missing_keys))
    mismatched = sorted(_describe_mismatch(entry) for entry in info.mismatched_keys)
    mismatched += sorted(f"{name}: {error}" for name, error in (info.conversion_errors or {}).items())
    return LoadReport(model_class.__name__, tuple(missing), tuple(sorted(info.unexpected_keys)), tuple(mismatched))


def failure_text(report: LoadReport) -> str:
    """One line: how many weights are missing, unexpected or of the wrong shape, the first of each, and why."""
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing (first: {report.missing[0]})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected (first: {report.unexpected[0]})")
    if report.mismatched:
        parts.append(f"{len(report.mismatched)} of the wrong shape (first: {report.mismatched[0]})")
    return (f"not every weight would load into {report.model_class} built from config.json: {', '.join(parts)}; "
            f"likely cause: {likely_cause(report)}")  # fmt: skip


def likely_cause(report: LoadReport) -> str:
    if looks_like_torchtitan(report.unexpected):
        return TORCHTITAN_HINT
    if report.mismatched and not (report.missing or report.unexpected):
        return "config.json does not describe these weights (another model size?)"
    if report.missing and not report.unexpected:
        return "the checkpoint lacks these tensors (a partial save, or weights of a different model class)"
    return "the tensor names do not match the model class (renamed, or saved from a different model)"


def _model_class(transformers, config):
    for architecture in config.architectures or []:
        found = getattr(transformers, architecture, None)
        if found is not None:
            return found
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        mapping = getattr(auto, "_model_mapping", None)
        try:
            return mapping[type(config)]
        except (KeyError, TypeError):
            continue
    return None


def _describe_mismatch(entry) -> str:
    if isinstance(entry, tuple) and len(entry) == 3:
        name, found, expected = entry
        return f"{name}: {tuple(found)} in the folder, {tuple(expected)} in the model"
    return str(entry)
