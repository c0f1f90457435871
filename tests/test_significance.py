"""watcher/significance.py: the two-sided z-test of a difference, and where a metric's standard error comes from."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from watcher.metrics import headline_metrics, higher_is_better, is_spread, stdev_name, trials_name
from watcher.significance import check_level, significant, standard_error, z_test


def test_known_z_score_and_p_value():
    # 0.50 ± 0.02 vs 0.56 ± 0.02: z = 0.06 / sqrt(0.0008) = 2.1213, two-sided p = 0.0339.
    test = z_test(0.50, 0.02, 0.56, 0.02)
    assert test.z == pytest.approx(2.1213, abs=1e-4) and test.p == pytest.approx(0.0339, abs=1e-4)
    assert test.stderr == pytest.approx(math.sqrt(0.0008))
    assert test.significant(0.05) and not test.significant(0.01)
    assert significant(test.p, 0.05) and not significant(test.p, 0.01)
    # The sign follows b - a; p does not.
    down = z_test(0.56, 0.02, 0.50, 0.02)
    assert down.z == pytest.approx(-2.1213, abs=1e-4) and down.p == test.p


@pytest.mark.parametrize("a, se_a, b, se_b", [(0.3, 0.01, 0.31, 0.02), (10.0, 1.0, 14.5, 1.5), (1.0, 0.0, 0.9, 0.05),
                                              (0.0, 3.0, 0.0, 4.0)])  # fmt: skip
def test_p_is_the_normal_two_sided_tail(a, se_a, b, se_b):
    test = z_test(a, se_a, b, se_b)
    z = (b - a) / math.hypot(se_a, se_b)
    assert test.z == pytest.approx(z) and test.p == pytest.approx(2 * (1 - NormalDist().cdf(abs(z))), abs=1e-12)


@pytest.mark.parametrize("se_a, se_b", [(None, 0.1), (0.1, None), (0.0, 0.0), (math.nan, 0.1), (-0.1, 0.1),
                                        (math.inf, 0.1)])  # fmt: skip
def test_no_test_without_two_usable_standard_errors(se_a, se_b):
    assert z_test(0.5, se_a, 0.6, se_b) is None


@pytest.mark.parametrize("level", [0.05, 0.5, 1e-6])
def test_level_in_range(level):
    assert check_level(level) == level


@pytest.mark.parametrize("level", [0, 0.51, 1, -0.05, math.nan, math.inf])
def test_level_out_of_range(level):
    with pytest.raises(ValueError, match=r"in \(0, 0.5\]"):
        check_level(level)


def test_standard_error_from_lm_eval_or_from_trials():
    assert standard_error({"t/acc": 0.5, "t/acc_stderr": 0.02}, "t/acc") == 0.02
    assert standard_error({"g/exact_match@strict": 0.5, "g/exact_match_stderr@strict": 0.01},
                          "g/exact_match@strict") == 0.01  # fmt: skip
    assert standard_error({"t/acc": 0.5}, "t/acc") is None
    # A repeated measurement with only its stdev and trial count (another tool's): stdev / sqrt(trials).
    timing = {"inference/latency_s": 0.2, "inference/latency_s_stdev": 0.03, "inference/trials": 9.0}
    assert standard_error(timing, "inference/latency_s") == pytest.approx(0.01)
    assert standard_error({**timing, "inference/trials": 1.0}, "inference/latency_s") is None  # no spread from one
    # The probe's own _stderr wins.
    assert standard_error({**timing, "inference/latency_s_stderr": 0.02}, "inference/latency_s") == 0.02


def test_spread_metrics_have_no_direction_and_are_never_headlines():
    assert (stdev_name("inference/latency_s"), trials_name("inference/latency_s")) == (
        "inference/latency_s_stdev", "inference/trials")  # fmt: skip
    names = ["inference/latency_s", "inference/latency_s_stdev", "inference/latency_s_stderr", "inference/tokens_per_s",
             "inference/tokens_per_s_stdev", "inference/tokens_per_s_stderr", "inference/trials"]  # fmt: skip
    assert [higher_is_better(n) for n in names] == [False, None, None, True, None, None, None]
    assert [is_spread(n) for n in names] == [False, True, True, False, True, True, True]
    assert headline_metrics(names) == [] and headline_metrics(names, fallback=9) == [
        "inference/latency_s", "inference/tokens_per_s"]  # fmt: skip
