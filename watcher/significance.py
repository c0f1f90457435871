"""Is a difference between two checkpoints' values real or noise: the two-sided z-test on their standard errors.

    z = (b - a) / sqrt(se_a^2 + se_b^2),   p = P(|Z| >= |z|) = erfc(|z| / sqrt(2)) for a standard normal Z

A difference is significant at `level` when p < level. Used by `ckpt-watch compare` (every metric of two results)
and by the regression flag of `status` and the live view (watcher/regressions.py).

Where a standard error comes from (`standard_error`):
  - lm-eval's own `<metric>_stderr` (`task/acc_stderr`, `task/exact_match_stderr@filter`): its standard error of
    the mean score over the task's questions (analytic for a mean of 0/1 scores, bootstrapped for the others);
  - a measurement repeated in trials (the `inference` probe with `trials = N`): its `<metric>_stderr`, which the
    probe writes as stdev / sqrt(N); or, for a result that has only `<metric>_stdev` and `<group>/trials`
    (another tool's), the same stdev / sqrt(trials) computed here.

Assumptions, and what they mean for the answer:
  - the two values are independent estimates, each normally distributed about its true value (the mean over a
    few hundred questions, or over a few trials of a timing, is close enough to normal for a yes/no at 5 %);
  - two checkpoints evaluated on the *same* questions are in fact positively correlated (a hard question is hard
    for both), so the standard error of the difference is smaller than sqrt(se_a^2 + se_b^2): the test is
    conservative. A difference it calls significant is; some real differences it calls noise (a paired test
    over per-question scores would find them, but results keep only the means);
  - one test per metric, no correction for testing many metrics at once: at level 0.05, about one metric in 20
    that did not change is still called significant.

A leaf: the standard library's math only (math.erfc gives the normal tail exactly; no scipy needed), and the
metric-name rules of watcher/metrics.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from watcher.metrics import stderr_name, stdev_name, trials_name

DEFAULT_LEVEL = 0.05


@dataclass(frozen=True)
class ZTest:
    """The two-sided z-test of b - a."""

    z: float
    p: float
    stderr: float  # the standard error of the difference, sqrt(se_a^2 + se_b^2)

    def significant(self, level: float = DEFAULT_LEVEL) -> bool:
        return significant(self.p, level)


def z_test(a: float, se_a: float | None, b: float, se_b: float | None) -> ZTest | None:
    """The test of b - a; None when it cannot be made: a standard error missing, negative or not finite, or both
    zero (no noise estimate at all: a zero from lm-eval means every question scored the same, not certainty)."""
    if not (_usable(se_a) and _usable(se_b)):
        return None
    stderr = math.sqrt(se_a**2 + se_b**2)
    if stderr == 0.0:
        return None
    z = (b - a) / stderr
    return ZTest(z=z, p=math.erfc(abs(z) / math.sqrt(2.0)), stderr=stderr)


def significant(p: float, level: float = DEFAULT_LEVEL) -> bool:
    """p < level: the difference is unlikely (below `level`) to come from noise alone."""
    return p < level


def check_level(level: float) -> float:
    """`level` itself; ValueError unless 0 < level <= 0.5 (above 0.5 more than half of pure noise is "real")."""
    if not (isinstance(level, (int, float)) and 0.0 < level <= 0.5):
        raise ValueError(f"the significance level must be in (0, 0.5], got {level!r}")
    return float(level)


def standard_error(metrics: Mapping[str, float], metric: str) -> float | None:
    """`metric`'s standard error in one result's metrics: its `_stderr`, else `_stdev` / sqrt(trials) of a
    repeated measurement (at least 2 trials); None when it has neither."""
    stderr = metrics.get(stderr_name(metric))
    if _usable(stderr):
        return float(stderr)
    stdev, trials = metrics.get(stdev_name(metric)), metrics.get(trials_name(metric))
    if _usable(stdev) and _usable(trials) and trials >= 2:
        return float(stdev) / math.sqrt(trials)
    return None


def _usable(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
