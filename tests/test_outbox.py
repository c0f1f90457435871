"""The outbox: a sink that is down keeps its results pending (in the journal), retried with backoff; others go on."""

from pathlib import Path

import pytest

from watcher.journal import Journal
from watcher.outbox import FIRST_RETRY, Outbox
from watcher.records import Result
from watcher.sinks import SinkBase, SinkUnavailable


class FlakySink(SinkBase):
    def __init__(self, name, failures):
        self.name, self.failures, self.batches = name, list(failures), []

    def deliver(self, records):
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append([r.result_id for r in records])


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def _commit(journal, step):
    ckpt = journal.add_checkpoint(f"checkpoint-{step}", step, Path(f"/x/checkpoint-{step}"), "fp", "hf", ("regular",))
    journal.ensure_jobs((ckpt, v, "smoke") for v in ("regular",))
    job = [j for j in journal.jobs("smoke") if j.checkpoint.step == step][0]
    journal.start(job)
    assert journal.finish(job.id, Result(result_id=f"r{step}", step=step, checkpoint=f"checkpoint-{step}",
                                         variant="regular", preset="smoke", status="ok"))  # fmt: skip


def test_a_down_sink_keeps_results_pending_with_backoff_and_others_go_on(journal, caplog):
    files = FlakySink("files", [])
    wandb = FlakySink("wandb", [SinkUnavailable("W&B unreachable"), SinkUnavailable("W&B unreachable"),
                                RuntimeError("bad key")])  # fmt: skip
    outbox = Outbox(journal, [files, wandb])
    _commit(journal, 10)
    assert outbox.deliver_pending() == {"files": 0, "wandb": 1}
    assert files.batches == [["r10"]] and wandb.batches == []
    assert FIRST_RETRY - 1 < outbox.next_attempt_in() <= FIRST_RETRY
    _commit(journal, 20)
    assert outbox.deliver_pending() == {"files": 0, "wandb": 2}  # within the backoff: wandb is not tried
    assert files.batches == [["r10"], ["r20"]] and len(wandb.failures) == 2
    assert outbox.deliver_pending(force=True) == {"files": 0, "wandb": 2}  # `sync`: tried now, still down
    assert 2 * FIRST_RETRY - 1 < outbox.next_attempt_in() <= 2 * FIRST_RETRY  # doubled
    assert caplog.text.count("W&B unreachable") == 1  # the same reason is logged once
    assert outbox.deliver_pending(force=True) == {"files": 0, "wandb": 2}  # any exception: pending, logged
    assert "RuntimeError: bad key" in caplog.text
    assert outbox.deliver_pending(force=True) == {"files": 0, "wandb": 0}
    assert wandb.batches == [["r10", "r20"]] and outbox.next_attempt_in() is None
    assert journal.undelivered("wandb") == []


def test_pending_results_survive_a_restart(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    _commit(journal, 10)
    Outbox(journal, [FlakySink("wandb", [SinkUnavailable("offline")])]).deliver_pending()
    journal.close()
    reopened = Journal(tmp_path / "journal.sqlite")
    sink = FlakySink("wandb", [])
    assert Outbox(reopened, [sink]).deliver_pending() == {"wandb": 0}
    assert sink.batches == [["r10"]]
    reopened.close()


class CheckedSink(FlakySink):
    """A sink whose target holds `held` already (as W&B or TensorBoard would answer after a crash)."""

    idempotent = False

    def __init__(self, name, failures, held=(), check_error=None):
        super().__init__(name, failures)
        self.held, self.check_error, self.asked = set(held), check_error, []

    def holds(self, records):
        self.asked.append([r.result_id for r in records])
        if self.check_error:
            raise self.check_error
        return {r.result_id for r in records} & self.held


def test_a_batch_left_in_flight_is_checked_against_the_target_before_it_is_sent_again(journal, caplog):
    caplog.set_level("INFO", logger="ckpt-watch")
    for step in (10, 20, 30):
        _commit(journal, step)
    journal.mark_in_flight(["r10", "r20"], "wandb")  # a previous daemon handed these over, then was killed
    down = CheckedSink("wandb", [], held={"r10"}, check_error=SinkUnavailable("W&B unreachable", nothing_sent=True))
    assert Outbox(journal, [down]).deliver_pending() == {"wandb": 3}
    assert down.asked == [["r10", "r20"]] and down.batches == []  # cannot ask: nothing is sent blind
    sink = CheckedSink("wandb", [], held={"r10"})
    assert Outbox(journal, [sink]).deliver_pending() == {"wandb": 0}
    assert sink.asked == [["r10", "r20"]]  # r30 was never in flight (the round that could not ask sent nothing)
    assert sink.batches == [["r20", "r30"]]  # r10 is there already: not sent again
    assert journal.undelivered("wandb") == [] and journal.in_flight("wandb") == set()
    assert "1 result(s) were already there" in caplog.text


def test_held_results_count_as_delivered_even_when_the_rest_fails(journal):
    for step in (10, 20):
        _commit(journal, step)
    journal.mark_in_flight(["r10", "r20"], "tensorboard")
    sink = CheckedSink("tensorboard", [OSError("disk full")], held={"r10"})
    assert Outbox(journal, [sink]).deliver_pending() == {"tensorboard": 2}  # counted before the round's outcome
    assert [r.result_id for r in journal.undelivered("tensorboard")] == ["r20"]
    assert journal.in_flight("tensorboard") == {"r20"}  # still in flight: checked again next time


def test_a_journal_of_an_older_version_gains_the_in_flight_table(tmp_path):
    import sqlite3

    from watcher.journal import _SCHEMA

    path = tmp_path / "journal.sqlite"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA.split("-- A batch handed to a sink")[0] + _SCHEMA.split("PRIMARY KEY (result_id, sink)\n);", 2)[2])
    old.close()
    assert "in_flight" not in {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    journal = Journal(path)
    _commit(journal, 10)
    sink = FlakySink("wandb", [])
    assert Outbox(journal, [sink]).deliver_pending() == {"wandb": 0} and sink.batches == [["r10"]]
    journal.close()


def test_a_refusal_before_sending_leaves_nothing_in_flight_a_failure_mid_batch_does(journal):
    _commit(journal, 10)
    waits = FlakySink("wandb", [SinkUnavailable("training still running", nothing_sent=True)])
    Outbox(journal, [waits]).deliver_pending()
    assert journal.in_flight("wandb") == set()  # nothing to check later: no W&B history scan at every retry
    broke = FlakySink("wandb", [SinkUnavailable("W&B: the delivery child was killed")])
    Outbox(journal, [broke]).deliver_pending()
    assert journal.in_flight("wandb") == {"r10"}  # it may have sent some rows: checked before the next try
