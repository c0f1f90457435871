"""Built-in probes: cheap measurements of a model folder that need no benchmark data.

For now one probe, `parameters`: the parameter count and weight bytes, read from the safetensors headers
alone (no weights are loaded, so it takes milliseconds for any model size). More probes (active parameters
for MoE, FLOPs per token, perplexity, inference speed, routing statistics) belong here too.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise EvaluatorError(f"probes need safetensors weights; none found in {model_dir}")


def count_parameters(model_dir: Path) -> dict[str, float]:
    total = 0
    size = 0
    for path in weight_files(model_dir):
        for info in safetensors_header(path).values():
            count = math.prod(info["shape"])
            total += count
            size += count * _DTYPE_BYTES.get(info["dtype"], 0)
    return {"params/total": float(total), "params/bytes": float(size)}


_PROBES = {"parameters": count_parameters}


class ProbesBackend:
    name = "probes"

    def check_options(self, options: dict[str, Any]) -> None:
        unknown_keys = set(options) - {"probes"}
        if unknown_keys:
            raise EvaluatorError(f"unknown probes option(s): {', '.join(sorted(unknown_keys))}; known: probes")
        names = options.get("probes", ["parameters"])
        unknown = [n for n in names if n not in _PROBES]
        if unknown:
            raise EvaluatorError(f"unknown probe {unknown[0]!r}; known probes: {', '.join(sorted(_PROBES))}")

    def run(
        self, model_dir: Path, device: str, options: dict[str, Any], workdir: Path, context: JobContext | None = None
    ) -> EvalOutput:
        self.check_options(options)
        names = options.get("probes", ["parameters"])
        metrics: dict[str, float] = {}
        for name in names:
            metrics.update(_PROBES[name](Path(model_dir)))
        return EvalOutput(metrics=metrics, raw={"probes": names}, versions={})
