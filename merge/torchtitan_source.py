"""torchtitan's native parameter names and layouts -> Hugging Face's, with torchtitan's own state-dict adapters.

A native torchtitan checkpoint (`step-N/`, a DCP directory) holds the model under torchtitan's names
(`tok_embeddings.weight`, `layers.0.attention.qkv_linear.wq.weight`, ...) and, for Llama, with the q/k rows in
the order its rotary embedding wants, not Hugging Face's. Loading those into a transformers model silently leaves
every weight "newly initialized". `TorchtitanSource` wraps the checkpoint's `WeightSource` and presents it under
Hugging Face names, converting each tensor with the very adapter torchtitan uses for its own Hugging Face export
(`StateDictAdapter.to_hf`), so the result is what `last_save_in_hf` would have written, bit for bit.

The plan is learned from metadata alone: every native tensor is passed through `to_hf` by itself as a meta tensor
(no memory); what maps one-to-one (Llama: everything) is then converted one tensor at a time when read. Tensors
that produce nothing alone (an adapter that needs several inputs at once, such as MoE experts in some families)
are planned in groups per layer and converted together; one that produces nothing even then is dropped by the
adapter on purpose (the tied `lm_head.weight`), and the prepare stage's load check reports anything really lost.

torchtitan is an optional dependency (`pip install 'ckpt-watch[torchtitan]'`); without it a torchtitan checkpoint
is a clear MergeError naming what to install.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from merge.source import MergeError, TensorSpec, WeightSource

INSTALL_HINT = "pip install 'ckpt-watch[torchtitan]'"

# torchtitan's own top-level parameter names (torchtitan/models/*/model.py); Hugging Face models never use them.
_TORCHTITAN_NAME = re.compile(
    r"^(tok_embeddings\.weight|output\.weight|norm\.weight|"
    r"layers\.\d+\.(attention|feed_forward|moe|attention_norm|ffn_norm)\.)"
)
_LAYER = re.compile(r"^layers\.(\d+)\.")


def looks_like_torchtitan(names) -> bool:
    """Most of these tensor names are torchtitan's native ones."""
    names = list(names)
    return bool(names) and sum(bool(_TORCHTITAN_NAME.match(n)) for n in names) * 2 >= len(names)


@dataclass(frozen=True)
class Family:
    """How to get torchtitan's adapter for one Hugging Face `model_type`."""

    adapter: str  # "module:Class" of torchtitan's state-dict adapter
    model_config: Callable[[dict], Any]  # Hugging Face config.json (a dict) -> torchtitan's model config


def _llama3_config(hf: dict) -> Any:
    # torchtitan builds its model configs in code (flavors such as "8B"); the adapter needs only the attention
    # shape and weight tying from it, so the config is built with torchtitan's own layer builder from config.json.
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import Llama3Model
    from torchtitan.models.llama3 import _build_llama3_layers as build_layers

    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    return Llama3Model.Config(
        dim=dim,
        vocab_size=hf["vocab_size"],
        tok_embeddings=Embedding.Config(num_embeddings=hf["vocab_size"], embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim),
        lm_head=Linear.Config(in_features=dim, out_features=hf["vocab_size"]),
        layers=build_layers(n_layers=hf["num_hidden_layers"], dim=dim, n_heads=heads,
                            n_kv_heads=hf.get("num_key_value_heads") or heads, hidden_dim=hf["intermediate_size"],
                            rope=ComplexRoPE.Config(dim=head_dim, max_seq_len=hf.get("max_position_embeddings", 2048),
                                                    theta=float(hf.get("rope_theta", 10000.0))),
                            attn_backend="flex"),  # fmt: skip
        enable_weight_tying=bool(hf.get("tie_word_embeddings", False)),
    )


def _qwen3_config(hf: dict) -> Any:
    # As for Llama: torchtitan's own Qwen3 layer builders (dense, or MoE when config.json has experts).
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.qwen3 import Qwen3Model
    from torchtitan.models.qwen3 import _build_qwen3_layers as build_dense
    from torchtitan.models.qwen3 import _build_qwen3_moe_layers as build_moe
    from torchtitan.models.qwen3 import _qwen3_norm as norm

    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    common = dict(n_layers=hf["num_hidden_layers"], dim=dim, n_heads=heads, head_dim=head_dim,
                  n_kv_heads=hf.get("num_key_value_heads") or heads, attn_backend="flex",
                  rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=hf.get("max_position_embeddings", 2048),
                                         theta=float(hf.get("rope_theta", 1000000.0))))  # fmt: skip
    experts = hf.get("num_experts") or hf.get("num_local_experts")  # transformers 5 renamed it
    if experts:
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise MergeError("torchtitan's Qwen3-MoE has experts in every layer; config.json has dense layers "
                             "(mlp_only_layers / decoder_sparse_step): not the model these weights come from")
        layers = build_moe(moe_hidden_dim=hf["moe_intermediate_size"], num_experts=experts,
                           top_k=hf["num_experts_per_tok"], moe_comm_backend="standard", **common)  # fmt: skip
    else:
        layers = build_dense(hidden_dim=hf["intermediate_size"], **common)
    return Qwen3Model.Config(
        vocab_size=hf["vocab_size"],
        dim=dim,
        norm=norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=hf["vocab_size"], embedding_dim=dim),
        lm_head=Linear.Config(in_features=dim, out_features=hf["vocab_size"]),
        layers=layers,
        enable_weight_tying=bool(hf.get("tie_word_embeddings", False)),
    )


_QWEN3_ADAPTER = "torchtitan.models.qwen3.state_dict_adapter:Qwen3StateDictAdapter"
FAMILIES: dict[str, Family] = {
    "llama": Family("torchtitan.models.llama3.state_dict_adapter:Llama3StateDictAdapter", _llama3_config),
    "qwen3": Family(_QWEN3_ADAPTER, _qwen3_config),
    "qwen3_moe": Family(_QWEN3_ADAPTER, _qwen3_config),
}


def build_adapter(hf_config: dict) -> Any:
    """torchtitan's state-dict adapter for this model, or a MergeError saying what is missing."""
    model_type = hf_config.get("model_type", "?")
    family = FAMILIES.get(model_type)
    if family is None:
        raise MergeError(f"torchtitan names, model_type {model_type!r}: no torchtitan state-dict adapter is wired "
                         f"up for it yet (known: {', '.join(sorted(FAMILIES))})")  # fmt: skip
    module_name, class_name = family.adapter.split(":")
    try:
        adapter_class = getattr(importlib.import_module(module_name), class_name)
        model_config = family.model_config(hf_config)
    except ImportError as exc:
        raise MergeError(f"the checkpoint has torchtitan's parameter names; mapping them to Hugging Face names needs "
                         f"torchtitan ({exc.name or exc} is not importable): {INSTALL_HINT}") from None  # fmt: skip
    return adapter_class(model_config, None)


class TorchtitanSource:
    """`inner`'s tensors under Hugging Face names and layouts, converted by torchtitan's adapter on read."""

    def __init__(self, inner: WeightSource, hf_config: dict, adapter: Any = None):
        import torch

        self.inner = inner
        self.adapter = adapter if adapter is not None else build_adapter(hf_config)
        native = inner.specs()
        self._inputs: dict[str, tuple[str, ...]] = {}  # Hugging Face name -> the native tensors it is made from
        self._outputs: dict[tuple[str, ...], int] = {}  # native group -> how many Hugging Face tensors it gives
        self._specs: dict[str, TensorSpec] = {}
        self._cache: tuple[tuple[str, ...], dict[str, Any]] | None = None  # the last group converted

        def plan(group: tuple[str, ...]) -> bool:
            meta = {n: torch.empty(native[n].shape, dtype=getattr(torch, native[n].dtype), device="meta") for n in group}
            produced = self.adapter.to_hf(meta)
            self._outputs[group] = len(produced)
            for name, tensor in produced.items():
                self._inputs[name] = group
                self._specs[name] = TensorSpec(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            return bool(produced)

        alone = [name for name in native if not plan((name,))]
        groups: dict[str, list[str]] = {}
        for name in alone:
            match = _LAYER.match(name)
            groups.setdefault(match[1] if match else "", []).append(name)
        for members in groups.values():
            if len(members) > 1:
                plan(tuple(members))

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str, out: memoryview) -> None:
        import torch

        group = self._inputs[name]
        if self._cache is None or self._cache[0] != group:
            native = self.inner.specs()
            tensors = {}
            for member in group:
                spec = native[member]
                buffer = bytearray(spec.nbytes)
                if spec.nbytes:
                    self.inner.read(member, memoryview(buffer))
                tensors[member] = torch.frombuffer(buffer, dtype=getattr(torch, spec.dtype)).reshape(spec.shape) \
                    if spec.nbytes else torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))  # fmt: skip
            self._cache = (group, self.adapter.to_hf(tensors))
        tensor = self._cache[1][name].contiguous()
        if len(out):
            out[:] = memoryview(tensor.view(torch.uint8).reshape(-1).numpy())
        if self._outputs[group] == 1:
            self._cache = None  # one-to-one: nothing to reuse, keep memory at one tensor

    def byte_ranges(self, name: str) -> None:
        return None  # converted by the adapter on `read`: not bytes on disk

    def close(self) -> None:
        pass  # `inner` belongs to the caller, which closes it
