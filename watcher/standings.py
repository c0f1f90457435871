"""Where each checkpoint stands on one metric: its value, and the checkpoints ranked best first.

Pure functions over results (journal rows or results.jsonl, the same `Result` records): the one place that says
which value of a metric a checkpoint has and which checkpoint is best, for best-checkpoint retention
(`keep_best`), the alert rules (`drop_from_best`), `ckpt-watch best`, and the regression flag of `status`.

A checkpoint's value is the metric in its newest successful result of the variant: the highest generation (a
re-save of the same folder is a new generation) and, within it, the last to finish. Failed results, and values
that are not finite numbers, never count. Ties rank the earlier step first: the checkpoint that was best first
stays best, so a plateau does not churn the kept set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from watcher.metrics import higher_is_better, stderr_name
from watcher.records import Result

MODES = ("max", "min", "auto")


@dataclass(frozen=True)
class Standing:
    """One checkpoint's value of one metric, and the result it comes from."""

    step: int
    checkpoint: str  # the folder name, e.g. checkpoint-500
    checkpoint_path: str  # where it was evaluated from
    generation: int
    value: float
    stderr: float | None  # the metric's standard error in the same result (lm-eval's `_stderr`), when it has one
    result: Result


def values_of(results: Iterable[Result], metric: str, variant: str = "regular") -> list[Standing]:
    """Each checkpoint's value of `metric` (newest successful result of `variant` that has it), by step."""
    standings = []
    for result in newest_results(results, variant, lambda r: _finite(r.metrics.get(metric))).values():
        stderr = result.metrics.get(stderr_name(metric))
        standings.append(Standing(step=result.step, checkpoint=result.checkpoint,
                                  checkpoint_path=result.checkpoint_path, generation=result.generation,
                                  value=float(result.metrics[metric]),
                                  stderr=float(stderr) if _finite(stderr) else None, result=result))  # fmt: skip
    return sorted(standings, key=lambda s: (s.step, s.checkpoint))


def newest_results(results: Iterable[Result], variant: str, counts: Callable[[Result], bool]) -> dict[str, Result]:
    """checkpoint name -> its newest successful result of `variant` among those `counts` accepts: the highest
    generation, then the last to finish (the rule of the module docstring)."""
    newest: dict[str, Result] = {}
    for result in results:
        if result.variant != variant or not result.ok or not counts(result):
            continue
        known = newest.get(result.checkpoint)
        if known is None or (result.generation, result.finished_at) >= (known.generation, known.finished_at):
            newest[result.checkpoint] = result
    return newest


def resolve_mode(mode: str, metric: str, results: Iterable[Result] = ()) -> str:
    """"max" or "min". `auto` asks watcher/metrics.py (lm-eval's own higher_is_better in a result's raw output
    first, then the metric's name); ValueError when neither says."""
    if mode in ("max", "min"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    raw = next((r.raw for r in results if metric in r.metrics), None)
    direction = higher_is_better(metric, raw)
    if direction is None:
        raise ValueError(f"cannot tell whether higher or lower {metric} is better: give mode = \"max\" or \"min\"")
    return "max" if direction else "min"


def ranked(results: Iterable[Result], metric: str, mode: str, variant: str = "regular") -> list[Standing]:
    """Every checkpoint with a value of `metric`, best first (`mode` "max" or "min"; ties: earlier step first)."""
    sign = -1.0 if mode == "max" else 1.0
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min here, got {mode!r}")
    return sorted(values_of(results, metric, variant), key=lambda s: (sign * s.value, s.step, s.checkpoint))


def best(results: Iterable[Result], metric: str, mode: str, variant: str = "regular",
         before_step: int | None = None) -> Standing | None:  # fmt: skip
    """The best checkpoint by `metric`; with `before_step`, among the checkpoints of earlier steps only (the best
    so far when that step's result arrived)."""
    candidates = [s.result for s in values_of(results, metric, variant)
                  if before_step is None or s.step < before_step]  # fmt: skip
    top = ranked(candidates, metric, mode, variant)
    return top[0] if top else None


def better(a: float, b: float, mode: str) -> bool:
    """Is `a` strictly better than `b`?"""
    return a > b if mode == "max" else a < b


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
