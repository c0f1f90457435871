"""watcher/standings.py: each checkpoint's value of a metric and the ranking, on crafted results."""

import math

import pytest

from watcher.records import Result
from watcher.standings import best, ranked, resolve_mode, values_of

ACC = "smoke_mc/acc"


def result(step, value, *, variant="regular", ok=True, generation=1, finished="2026-01-01T00:00:00.000", **metrics):
    return Result(result_id=f"{step}-{generation}-{finished}", step=step, checkpoint=f"checkpoint-{step}",
                  variant=variant, preset="smoke", status="ok" if ok else "failed",
                  metrics={ACC: value, **metrics} if value is not None else metrics,
                  generation=generation, finished_at=finished)  # fmt: skip


def test_newest_successful_result_per_checkpoint_counts():
    results = [result(10, 0.5), result(10, 0.7, generation=2), result(10, 0.9, generation=2, ok=False),
               result(20, 0.6, finished="2026-01-01T00:00:01.000"), result(20, 0.4, finished="2026-01-01T00:00:02.000"),
               result(30, math.nan), result(40, None), result(50, 0.99, variant="ema")]  # fmt: skip
    assert [(s.step, s.value) for s in values_of(results, ACC)] == [(10, 0.7), (20, 0.4)]
    assert [(s.step, s.value) for s in values_of(results, ACC, "ema")] == [(50, 0.99)]


def test_ranking_by_mode_with_ties_to_the_earlier_step():
    results = [result(30, 0.6), result(10, 0.6), result(20, 0.8), result(40, 0.1)]
    assert [s.step for s in ranked(results, ACC, "max")] == [20, 10, 30, 40]
    assert [s.step for s in ranked(results, ACC, "min")] == [40, 10, 30, 20]
    assert best(results, ACC, "max").step == 20
    assert best(results, ACC, "max", before_step=20).step == 10
    assert best(results, ACC, "max", before_step=10) is None


def test_stderr_comes_with_the_value():
    [standing] = values_of([result(10, 0.5, **{"smoke_mc/acc_stderr": 0.05})], ACC)
    assert standing.stderr == 0.05


def test_auto_mode_from_the_metric_name_or_lm_eval():
    assert resolve_mode("auto", ACC) == "max"
    assert resolve_mode("auto", "perplexity/wikitext/perplexity") == "min"
    declared = result(10, 0.5)
    declared.raw["lm_eval"] = {"higher_is_better": {"smoke_mc": {"acc": False}}}
    assert resolve_mode("auto", ACC, [declared]) == "min"
    with pytest.raises(ValueError, match="give mode"):
        resolve_mode("auto", "params/total")
    with pytest.raises(ValueError, match="mode must be"):
        resolve_mode("best", ACC)
