"""Alert rules and early stop (watcher/alerts.py): crafted result sequences through a real journal, the stop
request answered by a real Trainer, and a daemon that fires a rule into an offline W&B run."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import ckpt_watch, read_journal, with_steps
from watcher.alerts import ALERTS_FILE, Alerts, read_alerts
from watcher.config import AlertRule, build_config
from watcher.integrations.sentinel import STOP_REQUEST, read_stop_request, stop_requested
from watcher.journal import Journal, JournalReader
from watcher.records import JobState, Result, iso_time
from watcher.sinks.wandb_files import alert_records, find_local_runs

ACC = "smoke_mc/acc"


def rule(**values) -> AlertRule:
    """A rule as the configuration checks it (its default name included)."""
    return build_config({"output_dir": "/nowhere", "alerts": [{"metric": ACC, **values}]}, {}).alerts[0]


class Run:
    """A real journal and the run's Alerts, fed results as the daemon commits them."""

    def __init__(self, root: Path, *rules: AlertRule, metric: str = ACC):
        self.root, self.rules, self.metric = root, list(rules), metric
        self.output, self.results = root / "output", root / "output" / "ckpt-watch"
        self.results.mkdir(parents=True, exist_ok=True)
        self.open()

    def open(self) -> None:
        self.journal = Journal(self.results / "journal.sqlite")
        self.alerts = Alerts(self.journal, self.output, self.results, lambda: self.rules)
        self.alerts.write_file()  # as WatchedRun.start_up does

    def commit(self, step: int, value: float | None = None, *, nonfinite: str | None = None, ok: bool = True,
               preset: str = "smoke", variant: str = "regular") -> Result:  # fmt: skip
        """Journal checkpoint-`step` (if new), run one job of it and commit its result, then tell the alerts."""
        name = f"checkpoint-{step}"
        checkpoint = self.journal.latest_checkpoint(name) or self.journal.add_checkpoint(
            name, step, self.output / name, "fp", "hf", ("regular", "ema"))
        self.journal.ensure_jobs([(checkpoint, variant, preset)])
        [job] = [j for j in self.journal.jobs(preset, [JobState.PENDING]) if j.checkpoint.id == checkpoint.id
                 and j.variant == variant]  # fmt: skip
        job = self.journal.start(job)
        result = Result(result_id=uuid.uuid4().hex, step=step, checkpoint=name, variant=variant, preset=preset,
                        status="ok" if ok else "failed",
                        metrics={self.metric: value} if value is not None else {"x": 1.0},
                        nonfinite={self.metric: nonfinite} if nonfinite else {}, generation=checkpoint.generation,
                        finished_at=iso_time(time.time()))  # fmt: skip
        assert self.journal.finish(job.id, result)
        self.alerts.result_recorded(result)
        return result

    def fired(self) -> list[str]:
        """The checkpoints fired for, in firing order (the journal), checked against alerts.jsonl."""
        journaled = [(a.rule, a.checkpoint) for a in self.journal.alerts.all()]
        assert [(a["rule"], a["checkpoint"]) for a in read_alerts(self.results)] == journaled
        return [checkpoint for _, checkpoint in journaled]


# --- each condition, on a crafted sequence ------------------------------------------------------------------------

SEQUENCES = [
    # rule, the results in arrival order (step, value), where it fires
    (dict(below=0.5), [(10, 0.6), (20, 0.4), (30, 0.7)], ["checkpoint-20"]),
    (dict(above=2.0, metric="loss"), [(10, 1.0), (20, 2.5), (30, 0.9)], ["checkpoint-20"]),
    (dict(drop_from_best=0.1), [(10, 0.5), (20, 0.6), (30, 0.52), (40, 0.45)], ["checkpoint-40"]),
    (dict(drop_from_best="10%"), [(10, 0.5), (20, 0.6), (30, 0.55), (40, 0.5)], ["checkpoint-40"]),
    (dict(drop_from_best=1.0, mode="min", metric="loss"), [(10, 3.0), (20, 2.0), (30, 2.5), (40, 3.1)],
     ["checkpoint-40"]),
    (dict(below=0.5, consecutive=2), [(10, 0.4), (20, 0.6), (30, 0.4), (40, 0.3)], ["checkpoint-40"]),
    # out of order: 30's drop shows once 10 (the best) arrives; consecutive windows close from either side
    (dict(drop_from_best=0.1), [(30, 0.45), (20, 0.58), (10, 0.6)], ["checkpoint-30"]),
    (dict(below=0.5, consecutive=2), [(40, 0.3), (10, 0.6), (30, 0.4)], ["checkpoint-40"]),
]


@pytest.mark.parametrize("values, arrivals, fires", SEQUENCES)
def test_a_rule_fires_once_where_its_condition_holds(tmp_path, values, arrivals, fires):
    metric = values.pop("metric", ACC)
    run = Run(tmp_path, rule(**values, metric=metric), metric=metric)
    for step, value in arrivals:
        run.commit(step, value)
    assert run.fired() == fires
    for step, value in arrivals:  # the same results again (another preset's jobs): nothing fires twice
        run.commit(step, value, preset="again")
    assert run.fired() == fires


def test_nan_fires_for_a_nonfinite_report_not_for_a_missing_metric_or_a_failed_job(tmp_path):
    run = Run(tmp_path, rule(nan=True))
    run.commit(10, 0.5)
    run.commit(20, nonfinite="nan")
    run.commit(30)  # reports another metric only: not NaN
    run.commit(40, ok=False)  # failed: no metrics at all
    run.commit(50, 0.4)
    assert run.fired() == ["checkpoint-20"]
    [alert] = read_alerts(run.results)
    assert alert["value"] is None and alert["message"] == f"{ACC} at checkpoint-20 is nan [{ACC} nan]"


def test_a_restart_fires_nothing_again_and_rewrites_a_cut_alerts_file(tmp_path):
    run = Run(tmp_path, rule(below=0.5), rule(above=0.55, name="too good"))
    run.commit(10, 0.6)
    run.commit(20, 0.4)
    assert run.fired() == ["checkpoint-10", "checkpoint-20"]
    lines = (run.results / ALERTS_FILE).read_text()
    run.journal.close()
    (run.results / ALERTS_FILE).write_text(lines.splitlines()[0][:-5])  # a torn write of an older version
    run.open()
    assert (run.results / ALERTS_FILE).read_text() == lines
    for result in run.journal.results():  # results delivered again after the restart
        run.alerts.result_recorded(result)
    run.commit(20, 0.4, preset="again")
    assert run.fired() == ["checkpoint-10", "checkpoint-20"] and len(lines.splitlines()) == 2
    with JournalReader(run.results / "journal.sqlite") as reader:
        assert [(a.rule, a.step) for a in reader.alerts()] == [("too good", 10), (f"{ACC} below 0.5", 20)]


def test_stop_request_is_written_and_stale_ones_are_ignored(tmp_path):
    run = Run(tmp_path, rule(drop_from_best="20%", stop_training=True, name="regression"))
    before = time.time()
    run.commit(10, 0.5)
    assert read_stop_request(run.output) is None
    run.commit(20, 0.3)
    request = json.loads((run.output / STOP_REQUEST).read_text())
    assert {k: v for k, v in request.items() if k != "requested_at"} == {
        "format": 1, "rule": "regression", "metric": ACC, "variant": "regular", "step": 20, "value": 0.3,
        "reason": f"{ACC} at checkpoint-20 is 0.3, down 0.2 (40.0%) from the best so far, 0.5 at checkpoint-10 "
                  "[regression]"}  # fmt: skip
    assert stop_requested(run.output, since=before) == request
    assert stop_requested(run.output, since=time.time()) is None  # a training that began after it


def test_a_rule_whose_direction_is_unknown_is_said_once_and_nothing_breaks(tmp_path, caplog):
    run = Run(tmp_path, AlertRule(name="params", metric="params/total", drop_from_best=1.0), metric="params/total")
    caplog.set_level(logging.WARNING, logger="ckpt-watch")
    for step in (10, 20):
        run.commit(step, 50.0 - step)
    assert [r.getMessage() for r in caplog.records] == [
        "alert rule 'params' is not evaluated: cannot tell whether higher or lower params/total is better: give "
        "mode = \"max\" or \"min\""]  # fmt: skip
    assert run.fired() == []


def test_an_unwritable_results_dir_loses_no_firing(tmp_path, caplog):
    run = Run(tmp_path, rule(below=0.5))
    (run.results / ALERTS_FILE).mkdir()  # cannot be written as a file
    run.commit(10, 0.4)
    assert [a.checkpoint for a in run.journal.alerts.all()] == ["checkpoint-10"]
    assert any("could not write" in r.getMessage() for r in caplog.records)
    (run.results / ALERTS_FILE).rmdir()
    run.journal.close()
    run.open()  # the next start writes it from the journal
    assert run.fired() == ["checkpoint-10"]


# --- the real Trainer answers the stop request --------------------------------------------------------------------


def _train(output: Path, max_steps: int, callbacks=()) -> None:
    from watcher.integrations.hf import CkptWatchCallback
    from watcher.tiny import train_tiny

    train_tiny(output, max_steps=max_steps, save_steps=5, callbacks=[CkptWatchCallback(), *callbacks])


def _steps(output: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))


def test_the_trainer_stops_at_the_next_save_after_a_stop_request(tmp_path, caplog):
    from transformers import TrainerCallback

    output = tmp_path / "output"

    class DaemonFiresAfterSave5(TrainerCallback):
        """After save 5 (our callback has read nothing), the daemon's code path fires a stop rule."""

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 5:
                run = Run(tmp_path / "daemon", rule(below=0.5, stop_training=True))
                run.output = run.alerts.output_dir = output
                run.commit(5, 0.4)

    caplog.set_level(logging.INFO)
    _train(output, 40, [DaemonFiresAfterSave5()])
    assert _steps(output) == [5, 10]  # stopped right after save 10: no later checkpoint
    state = json.loads((output / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    stops = [r.getMessage() for r in caplog.records if "stopping training" in r.getMessage()]
    assert stops == [f"ckpt-watch: stopping training after step 10 (checkpoint saved), as the daemon asks: {ACC} "
                     f"at checkpoint-5 is 0.4, below 0.5 [{ACC} below 0.5]"]  # fmt: skip


def test_a_stale_stop_request_does_not_stop_a_resumed_training(tmp_path, caplog):
    output = tmp_path / "output"
    run = Run(tmp_path / "daemon", rule(below=0.5, stop_training=True))
    run.output = run.alerts.output_dir = output
    run.commit(5, 0.4)  # before this training begins
    caplog.set_level(logging.INFO)
    _train(output, 15)
    assert _steps(output) == [5, 10, 15]
    ignored = [r.getMessage() for r in caplog.records if "ignoring the stop request" in r.getMessage()]
    assert len(ignored) == 1, ignored


# --- end to end: the daemon fires into alerts.jsonl, the journal, the stop file and an offline W&B run ---------


def test_the_daemon_fires_a_rule_into_wandb_alerts_jsonl_journal_and_the_stop_file(trainer_output, tmp_path):
    output = with_steps(trainer_output, tmp_path / "output", [10, 20, 30])
    script = tmp_path / "acc.py"
    script.write_text("import json, sys\nprint(json.dumps({'smoke_mc': {'acc': {'10': 0.6, '20': 0.3, "
                      "'30': float('nan')}"
                      "[sys.argv[1]]}}))\n")  # fmt: skip
    config = tmp_path / "c.toml"
    config.write_text(f'wandb = "ckpt-watch-test/run42"\ntensorboard = "off"\npreset = "acc"\n'
                      f'[presets.acc]\n[[presets.acc.evaluators]]\nbackend = "command"\n'
                      f'command = ["{sys.executable}", "{script}", "{{step}}"]\n'
                      f'[[alerts]]\nname = "acc regressed"\nmetric = "{ACC}"\ndrop_from_best = "20%"\n'
                      f'stop_training = true\n'
                      f'[[alerts]]\nname = "diverged"\nmetric = "{ACC}"\nnan = true\n')  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    scan = ckpt_watch(output, "--scan", "--config", config, env=env)
    assert scan.returncode == 0, scan.stderr
    message = (f"{ACC} at checkpoint-20 is 0.3, down 0.3 (50.0%) from the best so far, 0.6 at checkpoint-10 "
               "[acc regressed]")  # fmt: skip
    assert f"alert: {message} (asking training to stop)" in scan.stderr
    # The NaN goes through the job's outcome file and the journal (strict JSON) as a non-finite report.
    [alert, nan] = read_alerts(output / "ckpt-watch")
    assert alert["message"] == message and alert["step"] == 20 and alert["best"]["checkpoint"] == "checkpoint-10"
    assert nan["message"] == f"{ACC} at checkpoint-30 is nan [diverged]" and nan["value"] is None
    assert read_stop_request(output)["reason"] == message
    assert read_journal(output, lambda r: [(a.rule, a.checkpoint) for a in r.alerts()], []) == \
        [("acc regressed", "checkpoint-20"), ("diverged", "checkpoint-30")]  # fmt: skip
    # W&B waits for training to end (defer); `sync` is a person saying it has: results and the alert go together.
    sync = ckpt_watch("sync", output, "--config", config, env=env)
    assert sync.returncode == 0, sync.stderr
    [run] = find_local_runs(output / "ckpt-watch" / "wandb")
    assert list(alert_records(run.log)) == [
        {"title": "ckpt-watch: checkpoint-20: acc regressed", "text": message, "level": "ERROR"},
        {"title": "ckpt-watch: checkpoint-30: diverged", "text": nan["message"], "level": "WARN"}]
    assert read_journal(output, JournalReader.alert_deliveries, {}) == {1: {"wandb": "delivered"},
                                                                        2: {"wandb": "delivered"}}  # fmt: skip
    again = ckpt_watch("sync", output, "--config", config, env=env)  # nothing is sent twice
    assert again.returncode == 0 and len(find_local_runs(output / "ckpt-watch" / "wandb")) == 1


def test_an_alert_in_flight_at_a_crash_is_not_sent_twice(tmp_path, monkeypatch):
    """The delivery child wrote the alert into the offline run, then the daemon died before noting it: the
    next delivery finds it there and sends only what is new."""
    from watcher.outbox import Outbox
    from watcher.sinks.wandb_run import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = Run(tmp_path, rule(below=0.5))
    result = run.commit(10, 0.4)
    sink = WandbSink("proj/run42", "defer", run.output, run.results, force=True)  # as `ckpt-watch sync` has it
    [alert] = run.journal.alerts.undelivered("wandb")
    run.journal.mark_in_flight([result.result_id], "wandb")  # what the outbox notes before the child runs
    run.journal.alerts.mark([alert.id], "wandb", "in_flight")
    sink.deliver([result], [alert])  # the child's work; the daemon is killed before it notes the delivery
    run.commit(20, 0.3)
    Outbox(run.journal, [sink]).deliver_pending()
    titles = [a["title"] for r in find_local_runs(run.results / "wandb") for a in alert_records(r.log)]
    assert sorted(titles) == ["ckpt-watch: checkpoint-10: smoke_mc/acc below 0.5",
                              "ckpt-watch: checkpoint-20: smoke_mc/acc below 0.5"]  # fmt: skip
    assert run.journal.alerts.undelivered("wandb") == [] and run.journal.undelivered("wandb") == []


TWO_RANKS = """
import os
from transformers import TrainerCallback
from watcher.integrations.hf import CkptWatchCallback
from watcher.integrations.sentinel import write_stop_request
from watcher.tiny import train_tiny

class RequestAfterSave5(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 5 and state.is_world_process_zero:
            write_stop_request(args.output_dir, rule="r", metric="m", variant="regular", step=5, value=0.1,
                               reason="test")

    def on_train_end(self, args, state, control, **kwargs):
        print(f"RANK {{os.environ['RANK']}} ENDED AT {{state.global_step}}", flush=True)  # one write: no interleaving

train_tiny({out!r}, max_steps=40, save_steps=5, callbacks=[CkptWatchCallback(), RequestAfterSave5()])
"""


def test_every_rank_stops_at_the_same_save(tmp_path):
    """torchrun, 2 CPU ranks: rank 0 reads the request and broadcasts its answer; both end after save 10 (a rank
    that went on would wait in the next step's all-reduce forever)."""
    import re
    import subprocess

    output = tmp_path / "output"
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(out=str(output)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(re.findall(r"RANK (\d) ENDED AT (\d+)", done.stdout)) == [("0", "10"), ("1", "10")], done.stdout
    assert _steps(output) == [5, 10]
