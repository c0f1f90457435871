"""What a job's evaluators are given: the checkpoint's model, as a folder or loaded, loaded at most once per job.

    model.folder()       a Hugging Face model folder: the checkpoint in place, or a merged copy written to the job's
                         scratch folder on the first call only (backends that run in their own process need one)
    model.specs()        name -> TensorSpec of the weights, from safetensors headers or the shards' metadata
    model.config()       config.json as a dict ({} when there is none)
    model.tokenizer_dir  the folder the tokenizer loads from
    model.load(device)   (model, tokenizer), loaded on the first call and the same objects on every later one

A sharded checkpoint (DCP or per-rank shards, regular or EMA) is loaded straight from its shards when no
evaluator asked for a folder: transformers builds the model from the config (on the meta device, as for any
`from_pretrained`) and its own loader takes each tensor from merge's WeightSource as it goes, so host memory holds a
few tensors, not the model, and nothing is written to disk. The tensors, their names (a tied lm_head dropped) and
the config are those merge_checkpoint would write (merge.open_model), and transformers applies the same dtype rules
as when it reads the merged folder, so the loaded weights are bit-identical to the merged folder's.

Each real load says so in the job's log, one line (tests count them):

    [ckpt-watch] model loaded on cpu in 0.8 s (from shards: no merged copy)
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from merge import MergeError, ModelWeights, TensorSpec
from merge.consolidate import TOKENIZER_FILES
from merge.safetensors_source import SafetensorsSource

LOADED_LINE = "[ckpt-watch] model loaded on"


class PrepareError(RuntimeError):
    """The checkpoint cannot be turned into a loadable model; the message says why. (Raised by the prepare stage,
    watcher/prepare.py, which imports it from here, and by a direct load from shards.)"""


class ModelInput:
    """The model of one job; see the module docstring. Build it with watcher.prepare.prepare_input."""

    def __init__(self, checkpoint_name: str, folder: Path | None = None, merged: bool = False,
                 weights: ModelWeights | None = None, merge: Callable[[], Path] | None = None):  # fmt: skip
        """Either `folder` (a model folder; `merged`: written by this job) or `weights` (a sharded checkpoint's,
        described by merge.open_model) with `merge`, which writes them as a folder and returns it."""
        if (folder is None) == (weights is None):
            raise ValueError("a ModelInput has either a folder or weights")
        self.checkpoint_name = checkpoint_name
        self._folder, self._merged, self._weights, self._merge = folder, merged, weights, merge
        self._loaded: dict[str, tuple[Any, Any]] = {}

    # --- what it is ------------------------------------------------------------------------------------------

    @property
    def merged_folder(self) -> Path | None:
        """The merged copy this job wrote to its scratch folder, if any (the daemon may keep it)."""
        return self._folder if self._merged else None

    @property
    def has_folder(self) -> bool:
        """A folder exists already: folder() writes nothing."""
        return self._folder is not None

    def folder(self) -> Path:
        if self._folder is None:
            self._folder, self._merged = self._merge(), True
        return self._folder

    def specs(self) -> dict[str, TensorSpec]:
        """Raises MergeError when the folder has no safetensors weights (a .bin checkpoint)."""
        if self._folder is None:
            return self._weights.specs()
        source = SafetensorsSource(self._folder)
        try:
            return source.specs()
        finally:
            source.close()

    def transformers_config(self):
        """config() as the transformers config object a folder's config.json makes; None when this transformers
        cannot build it (no or an unknown model_type: custom code)."""
        return transformers_config(self.config())

    def config(self) -> dict:
        """config.json ({} when there is none); raises ValueError when it is not JSON."""
        if self._folder is None:
            return dict(self._weights.config)
        path = self._folder / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @property
    def tokenizer_dir(self) -> Path:
        """The folder, or for a sharded checkpoint the first folder a merge would take tokenizer files from."""
        if self._folder is not None:
            return self._folder
        folders = self._weights.model_folders
        return next((f for f in folders if any((f / name).is_file() for name in TOKENIZER_FILES)), folders[0])

    # --- the loaded model ------------------------------------------------------------------------------------

    def load(self, device: str) -> tuple[Any, Any]:
        """(model in eval mode on `device`, tokenizer): loaded on the first call, the same objects afterwards."""
        if device not in self._loaded:
            from transformers import AutoTokenizer

            start = time.monotonic()
            if self._folder is not None:
                model, where = _load_folder(self._folder, device), f"from {self._folder}"
            else:
                model, where = _load_weights(self._weights, device, self.checkpoint_name), "from shards: no merged copy"
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            print(f"{LOADED_LINE} {device} in {time.monotonic() - start:.1f} s ({where})", flush=True)
            self._loaded[device] = (model, tokenizer)
        return self._loaded[device]

    def close(self) -> None:
        """Drop the loaded model and close the shards (the job is over)."""
        self._loaded.clear()
        if self._weights is not None:
            self._weights.close()


def transformers_config(config: dict):
    """What AutoConfig.from_pretrained makes of a folder's config.json, from the dict; None when it cannot."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    except (KeyError, ValueError, TypeError):
        return None


def _load_folder(folder: Path, device: str):
    from transformers import AutoModelForCausalLM

    # device_map: straight onto the device, as lm-eval's hf model loads it (no full copy in host memory first)
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map={"": device}).eval()


def _load_weights(weights: ModelWeights, device: str, checkpoint_name: str):
    """from_pretrained with a state dict whose tensors are read from the shards only when transformers asks."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.models.auto.auto_factory import _get_model_class

    from watcher.load_check import LoadReport, failure_text

    config = transformers_config(weights.config)
    if config is None:
        raise PrepareError(f"{checkpoint_name}: config.json has no model_type this transformers "
                           f"({transformers.__version__}) can build")  # fmt: skip
    lock = threading.Lock()  # transformers reads from a thread pool; a WeightSource is not thread-safe
    state = {name: _ShardTensor(weights, name, spec, lock) for name, spec in weights.specs().items()}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its "newly initialized" report: we fail with our own line
    # The class AutoModelForCausalLM picks for this config (the Auto class itself wants a path to look in).
    model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    try:
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype="auto",
                                                  device_map={"": device}, output_loading_info=True)  # fmt: skip
    finally:
        transformers.logging.set_verbosity(verbosity)
    report = LoadReport(type(model).__name__, tuple(sorted(info["missing_keys"])),
                        tuple(sorted(info["unexpected_keys"])),
                        tuple(sorted(str(entry) for entry in info["mismatched_keys"])))  # fmt: skip
    if not report.ok:
        raise PrepareError(f"{checkpoint_name}: {failure_text(report)}")
    generation = next((f for f in weights.model_folders if (f / "generation_config.json").is_file()), None)
    if generation is not None and model.can_generate():  # as from_pretrained reads it from a folder
        model.generation_config = GenerationConfig.from_pretrained(generation)
    return model.eval()


class _ShardTensor:
    """One tensor of a sharded checkpoint, read when transformers' loader indexes it (`tensor[...]`), as it does a
    safetensors slice: a copy in host memory only until it is moved to the device."""

    def __init__(self, weights: ModelWeights, name: str, spec: TensorSpec, lock: threading.Lock):
        self.weights, self.name, self.spec, self.lock = weights, name, spec, lock

    @property
    def shape(self):
        import torch

        return torch.Size(self.spec.shape)

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.spec.dtype)

    def get_shape(self) -> list[int]:
        return list(self.spec.shape)

    def __getitem__(self, index):
        import torch

        source_spec = self.weights.source.specs()[self.name]
        raw = torch.empty(source_spec.nbytes, dtype=torch.uint8)
        if source_spec.nbytes:
            with self.lock:
                try:
                    self.weights.source.read(self.name, memoryview(raw.numpy()))
                except MergeError as exc:
                    raise PrepareError(str(exc)) from None
        tensor = raw.view(getattr(torch, source_spec.dtype)).reshape(source_spec.shape)
        if tensor.dtype != self.dtype:  # the merge's cast (merge.writer.output_dtype), if it was asked for one
            tensor = tensor.to(self.dtype)
        return tensor[index]
