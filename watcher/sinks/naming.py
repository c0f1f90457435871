"""How a result's metrics are named on the training run's step axis, the same in W&B and TensorBoard.

    eval/<task>/<metric>        the regular weights
    eval_ema/<task>/<metric>    the EMA weights

so both curves sit next to the trainer's own `train/*` and `eval/*` on `train/global_step`. Our flat names are
already "task/metric" (watcher/evaluators); probes are "params/total", "routing/gini", ... .
"""

from __future__ import annotations

import math
from watcher.records import Result

STEP_KEY = "train/global_step"  # the HF Trainer's own x-axis (transformers' WandbCallback defines it)
PREFIXES = {"regular": "eval", "ema": "eval_ema"}


def prefix_of(variant: str) -> str:
    return PREFIXES.get(variant, f"eval_{variant}")


def metric_row(result: Result) -> dict[str, float]:
    """The named metrics of one ok result; {} for a failed one (a failure has no point on a curve)."""
    if not result.ok:
        return {}
    prefix = prefix_of(result.variant)
    return {f"{prefix}/{name}": float(value) for name, value in sorted(result.metrics.items())
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}  # fmt: skip
