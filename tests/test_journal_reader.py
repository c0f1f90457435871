"""The read-only journal (`JournalReader`): what status and the tests read, and that it never writes."""

import sqlite3
from pathlib import Path

import pytest

from watcher.journal import Journal, JournalReader
from watcher.records import Result


def _result(job, status="ok") -> Result:
    return Result(result_id=f"r{job.id}", step=job.checkpoint.step, checkpoint=job.checkpoint.name,
                  variant=job.variant, preset=job.preset, status=status, metrics={"t/acc": 0.5}, walltime_s=1.5)  # fmt: skip


@pytest.fixture
def written(tmp_path) -> Path:
    """A journal with two checkpoints (one re-saved), a done, a failed and a pending job, one delivery."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    for name, step, fingerprint in (("checkpoint-10", 10, "a"), ("checkpoint-20", 20, "b"), ("checkpoint-20", 20, "c")):
        checkpoint = journal.add_checkpoint(name, step, Path("/x") / name, fingerprint, "hf", ["regular"])
        journal.ensure_jobs((checkpoint, v, "smoke") for v in ["regular"])
    first, _, third = journal.jobs("smoke")
    for job, status in ((first, "ok"), (third, "failed")):
        journal.start(job)
        assert journal.finish(job.id, _result(job, status))
    journal.mark_delivered(f"r{first.id}", "files")
    journal.set_meta("sinks", ["files", "wandb"])
    journal.close()
    return path


def test_reads_jobs_checkpoints_results_and_deliveries(written):
    with JournalReader(written) as reader, reader.snapshot():
        jobs = reader.jobs()
        assert [(j.checkpoint.name, j.checkpoint.generation, str(j.state)) for j in jobs] == [
            ("checkpoint-10", 1, "done"), ("checkpoint-20", 1, "gone"), ("checkpoint-20", 2, "failed")]  # fmt: skip
        assert all(j.created_at > 0 for j in jobs) and jobs[0].started_at <= jobs[0].finished_at
        assert [j.checkpoint.name for j in reader.jobs(states=["failed"])] == ["checkpoint-20"]
        assert reader.jobs(preset="other") == []
        checkpoints = reader.checkpoints()
        assert [(c.name, c.generation, c.gone) for c in checkpoints] == [
            ("checkpoint-10", 1, False), ("checkpoint-20", 1, True), ("checkpoint-20", 2, False)]  # fmt: skip
        assert all(c.completed_at > 0 for c in checkpoints) and checkpoints[1].gone_at >= checkpoints[1].completed_at
        results = reader.results()
        assert [(type(r), r.status, r.walltime_s) for r in results] == [(Result, "ok", 1.5), (Result, "failed", 1.5)]
        assert {job_id: r.result_id for job_id, r in reader.latest_results().items()} == {
            jobs[0].id: f"r{jobs[0].id}", jobs[2].id: f"r{jobs[2].id}"}  # fmt: skip
        assert reader.delivered_to() == {f"r{jobs[0].id}": {"files"}}
        assert (reader.undelivered_count("files"), reader.undelivered_count("wandb")) == (1, 2)
        assert reader.meta("sinks") == ["files", "wandb"] and reader.meta("resources") is None


def test_never_creates_or_changes_a_journal(written, tmp_path):
    missing = tmp_path / "nothing" / "journal.sqlite"
    with pytest.raises(FileNotFoundError):
        JournalReader(missing)
    assert not missing.parent.exists()
    before = written.read_bytes()
    with JournalReader(written) as reader:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._db.execute("DELETE FROM jobs")
    assert written.read_bytes() == before


def test_a_journal_without_tables_reads_as_empty(tmp_path):
    """The moment after the daemon created the file, before its schema (and old journals' missing tables)."""
    path = tmp_path / "journal.sqlite"
    sqlite3.connect(path).close()
    with JournalReader(path) as reader:
        assert (reader.jobs(), reader.checkpoints(), reader.results(), reader.latest_results()) == ([], [], [], {})
        assert (reader.delivered_to(), reader.undelivered_count("files"), reader.meta("sinks")) == ({}, 0, None)
