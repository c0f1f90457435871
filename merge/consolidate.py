"""Turn one checkpoint (or several, averaged) into a Hugging Face model folder.

    open_weights(checkpoint, variant, layout=None)  -> a WeightSource, from where the layout keeps the weights
    open_model(checkpoint, variant, ...)            -> ModelWeights: what merge_checkpoint would write (tensors,
                                                       config.json), described and readable without writing
    merge_checkpoint(checkpoint, out)               -> out/ with sharded safetensors, index, config and tokenizer files
    average_checkpoints([a, b], out)                -> the tensor-by-tensor mean, accumulated in fp32

The output is written into a temporary sibling folder and renamed into place only when complete, so a
half-written merge is never mistaken for a finished one; on any error nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from merge.layouts import (
    FSDP_EMA_DIR,
    VARIANTS,
    VERL_ACTOR_DIR,
    VERL_HF_DIR,
    Layout,
    WeightFormat,
    WeightHome,
    detect_layout,
    format_of,
    list_names,
    variants_in,
    weight_home,
)
from merge.safetensors_source import SafetensorsSource, has_safetensors
from merge.source import FLOATING, MergeError, TensorSpec, WeightSource
from merge.torchtitan_source import TorchtitanSource, looks_like_torchtitan
from merge.writer import DEFAULT_SHARD_BYTES, ByteProgress, output_dtype, write_weights

log = logging.getLogger("ckpt-watch")

# veRL keeps the model's config and tokenizer in its actor's huggingface/ subfolder (a merge may be pointed at
# global_step_N/ or at its actor/).
VERL_HF_DIRS = (VERL_HF_DIR, f"{VERL_ACTOR_DIR}/{VERL_HF_DIR}")
# What a model folder needs besides weights: config, generation config, tokenizer and processor files.
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "image_processor_config.json",
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def variants_of(checkpoint: Path) -> list[str]:
    checkpoint = Path(checkpoint)
    names = list_names(checkpoint)
    return list(variants_in(checkpoint, names, detect_layout(checkpoint, names))) or ["regular"]


def is_consolidated(checkpoint: Path) -> bool:
    """Regular weights already in Hugging Face form: nothing to merge."""
    return has_safetensors(checkpoint) or (checkpoint / "pytorch_model.bin").is_file() or (
        checkpoint / "pytorch_model.bin.index.json"
    ).is_file()


def open_weights(checkpoint: Path, variant: str = "regular", layout: Layout | str | None = None) -> WeightSource:
    """`variant`'s weights of `checkpoint`, found where `layout` keeps them.

    `layout`: as the watcher journaled it (merge/layouts.py). Without one, or with one that names no weights
    ("sentinel", "unknown"), the layout is detected from the folder's file names: `ckpt-watch merge DIR`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise MergeError(f"checkpoint folder not found: {checkpoint}")
    if variant not in VARIANTS:
        raise MergeError(f"unknown weight variant {variant!r}; use regular or ema")
    home = weight_home(layout, variant) if layout is not None else None
    if home is None:
        home = weight_home(detect_layout(checkpoint), variant) or WeightHome(("",), None)
    if variant == "ema":
        ema_dir = checkpoint / FSDP_EMA_DIR
        if not ema_dir.is_dir():
            raise MergeError(f"{checkpoint.name} has no EMA weights ({FSDP_EMA_DIR}/ is missing)")
        # Tensors the EMA does not track (buffers, frozen weights) come from the regular weights.
        return OverlaySource(_open_home(checkpoint, home), open_weights(checkpoint, "regular", layout))
    return _open_home(checkpoint, home)


def _open_home(checkpoint: Path, home: WeightHome) -> WeightSource:
    folders = [checkpoint / sub if sub else checkpoint for sub in home.dirs]
    folder = next((f for f in folders if home.format and f.is_dir() and format_of(list_names(f)) == home.format),
                  folders[0])  # fmt: skip
    if not folder.is_dir():
        raise MergeError(f"{folder}: not found")
    weight_format = home.format or format_of(list_names(folder))
    if weight_format == WeightFormat.DCP:
        from merge.dcp_source import DcpSource

        return DcpSource(folder)
    if weight_format == WeightFormat.RANK_SHARDS:
        from merge.rank_shards_source import RankShardSource

        return RankShardSource(folder)
    if has_safetensors(folder):
        return SafetensorsSource(folder)
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise MergeError(f"{folder}: pytorch_model.bin weights cannot be streamed; save with safetensors")
    raise MergeError(f"{folder}: no weights found (no DCP .metadata, rank shards or safetensors)")


class OverlaySource:
    """`top`'s tensors where it has them, `base`'s for the rest (EMA over regular)."""

    def __init__(self, top: WeightSource, base: WeightSource):
        self.top, self.base = top, base
        self._top_specs = top.specs()
        self._specs = {**base.specs(), **self._top_specs}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, out: memoryview) -> None:
        (self.top if name in self._top_specs else self.base).read(name, out)

    def byte_ranges(self, name: str) -> None:
        return None  # every tensor goes through `read`

    def close(self) -> None:
        self.top.close()
        self.base.close()


class AverageSource:
    """The element-wise mean of several sources' tensors, accumulated in fp32, one tensor at a time.

    Floating-point tensors are averaged; integer ones (counters, ids) must agree and are taken from the first.
    """

    def __init__(self, sources: list[WeightSource], labels: list[str]):
        self.sources = sources
        first = sources[0].specs()
        for source, label in zip(sources[1:], labels[1:]):
            other = source.specs()
            if other.keys() != first.keys():
                odd = sorted(other.keys() ^ first.keys())[0]
                raise MergeError(f"cannot average: {label} and {labels[0]} differ in tensor {odd}")
            for name, spec in other.items():
                if spec.shape != first[name].shape:
                    raise MergeError(f"cannot average: {name} is {spec.shape} in {label}, {first[name].shape} in {labels[0]}")
        self._specs = first

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, out: memoryview) -> None:
        import torch

        spec = self._specs[name]
        if spec.dtype not in FLOATING or spec.numel == 0:
            self.sources[0].read(name, out)
            return
        total = torch.zeros(spec.numel, dtype=torch.float32)
        for source in self.sources:
            own = source.specs()[name]
            scratch = bytearray(own.nbytes)
            source.read(name, memoryview(scratch))
            total += torch.frombuffer(scratch, dtype=getattr(torch, own.dtype)).float()
        total /= len(self.sources)
        result = total.to(getattr(torch, spec.dtype))
        out[:] = memoryview(result.view(torch.uint8).numpy())

    def byte_ranges(self, name: str) -> None:
        return None  # computed on `read`

    def close(self) -> None:
        for source in self.sources:
            source.close()


def merge_checkpoint(
    checkpoint: Path,
    out: Path,
    variant: str = "regular",
    dtype: str | None = None,
    base_model: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ByteProgress | None = None,
    layout: Layout | str | None = None,
) -> Path:
    """Write `variant`'s weights of `checkpoint` as a Hugging Face model folder at `out`.

    `layout`: the checkpoint's layout as already decided (the watcher's journal); None detects it from disk."""
    checkpoint = Path(checkpoint)
    source = open_weights(checkpoint, variant, layout)  # validates coverage before anything is written
    try:
        return _write_model(source, [checkpoint], Path(out), dtype, base_model, max_shard_bytes, progress)
    finally:
        source.close()


def average_checkpoints(
    checkpoints: list[Path],
    out: Path,
    variant: str = "regular",
    dtype: str | None = None,
    base_model: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ByteProgress | None = None,
) -> Path:
    checkpoints = [Path(c) for c in checkpoints]
    sources: list[WeightSource] = []
    try:
        for checkpoint in checkpoints:
            sources.append(open_weights(checkpoint, variant))
        source = AverageSource(sources, [c.name for c in checkpoints])
        return _write_model(source, checkpoints, Path(out), dtype, base_model, max_shard_bytes, progress)
    finally:
        for source in sources:
            source.close()


@dataclass
class ModelWeights:
    """A model folder as merge_checkpoint would write it, without writing it: the tensors it would hold (names in
    the model's order, a tied lm_head dropped, torchtitan names mapped), its config.json, and where its config and
    tokenizer files come from. The watcher loads a sharded checkpoint straight from this (watcher/model_input.py),
    so the in-memory model and the merged folder follow one set of rules."""

    source: WeightSource  # read tensors here, by the names in `names`
    names: list[str]
    config: dict  # config.json as written: its dtype says what most weight bytes are
    model_folders: list[Path]  # where config, generation config and tokenizer files come from (first wins)
    cast: str | None = None  # floating-point tensors are written in this dtype (None: their own)
    owned: WeightSource | None = None  # what `close` closes (the source may wrap it)

    def specs(self) -> dict[str, "TensorSpec"]:
        """name -> dtype and shape as written (the cast applied), for `names` only."""
        specs = self.source.specs()
        return {n: TensorSpec(output_dtype(specs[n].dtype, self.cast), specs[n].shape) for n in self.names}

    def close(self) -> None:
        (self.owned or self.source).close()


def open_model(checkpoint: Path, variant: str = "regular", base_model: Path | None = None,
               layout: Layout | str | None = None, dtype: str | None = None) -> ModelWeights:  # fmt: skip
    """`variant`'s weights of `checkpoint` as the model folder merge_checkpoint would write; close() when done."""
    checkpoint = Path(checkpoint)
    source = open_weights(checkpoint, variant, layout)  # validates coverage before anything is read
    try:
        return describe_model(source, [checkpoint], base_model, dtype)
    except BaseException:
        source.close()
        raise


def describe_model(source: WeightSource, checkpoints: list[Path], base_model: Path | None,
                   dtype: str | None = None) -> ModelWeights:  # fmt: skip
    """The model folder `source`'s tensors make, with config and tokenizer files from the first checkpoint (or
    `base_model`). Closing the result closes `source`."""
    config_home = _find_config(checkpoints[0], base_model)
    config = json.loads((config_home / "config.json").read_text(encoding="utf-8"))
    owned = source
    if looks_like_torchtitan(source.specs()):
        source = TorchtitanSource(source, config)  # torchtitan's names -> Hugging Face's, with its own adapter
    names = _output_names(source.specs(), config)
    dominant = written_dtype(source.specs(), names, dtype)
    if dominant:
        # The config says what the weights are: a bf16 export merged with a float32 base config stays bf16.
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
            config[key] = dominant
    return ModelWeights(source, names, config, list(_model_folders(checkpoints[0], base_model)), dtype, owned)


def _write_model(
    source: WeightSource,
    checkpoints: list[Path],
    out: Path,
    dtype: str | None,
    base_model: Path | None,
    max_shard_bytes: int,
    progress: ByteProgress | None,
) -> Path:
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"output folder {out} already exists and is not empty")
    model = describe_model(source, checkpoints, base_model, dtype)  # the caller closes `source`
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_weights(staging, model.source, model.names, dtype, max_shard_bytes, progress)
        _copy_model_files(model, staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _model_folders(checkpoint: Path, base_model: Path | None) -> Iterable[Path]:
    """Where config and tokenizer files come from: the checkpoint first (veRL keeps them in its actor's
    `huggingface/` subfolder), then --base-model."""
    yield checkpoint
    for sub in VERL_HF_DIRS:
        if (checkpoint / sub).is_dir():
            yield checkpoint / sub
    if base_model is not None:
        yield Path(base_model)


def written_dtype(specs: dict[str, TensorSpec], names: list[str], cast: str | None) -> str | None:
    """The floating-point dtype most of the written weight bytes have (None when no tensor is floating)."""
    if cast:
        return cast
    totals: dict[str, int] = {}
    for name in names:
        if specs[name].dtype in FLOATING:
            totals[specs[name].dtype] = totals.get(specs[name].dtype, 0) + specs[name].nbytes
    return max(totals, key=totals.__getitem__) if totals else None


def _find_config(checkpoint: Path, base_model: Path | None) -> Path:
    for folder in _model_folders(checkpoint, base_model):
        if (folder / "config.json").is_file():
            return folder
    where = f"{checkpoint} or --base-model {base_model}" if base_model else f"{checkpoint} (give --base-model DIR)"
    raise MergeError(f"no config.json in {where}")


def _output_names(specs: dict[str, TensorSpec], config: dict) -> list[str]:
    """Tensor names in the model's order; a tied lm_head is dropped, as save_pretrained does."""
    names = list(specs)
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
    embed = next((n for n in names if n.endswith("embed_tokens.weight")), None)
    if "lm_head.weight" in specs and tied and embed is not None:
        names.remove("lm_head.weight")
    elif "lm_head.weight" not in specs and not tied and _is_causal_lm(config):
        raise MergeError("lm_head.weight is missing and config.json does not tie it to the embeddings")
    return names


def _is_causal_lm(config: dict) -> bool:
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def copy_model_files(folders: list[Path], out: Path, missing_only: bool = False) -> None:
    """Copy config, tokenizer and processor files into `out`, each from the first of `folders` that has it
    (`missing_only`: only those `out` does not have yet)."""
    for name in MODEL_FILES:
        if missing_only and (out / name).exists():
            continue
        for folder in folders:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
                break


def _copy_model_files(model: ModelWeights, staging: Path) -> None:
    copy_model_files(model.model_folders, staging)
    if written_dtype(model.source.specs(), model.names, model.cast):  # else config.json is copied as it is
        (staging / "config.json").write_text(json.dumps(model.config, indent=2) + "\n", encoding="utf-8")
    if not any((staging / name).is_file() for name in TOKENIZER_FILES):
        log.warning("no tokenizer files in %s: the merged weights are complete, but evaluators need a tokenizer",
                    " or ".join(str(f) for f in model.model_folders))  # fmt: skip
