"""Has a checkpoint regressed, significantly, against the best checkpoint before it? For `status` and the live view.

For each headline metric (watcher/metrics.headline_metrics) of a result: the best value among the checkpoints of
earlier steps (watcher/standings.best with before_step, the same variant and preset), and the two-sided z-test of
the difference (watcher/significance.py, at REGRESSION_LEVEL). A regression is flagged when the checkpoint's value
is worse than that best and the difference is significant.

Only metrics whose standard error both results carry (lm-eval's `_stderr`, or a probe repeated in trials) can be
flagged: without one there is no telling a regression from noise, and no flag is raised (a drop by value alone is
what `[[alerts]]` rules with `drop_from_best` are for). Metrics with no known better direction are skipped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any, Iterable, Sequence

from watcher.records import Result
from watcher.significance import standard_error, z_test
from watcher.standings import better, resolve_mode, values_of

REGRESSION_LEVEL = 0.05


@dataclass(frozen=True)
class Regression:
    """A headline metric of one result, significantly worse than the best checkpoint before it."""

    metric: str
    best_step: int
    best_value: float
    value: float
    z: float
    p: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """ "▼ mc/acc 0.42 vs 0.55 at step 20 (z=-4.10, p=4.1e-05)" """
        return (f"▼ {self.metric} {self.value:.4g} vs {self.best_value:.4g} at step {self.best_step} "
                f"(z={self.z:.2f}, p={self.p:.2g})")


def find_regressions(results: Sequence[Result], metrics: Iterable[str],
                     level: float = REGRESSION_LEVEL) -> dict[str, list[Regression]]:  # fmt: skip
    """Each successful result's significant regressions on `metrics`, by result_id (results without any are
    absent). The best before a step is standings.best(..., before_step=step) among the results of the same
    variant and preset; computed here in one pass per (variant, preset, metric), a running best over the steps,
    so that status and the live view stay cheap on a long run."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.variant, result.preset), []).append(result)
    found: dict[str, list[Regression]] = {}
    for (variant, _), group in groups.items():
        for metric in metrics:
            try:
                mode = resolve_mode("auto", metric, group)
            except ValueError:  # no better direction: nothing is a regression
                continue
            standings = values_of(group, metric, variant)  # by step
            if not standings:
                continue
            steps = [s.step for s in standings]
            best_before = list(accumulate(standings, lambda top, s: s if better(s.value, top.value, mode) else top))
            for result in group:
                value, stderr = result.metrics.get(metric), standard_error(result.metrics, metric)
                earlier = bisect_left(steps, result.step)  # standings of steps before this one
                if not result.ok or stderr is None or not earlier or not isinstance(value, (int, float)):
                    continue
                top = best_before[earlier - 1]
                if not better(top.value, value, mode):
                    continue
                test = z_test(top.value, standard_error(top.result.metrics, metric), value, stderr)
                if test is not None and test.significant(level):
                    found.setdefault(result.result_id, []).append(Regression(
                        metric=metric, best_step=top.step, best_value=top.value, value=float(value), z=test.z,
                        p=test.p))  # fmt: skip
    return found
