"""Routing statistics of mixture-of-experts models: how evenly each layer's router spreads tokens over its experts.

The statistics are pure functions of one layer's `counts` vector (counts[e] = how many (token, slot) routing
decisions chose expert e; with top-k routing each token makes k decisions, so sum(counts) = k * tokens):

    gini          G = sum_i sum_j |c_i - c_j| / (2 n^2 mean(c)), n = number of experts. 0 when every expert
                  gets the same number of tokens, 1 - 1/n when one expert gets them all ([4, 0, 0, 0] -> 0.75)
    cv            coefficient of variation: population standard deviation / mean (ddof = 0)
    utilisation   fraction of experts that received at least one token
    max_share     max(c) / sum(c); min_share: min(c) / sum(c)

An empty counts vector (no tokens at all) gives 0 for every statistic rather than NaN: metrics must be finite.

`RouterRecorder` collects the counts from a loaded `transformers` model with forward hooks on its router modules.
torch is imported only inside it, so the pure functions stay importable anywhere.
"""

from __future__ import annotations

import re
from typing import Any, Sequence


def gini(counts: Sequence[float]) -> float:
    n, total = len(counts), float(sum(counts))
    if n == 0 or total == 0:
        return 0.0
    # The pairwise formula as written: n is the number of experts (at most a few hundred), so n^2 is cheap.
    mean = total / n
    return sum(abs(a - b) for a in counts for b in counts) / (2 * n * n * mean)


def coefficient_of_variation(counts: Sequence[float]) -> float:
    n, total = len(counts), float(sum(counts))
    if n == 0 or total == 0:
        return 0.0
    mean = total / n
    variance = sum((c - mean) ** 2 for c in counts) / n
    return variance**0.5 / mean


def utilisation(counts: Sequence[float]) -> float:
    return sum(1 for c in counts if c > 0) / len(counts) if counts else 0.0


def layer_statistics(counts: Sequence[float]) -> dict[str, float]:
    """The per-layer summary metrics of one counts vector (names without the `routing/layer_N/` prefix)."""
    total = float(sum(counts))
    return {
        "gini": gini(counts),
        "cv": coefficient_of_variation(counts),
        "utilisation": utilisation(counts),
        "max_share": max(counts) / total if total else 0.0,
        "min_share": min(counts) / total if total else 0.0,
    }


def routing_metrics(counts_by_layer: dict[int, Sequence[float]], tokens: int) -> dict[str, float]:
    """Per-layer statistics and their unweighted mean over the MoE layers.

    The aggregate is the mean over layers, not the statistic of counts pooled over layers: expert 3 of layer 0
    and expert 3 of layer 5 are unrelated, so pooling would let one layer's imbalance cancel another's.
    """
    metrics: dict[str, float] = {}
    per_layer = {layer: layer_statistics(counts) for layer, counts in sorted(counts_by_layer.items())}
    for layer, stats in per_layer.items():
        metrics.update({f"routing/layer_{layer}/{name}": value for name, value in stats.items()})
    if per_layer:
        for name in ("gini", "cv", "utilisation"):
            metrics[f"routing/{name}"] = sum(s[name] for s in per_layer.values()) / len(per_layer)
        metrics["routing/layers"] = float(len(per_layer))
        metrics["routing/tokens"] = float(tokens)
    return metrics


def router_modules(lm) -> list[tuple[str, Any]]:
    """(name, module) of every router in a loaded `transformers` model, in module order.

    transformers 5 declares, on each MoE model class, the module whose output `output_router_logits=True`
    records (`_can_record_outputs["router_logits"]`: Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE's `...TopKRouter`, ...).
    Using that declaration finds routers without a list of architectures of our own.
    """
    targets = []
    for module in lm.modules():
        declared = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        for entry in declared if isinstance(declared, (list, tuple)) else [declared] if declared else []:
            target = getattr(entry, "target_class", entry)  # an OutputRecorder, a class, or a class name
            targets.append((target, getattr(entry, "layer_name", None)))

    def is_router(name: str, module) -> bool:
        for target, layer_name in targets:
            matches = type(module).__name__ == target if isinstance(target, str) else isinstance(module, target)
            if matches and (layer_name is None or name.endswith(layer_name)):
                return True
        return False

    return [(name, module) for name, module in lm.named_modules() if targets and is_router(name, module)]


def layer_number(module_name: str, fallback: int) -> int:
    """The decoder layer a router belongs to: the first number in its path (`model.layers.2.mlp.gate` -> 2)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_name)
    return int(found.group(1)) if found else fallback


class RouterRecorder:
    """Counts, per router, how many routing decisions chose each expert, while the model runs forward passes.

    Why forward hooks on the router modules rather than `output_router_logits=True`: that option returns the
    logits only, so the top-k choice would have to be redone here, and it differs from what the model did
    wherever the router adds more than a softmax top-k (DeepSeek-V3/GLM-4-MoE's bias-corrected, group-limited
    choice, for one). transformers 5's routers return (logits, weights, chosen expert indices), so the hook
    reads the model's own decision: the integer tensor of the output. A router that returns no indices falls
    back to the top-k of its first float output (k = the router's `top_k`, else config.num_experts_per_tok):
    Llama 4's router, for one, returns (scores, logits).
    """

    def __init__(self, lm, top_k: int | None):
        self.top_k = top_k
        self.routers = router_modules(lm)
        names = [name for name, _ in self.routers]
        layers = [layer_number(name, index) for index, name in enumerate(names)]
        # Two routers in one layer (unusual) would collide: number them in module order instead.
        self.layers = layers if len(set(layers)) == len(layers) else list(range(len(names)))
        self.names = dict(zip(self.layers, names))
        self.counts: dict[int, list[int]] = {}
        self._handles: list = []

    def __enter__(self) -> "RouterRecorder":
        for layer, (_, module) in zip(self.layers, self.routers):
            self._handles.append(module.register_forward_hook(self._hook_for(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, layer: int):
        def hook(module, args, output):
            chosen, num_experts = chosen_experts(output, getattr(module, "top_k", None) or self.top_k)
            counts = self.counts.setdefault(layer, [0] * num_experts)
            for expert, count in enumerate(chosen_counts(chosen, num_experts)):
                counts[expert] += count

        return hook


def chosen_experts(output, top_k: int | None):
    """(chosen expert indices [tokens, k], number of experts) from one router output."""
    import torch

    parts = output if isinstance(output, (tuple, list)) else (output,)
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    floats = [t for t in tensors if t.is_floating_point()]
    num_experts = floats[0].shape[-1]  # every router's first float output is [tokens, num_experts]
    indices = [t for t in tensors if not t.is_floating_point() and t.dtype != torch.bool]
    if indices:
        return indices[-1], num_experts
    if not top_k:
        raise ValueError("the router returned no expert indices and the config has no num_experts_per_tok")
    return floats[0].topk(top_k, dim=-1).indices, num_experts


def chosen_counts(chosen, num_experts: int) -> list[int]:
    import torch

    return torch.bincount(chosen.reshape(-1).long().cpu(), minlength=num_experts).tolist()
