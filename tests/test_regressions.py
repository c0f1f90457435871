"""The regression flag of `status` and the live view (watcher/regressions.py), on a crafted journal.

mc/acc by step, with lm-eval-style standard errors; ppl/perplexity has none:
    10: 0.50 ± 0.01   ppl 20
    20: 0.60 ± 0.01   ppl 18   <- the best so far from here on
    30: 0.57 ± 0.02   ppl 17   worse than step 20, but z = -0.03 / 0.02236 = -1.342, p = 0.18: noise, no flag
    40: 0.52 ± 0.01   ppl 25   z = -0.08 / 0.01414 = -5.657, p = 1.5e-8: flagged; perplexity worse, no stderr: no flag
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import ckpt_watch
from watcher.journal import Journal
from watcher.records import Result
from watcher.regressions import find_regressions
from watcher.standings import best

ACC = {10: (0.50, 0.01), 20: (0.60, 0.01), 30: (0.57, 0.02), 40: (0.52, 0.01)}
PPL = {10: 20.0, 20: 18.0, 30: 17.0, 40: 25.0}
HEADLINES = ["mc/acc", "ppl/perplexity"]


def _metrics(step: int) -> dict[str, float]:
    acc, stderr = ACC[step]
    return {"mc/acc": acc, "mc/acc_stderr": stderr, "ppl/perplexity": PPL[step], "params/total": 1000.0}


@pytest.fixture
def output(tmp_path) -> Path:
    """A run's output dir whose journal has the four results above (preset quick) and one of another preset
    (full) whose step-40 value would be no regression of its own."""
    output = tmp_path / "output"
    journal = Journal(output / "ckpt-watch" / "journal.sqlite")
    for step in ACC:
        checkpoint = journal.add_checkpoint(f"checkpoint-{step}", step, output / f"checkpoint-{step}", str(step), "hf",
                                            ["regular"])  # fmt: skip
        journal.ensure_jobs([(checkpoint, "regular", "quick"), (checkpoint, "regular", "full")])
    for job in journal.jobs():
        journal.start(job)
        metrics = _metrics(job.checkpoint.step) if job.preset == "quick" else {"mc/acc": 0.9, "mc/acc_stderr": 0.01}
        journal.finish(job.id, Result(result_id=f"{job.preset}-{job.checkpoint.step}", step=job.checkpoint.step,
                                      checkpoint=job.checkpoint.name, variant="regular", preset=job.preset,
                                      status="ok", metrics=metrics, walltime_s=1.0))  # fmt: skip
    journal.set_meta("sinks", ["files"])
    for result in journal.results():
        journal.mark_delivered(result.result_id, "files")
    journal.close()
    return output


def test_only_the_significant_regression_is_flagged(output):
    results = Journal(output / "ckpt-watch" / "journal.sqlite").results()
    found = find_regressions(results, HEADLINES)
    assert list(found) == ["quick-40"]
    [flag] = found["quick-40"]
    assert (flag.metric, flag.best_step, flag.best_value, flag.value) == ("mc/acc", 20, 0.60, 0.52)
    assert flag.z == pytest.approx(-5.6569, abs=1e-4) and flag.p == pytest.approx(1.54e-8, rel=1e-2)
    # The best so far is standings.best's, before the step.
    quick = [r for r in results if r.preset == "quick"]
    assert best(quick, "mc/acc", "max", before_step=40).step == flag.best_step
    assert best(quick, "mc/acc", "max", before_step=30).step == 20  # step 30 was worse, but within the noise


def test_status_flags_it_in_the_table_and_in_json(output):
    run = ckpt_watch("status", output, "--json", timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {(r["step"], r["preset"]): r for r in json.loads(run.stdout)}
    flagged = rows[40, "quick"]["regression"]
    assert {k: flagged[k] for k in ("metric", "best_step", "best_value", "value")} == {
        "metric": "mc/acc", "best_step": 20, "best_value": 0.60, "value": 0.52}  # fmt: skip
    assert flagged["z"] == pytest.approx(-5.6569, abs=1e-4) and flagged["p"] < 1e-7
    assert rows[40, "quick"]["regressions"] == [flagged]
    assert [key for key, row in rows.items() if row["regression"]] == [(40, "quick")]

    table = ckpt_watch("status", output, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert [line for line in lines if "▼" in line and line.startswith("│")] == [
        next(line for line in lines if line.startswith("│ checkpoint-40") and "quick" in line)]  # fmt: skip
    assert "0.52 ▼" in next(line for line in lines if line.startswith("│ checkpoint-40") and "quick" in line)
    assert "checkpoint-40 regular quick: ▼ mc/acc 0.52 vs 0.6 at step 20 (z=-5.66, p=1.5e-08)" in lines
    assert sum("significantly worse than the best earlier checkpoint" in line for line in lines) == 1


def test_the_live_view_flags_it(output):
    from rich.console import Console

    from watcher.live_view import Snapshot, render
    from watcher.outbox import Outbox
    from watcher.sinks import FileSink
    from watcher.view_feed import ViewFeed

    journal = Journal(output / "ckpt-watch" / "journal.sqlite")
    feed = ViewFeed(journal)
    header = Snapshot(str(output), "scan", "quick", "all", "cpu")
    outbox = Outbox(journal, [FileSink(output / "ckpt-watch")])
    snapshot = feed.snapshot(header, [], outbox)
    quick = {row.step: row for row in snapshot.results if row.preset == "quick"}
    assert [step for step, row in quick.items() if row.regressions] == [40]
    assert list(quick[40].regressions) == ["mc/acc"]
    console = Console(width=250, record=True)
    console.print(render(snapshot, now=100.0))
    text = console.export_text()
    flagged = [line for line in text.splitlines() if "▼" in line]
    assert len(flagged) == 1 and re.match(r"│ +40 │ regular │ quick ", flagged[0]), text
    assert "0.52 ▼" in flagged[0] and "▼ mc/acc 0.52 vs 0.6 at step 20 (z=-5.66, p=1.5e-08)" in flagged[0], text

    # A newer, better result is no regression; the flags are found again once a result is added.
    feed.add(Result(result_id="quick-50", step=50, checkpoint="checkpoint-50", variant="regular", preset="quick",
                    status="ok", metrics={**_metrics(40), "mc/acc": 0.7}))  # fmt: skip
    again = feed.snapshot(header, [], outbox)
    assert [row.step for row in again.results if row.regressions] == [40]
    # 0.60 ± 0.01 after step 50's 0.70 ± 0.01: z = -7.07, a regression against step 50 now.
    feed.add(Result(result_id="quick-60", step=60, checkpoint="checkpoint-60", variant="regular", preset="quick",
                    status="ok", metrics={**_metrics(40), "mc/acc": 0.6}))  # fmt: skip
    latest = {row.step: row for row in feed.snapshot(header, [], outbox).results if row.regressions}
    assert sorted(latest) == [40, 60] and "at step 50" in latest[60].regressions["mc/acc"]
    journal.close()
