"""The plugin contracts, checked the same way for every registered evaluator, sink and change feed.

A new backend or sink is registered by name (watcher/evaluators/__init__.py, watcher/sinks/__init__.py) and
gets a case below; `test_every_registered_*_has_a_case` fails until it does. The assertions are the same for
each: what a run or a delivery produces, how a failure is classified, idempotence or `holds` as declared.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from test_lmms_eval_backend import FIXTURE as LMMS_FIXTURE
from test_lmms_eval_backend import STANDIN as LMMS_STANDIN
from watcher.config import build_config
from watcher.evaluators import EvalOutput, EvaluatorError, get_evaluator, known_backends
from watcher.journal import Journal
from watcher.outbox import Outbox
from watcher.records import Result
from watcher.sinks import SinkPlace, build_sink, known_sinks
from watcher.watch import InotifyFeed, PollingFeed

# --- evaluators --------------------------------------------------------------------------------------------------

COMMAND_SCRIPT = """
import json, os, sys
with open(os.path.join(sys.argv[1], "config.json")) as handle:  # a missing model dir: "No such file or directory"
    config = json.load(handle)
print(json.dumps({"layers": config["num_hidden_layers"], "versions": {"contract_eval": "1"}}))
"""


def _command_options(tmp: Path) -> dict[str, Any]:
    script = tmp / "contract_eval.py"
    script.write_text(COMMAND_SCRIPT)
    return {"command": [sys.executable, str(script), "{model_dir}"]}


def _lmms_options(tmp: Path) -> dict[str, Any]:
    # lmms-eval's own interpreter is not in the test environment: the stand-in of tests/test_lmms_eval_backend.py
    # answers as lmms-eval 0.7.3 does (its results file is a real one), so the backend's side is what is checked.
    python = tmp / "standin python"
    python.write_text(LMMS_STANDIN.format(python=sys.executable, fixture=str(LMMS_FIXTURE)))
    python.chmod(0o755)
    return {"python": str(python), "tasks": ["ckpt_watch_tiny_vqa"]}


# backend -> its options for a real run on the tiny model (given a scratch folder for what they need)
EVALUATOR_CASES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "probes": lambda tmp: {"probes": ["parameters"]},
    "command": _command_options,
    "lm_eval": lambda tmp: {"tasks": ["ckpt_watch_smoke_mc"], "limit": 2, "batch_size": 2},
    "lmms_eval": _lmms_options,
}


def test_every_registered_evaluator_has_a_case():
    assert sorted(EVALUATOR_CASES) == known_backends()


@pytest.fixture(params=known_backends())
def evaluator_case(request, tmp_path):
    return request.param, EVALUATOR_CASES[request.param](tmp_path)


def test_an_unknown_option_is_rejected_up_front(evaluator_case):
    backend, options = evaluator_case
    evaluator = get_evaluator(backend)
    assert evaluator.name == backend
    evaluator.check_options(options)  # the case's own options are right
    with pytest.raises(EvaluatorError) as caught:
        evaluator.check_options({**options, "no_such_option": 1})
    assert "\n" not in str(caught.value)  # one line, for the user


def test_a_run_on_the_tiny_model_gives_finite_metrics_and_json_raw_output(evaluator_case, tiny_model_dir, tmp_path):
    backend, options = evaluator_case
    output = get_evaluator(backend).run(tiny_model_dir, ("cpu",), options, tmp_path / "work")
    assert isinstance(output, EvalOutput)
    assert output.metrics, f"{backend} measured nothing"
    for name, value in output.metrics.items():
        assert isinstance(name, str) and type(value) is float and math.isfinite(value), (name, value)
    json.dumps(output.raw, allow_nan=False)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in output.versions.items())


def test_a_backend_that_takes_the_loaded_model_measures_the_same_from_it(evaluator_case, tiny_model_dir, tmp_path):
    """`takes_loaded_model` is a bool; when True, a run given only the job's ModelInput (model_dir None) measures
    what a run on the folder measures, exactly."""
    from watcher.evaluators import JobContext
    from watcher.model_input import ModelInput

    backend, options = evaluator_case
    evaluator = get_evaluator(backend)
    takes = evaluator.takes_loaded_model(options, ("cpu",))
    assert type(takes) is bool
    if not takes:
        return
    model = ModelInput(tiny_model_dir.name, folder=tiny_model_dir)
    shared = evaluator.run(None, ("cpu",), options, tmp_path / "shared", JobContext(model=model))
    assert shared.metrics == evaluator.run(tiny_model_dir, ("cpu",), options, tmp_path / "folder").metrics


def test_a_missing_model_dir_is_a_permanent_failure(evaluator_case, tmp_path):
    """EvaluatorError is what the worker records as permanent (not retried): the model will not appear."""
    backend, options = evaluator_case
    with pytest.raises(EvaluatorError) as caught:
        get_evaluator(backend).run(tmp_path / "no-such-model", ("cpu",), options, tmp_path / "work")
    assert "\n" not in str(caught.value)


# --- sinks -------------------------------------------------------------------------------------------------------


def _results() -> list[Result]:
    """Two ok results (both variants, out of step order) and a failed one, as the journal commits them."""
    def result(step: int, variant: str, status: str = "ok") -> Result:
        metrics = {"arc/acc": step / 1000 + (0.5 if variant == "ema" else 0.0)} if status == "ok" else {}
        return Result(result_id=f"{step}-{variant}", step=step, checkpoint=f"checkpoint-{step}", variant=variant,
                      preset="smoke", status=status, metrics=metrics, error=None if status == "ok" else "boom",
                      finished_at="2026-11-21T15:04:05.123+00:00", progress={"train/epoch": step / 100})  # fmt: skip

    return [result(200, "regular"), result(100, "ema"), result(300, "regular", "failed")]


def _points(results: list[Result]) -> list[tuple]:
    """What a metrics target should hold: one (step, name, value) per metric of each ok result."""
    prefix = {"regular": "eval", "ema": "eval_ema"}
    return sorted((r.step, f"{prefix[r.variant]}/{k}", v) for r in results if r.ok for k, v in r.metrics.items())


def _files_target(root: Path) -> list[tuple]:
    from watcher.sinks import read_results

    records = read_results(root / "results")
    for record in records:  # the per-job record too, whole
        per_job = json.loads((root / "results" / record.checkpoint / record.variant / "smoke.json").read_text())
        assert per_job["result_id"] == record.result_id
    return sorted((r.step, r.variant, r.status) for r in records)


def _tensorboard_target(root: Path) -> list[tuple]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(root / "output" / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return sorted((e.step, tag, pytest.approx(e.value)) for tag in accumulator.Tags()["scalars"]
                  for e in accumulator.Scalars(tag))  # fmt: skip


def _wandb_target(root: Path) -> list[tuple]:
    from watcher.sinks.wandb_files import history_rows

    found = []
    for log in sorted((root / "results" / "wandb").glob("offline-run-*/run-run42.wandb")):
        for row in history_rows(log):
            found += [(row["train/global_step"], k, v) for k, v in row.items() if k.startswith("eval")]
    return sorted(found)


@dataclass(frozen=True)
class SinkCase:
    settings: dict[str, Any]  # the configuration that turns this sink on, pointing at `root`
    target: Callable[[Path], list[tuple]]  # what the sink's target holds, read back from it
    expected: Callable[[list[Result]], list[tuple]]


SINK_CASES: dict[str, SinkCase] = {
    "files": SinkCase({}, _files_target,  # idempotent: takes the batch twice
                      lambda rs: sorted((r.step, r.variant, r.status) for r in rs)),  # fmt: skip
    "tensorboard": SinkCase({"tensorboard": "tb"}, _tensorboard_target,  # under OUTPUT_DIR; read by TensorBoard
                            lambda rs: [(s, n, pytest.approx(v)) for s, n, v in _points(rs)]),  # fmt: skip
    # real wandb, offline: the offline run it writes under RESULTS_DIR/wandb is read back
    "wandb": SinkCase({"wandb": "proj/run42"}, _wandb_target, _points),
}


def test_every_registered_sink_has_a_case():
    assert sorted(SINK_CASES) == sorted(known_sinks())
    assert known_sinks()[0] == "files"  # the record is written before anything is delivered elsewhere


def _build(name: str, root: Path):
    settings = {"wandb": "off", "tensorboard": "off", **SINK_CASES[name].settings}
    config = build_config({}, {"output_dir": root / "output", **settings})
    (root / "output").mkdir(parents=True, exist_ok=True)
    return build_sink(name, config, SinkPlace(root / "output", root / "results", force=True))


@pytest.fixture(params=known_sinks())
def sink_case(request, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = _build(request.param, tmp_path)
    yield request.param, sink, SINK_CASES[request.param]
    sink.close()


def test_a_sink_declares_its_capabilities(sink_case):
    name, sink, _ = sink_case
    assert sink.name == name
    for capability in ("slow", "wait_for_idle", "idempotent"):
        assert isinstance(getattr(sink, capability), bool), capability
    assert callable(sink.deliver) and callable(sink.holds) and callable(sink.close)


def test_a_batch_lands_once_even_when_handed_over_again(sink_case, tmp_path):
    """Delivered, then handed over again as after a crash before the journal noted it: each result is in the
    target once. An idempotent sink takes the batch again; any other is asked what its target `holds`."""
    name, sink, case = sink_case
    batch = _results()
    if not sink.idempotent:
        assert sink.holds([r for r in batch if r.ok]) == set()  # nothing there yet
    sink.deliver(batch)
    assert case.target(tmp_path) == case.expected(batch)
    if sink.idempotent:
        sink.deliver(batch)
    else:
        assert sink.holds(batch) == {r.result_id for r in batch}  # a failed result holds trivially: no point
        journal = Journal(tmp_path / "journal.sqlite")
        try:  # the outbox's own path: the batch in flight when the daemon was killed
            for result in batch:
                ckpt = journal.add_checkpoint(result.checkpoint, result.step, tmp_path / result.checkpoint, "fp",
                                              "hf", (result.variant,))  # fmt: skip
                journal.ensure_jobs((ckpt, v, "smoke") for v in (result.variant,))
                job = next(j for j in journal.jobs("smoke") if j.checkpoint.step == result.step)
                journal.start(job)
                journal.finish(job.id, result)
            journal.mark_in_flight([r.result_id for r in batch], name)
            assert Outbox(journal, [sink]).deliver_pending(force=True) == {name: 0}
        finally:
            journal.close()
    assert case.target(tmp_path) == case.expected(batch)


# --- change feeds ------------------------------------------------------------------------------------------------

FEEDS = {
    "polling": lambda folder: PollingFeed(0.1),
    "inotify": lambda folder: InotifyFeed(folder, is_checkpoint=lambda name: name.startswith("checkpoint-")),
}


@pytest.fixture(params=sorted(FEEDS))
def feed(request, tmp_path):
    feed = FEEDS[request.param](tmp_path)
    assert feed.mode == request.param
    feed.start()
    yield feed
    feed.stop()


def test_a_feed_wakes_reports_changes_and_stops(feed, tmp_path):
    assert feed.overflowed() is False
    waker = threading.Timer(0.2, feed.wake)  # as a signal handler or another thread would
    waker.start()
    start = time.monotonic()
    assert feed.wait(60) == set()
    assert time.monotonic() - start < 30  # woken, not timed out
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "not-a-checkpoint").mkdir()
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while feed.mode == "inotify" and "checkpoint-5" not in seen and time.monotonic() < deadline:
        seen |= feed.wait(1)
    # inotify names what changed (and only checkpoints); polling names nothing: the loop re-lists the folder
    assert seen == ({"checkpoint-5"} if feed.mode == "inotify" else set())
