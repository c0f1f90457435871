"""The outbox: a sink that is down keeps its results pending (in the journal), retried with backoff; others go on."""

from pathlib import Path

import pytest

from watcher.journal import Journal
from watcher.outbox import FIRST_RETRY, Outbox
from watcher.sinks import SinkUnavailable


class FlakySink:
    def __init__(self, name, failures):
        self.name, self.failures, self.batches = name, list(failures), []

    def deliver(self, records):
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append([r["result_id"] for r in records])

    def close(self):
        pass


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def _commit(journal, step):
    ckpt = journal.add_checkpoint(f"checkpoint-{step}", step, Path(f"/x/checkpoint-{step}"), "fp", "hf", ("regular",))
    journal.ensure_jobs(ckpt, ("regular",), "smoke")
    job = [j for j in journal.jobs("smoke") if j.checkpoint.step == step][0]
    journal.start(job.id)
    assert journal.finish(job.id, {"result_id": f"r{step}", "status": "ok", "metrics": {}, "error": None})


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
