"""What ckpt-watch knows about metric names: their group, which direction is better, and the headline few.

Groups: accuracy, perplexity, routing, inference and cost. Whether higher or lower is better comes from lm-eval's
own `higher_is_better` in the result's raw output where it has one, else from the metric's name.

Headline metrics (`ckpt-watch status`, `plot`'s default, the daemon's done line and the live view), chosen from
the metric names the results have:
  - per task of the accuracy and perplexity groups, one metric: the first present of acc, exact_match, f1,
    perplexity, word_perplexity (filter suffixes `@...` ignored), else the first, by name, whose better direction
    is known (higher before lower); `_stderr`, `_stdev` and `trials` metrics (`is_spread`) never; at most 4
    tasks, by name;
  - then routing/cv (MoE load imbalance) and params/active, when present.

A leaf: used by the daemon and the command line alike, it imports nothing from ckpt-watch.
"""

from __future__ import annotations

from typing import Any, Iterable

GROUPS = ("accuracy", "perplexity", "routing", "inference", "cost")
# Names of language-modelling metrics (lower is better), grouped apart from accuracy.
_PERPLEXITY = ("perplexity", "bits_per_byte", "nll", "loss")
_LOWER = ("perplexity", "bits_per_byte", "nll", "loss", "latency", "_mb", "gini", "coefficient_of_variation", "cv")
_HIGHER = ("acc", "exact_match", "f1", "bleu", "rouge", "mcc", "tokens_per_s", "utilisation", "utilization", "score")


def group_of(metric: str) -> str:
    head = metric.split("/", 1)[0]
    if head == "routing":
        return "routing"
    if head == "inference":
        return "inference"
    if head in ("params", "flops"):
        return "cost"
    if any(key in metric.rpartition("/")[2] for key in _PERPLEXITY):
        return "perplexity"
    return "accuracy"


def higher_is_better(metric: str, raw: dict[str, Any] | None = None) -> bool | None:
    """True/False when known, None for metrics with no direction (counts, sizes of the model). `raw` is a result's
    raw backend output (Result.raw): lm-eval's own `higher_is_better` there wins over the metric's name."""
    task, _, name = metric.rpartition("/")
    name = name.split("@", 1)[0]
    declared = ((raw or {}).get("lm_eval", {}).get("higher_is_better", {}) or {}).get(task, {})
    if name in declared:
        return bool(declared[name])
    if group_of(metric) == "cost" or is_spread(metric) or name == "tokens":
        return None
    if any(key in name for key in _LOWER):
        return False
    if any(key in name for key in _HIGHER):
        return True
    return None


def stderr_name(metric: str) -> str:
    """The name of `metric`'s standard error as lm-eval reports it: `task/acc@filter` -> `task/acc_stderr@filter`."""
    return _suffixed(metric, "_stderr")


def stdev_name(metric: str) -> str:
    """The name of the standard deviation over the trials of a repeated measurement (the `inference` probe with
    `trials = N`): `inference/latency_s` -> `inference/latency_s_stdev`."""
    return _suffixed(metric, "_stdev")


def trials_name(metric: str) -> str:
    """How many trials a repeated measurement of `metric` took: `inference/latency_s` -> `inference/trials`."""
    task = metric.rpartition("/")[0]
    return f"{task}/trials" if task else "trials"


def is_spread(metric: str) -> bool:
    """A metric's standard error or standard deviation, or a count of trials: about another metric's noise, never
    a headline, no better direction."""
    name = metric.rpartition("/")[2].split("@", 1)[0]
    return name.endswith(SPREAD_SUFFIXES) or name == "trials"


SPREAD_SUFFIXES = ("_stderr", "_stdev")


def _suffixed(metric: str, suffix: str) -> str:
    task, _, name = metric.rpartition("/")
    base, at, filter_name = name.partition("@")
    return f"{task}/{base}{suffix}{at}{filter_name}" if task else f"{base}{suffix}{at}{filter_name}"


PREFERRED = ("acc", "exact_match", "f1", "perplexity", "word_perplexity")
MAX_TASKS = 4
EXTRA_HEADLINES = ("routing/cv", "params/active")


def headline_metrics(names: Iterable[str], fallback: int = 0) -> list[str]:
    """The headline metrics among `names`, in display order (the rule is in the module docstring); when none
    is one, the first `fallback` names (standard errors left out) so that a custom metric still shows."""
    names = set(names)
    by_task: dict[str, list[str]] = {}
    for name in sorted(names):
        if group_of(name) not in ("accuracy", "perplexity") or is_spread(name) or higher_is_better(name) is None:
            continue
        by_task.setdefault(name.rpartition("/")[0], []).append(name)

    def rank(name: str) -> tuple:
        base = name.rpartition("/")[2].split("@", 1)[0]
        preferred = PREFERRED.index(base) if base in PREFERRED else len(PREFERRED)
        return preferred, not higher_is_better(name), name

    chosen = [min(candidates, key=rank) for _, candidates in sorted(by_task.items())[:MAX_TASKS]]
    return (chosen + [name for name in EXTRA_HEADLINES if name in names]
            or sorted(name for name in names if not is_spread(name))[:fallback])
