"""The file sink: per-job JSON plus results.jsonl, idempotent across crashes."""

import json
import shutil
from dataclasses import replace

from watcher.records import Result
from watcher.sinks import FileSink


def _record(rid, step=10):
    return Result(result_id=rid, step=step, checkpoint=f"checkpoint-{step}", variant="regular", preset="smoke",
                  status="ok", metrics={"t/acc": 0.5}, raw={"big": [1, 2, 3]})


def _lines(sink):
    return [json.loads(line) for line in sink.jsonl.read_text().splitlines()]


def test_delivering_twice_writes_one_line(tmp_path):
    sink = FileSink(tmp_path)
    sink.deliver([_record("a")])
    sink.deliver([_record("a")])  # crash after the append, before the journal noted the delivery
    sink.deliver([_record("b", 20)])
    assert [r["result_id"] for r in _lines(sink)] == ["a", "b"]
    assert "raw" not in _lines(sink)[0]  # raw backend output only in the per-job file
    per_job = json.loads((tmp_path / "checkpoint-10" / "regular" / "smoke.json").read_text())
    assert per_job["raw"] == {"big": [1, 2, 3]} and per_job["metrics"] == {"t/acc": 0.5}


def test_a_torn_last_line_is_replaced(tmp_path):
    sink = FileSink(tmp_path)
    sink.deliver([_record("a")])
    with open(sink.jsonl, "ab") as handle:
        handle.write(b'{"result_id": "b", "ste')  # crash mid-append
    sink.deliver([_record("b", 20)])
    assert [r["result_id"] for r in _lines(sink)] == ["a", "b"]


def test_a_complete_line_missing_its_newline_is_terminated(tmp_path):
    sink = FileSink(tmp_path)
    sink.jsonl.write_text(json.dumps({k: v for k, v in _record("a").to_dict().items() if k != "raw"}))
    sink.deliver([_record("a")])
    sink.deliver([_record("b", 20)])
    assert [r["result_id"] for r in _lines(sink)] == ["a", "b"]


def test_read_results_skips_a_torn_last_line(tmp_path):
    from watcher.sinks import read_results

    sink = FileSink(tmp_path)
    sink.deliver([_record("a")])
    with open(sink.jsonl, "ab") as handle:
        handle.write(b'{"result_id": "b", "ste')
    assert [r.result_id for r in read_results(tmp_path)] == ["a"]
    assert read_results(tmp_path / "nowhere") == []


FOREIGN = b'[]\nnull\n123\n"a note"\n'  # valid JSON, but not result records


def test_lines_that_are_not_result_records_are_skipped_with_one_warning(tmp_path, caplog):
    from watcher.sinks import read_results

    sink = FileSink(tmp_path)
    sink.jsonl.write_bytes(FOREIGN)
    sink.deliver([_record("a")])  # appended after them; they stay (someone else's lines)
    with open(sink.jsonl, "ab") as handle:
        handle.write(b"{}\nnot json at all\n[]")  # an unterminated `[]` last: whole JSON, so terminated
    sink.deliver([_record("b", 20)])
    sink.deliver([_record("b", 20)])  # idempotent as before
    caplog.clear()
    assert [r.result_id for r in read_results(tmp_path)] == ["a", "b"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 7 line(s)" in warnings[0].getMessage(), caplog.text
    assert sink.jsonl.read_bytes().startswith(FOREIGN)


def _scan_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('wandb = "off"\ntensorboard = "off"\n'
                      '[presets.params]\n[[presets.params.evaluators]]\nbackend = "probes"\n')  # fmt: skip
    return config


def test_a_scan_appends_after_foreign_lines_and_fails_when_it_cannot_write(trainer_output, tmp_path):
    """A `[]` line kept the files sink retrying forever while `--scan` exited 0."""
    from helpers import ckpt_watch, results

    output = tmp_path / "output"
    output.mkdir()
    shutil.copytree(trainer_output / "checkpoint-10", output / "checkpoint-10")
    (output / "ckpt-watch").mkdir()
    (output / "ckpt-watch" / "results.jsonl").write_bytes(FOREIGN)
    config = _scan_config(tmp_path)
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "params")
    assert run.returncode == 0, run.stderr
    assert [r["checkpoint"] for r in results(output)] == ["checkpoint-10"]
    assert (output / "ckpt-watch" / "results.jsonl").read_bytes().startswith(FOREIGN)

    # results.jsonl that cannot be written at all (here a folder): the backfill did not finish, exit 1.
    blocked = tmp_path / "blocked"
    shutil.copytree(trainer_output / "checkpoint-20", blocked / "checkpoint-20")
    (blocked / "ckpt-watch" / "results.jsonl").mkdir(parents=True)
    run = ckpt_watch(blocked, "--scan", "--config", config, "--preset", "params")
    assert run.returncode == 1, run.stderr
    assert "files" in run.stderr and "Traceback" not in run.stderr


def test_each_generation_of_a_checkpoint_keeps_its_own_record_file(tmp_path):
    """The per-job record of generation 1 was overwritten by a re-save's (results.jsonl kept both)."""
    sink = FileSink(tmp_path)
    sink.deliver([replace(_record("a"), generation=1), replace(_record("b"), generation=2),
                  replace(_record("c"), generation=3)])
    folder = tmp_path / "checkpoint-10" / "regular"
    assert sorted(p.name for p in folder.iterdir()) == ["smoke.g2.json", "smoke.g3.json", "smoke.json"]
    assert [json.loads((folder / n).read_text())["result_id"] for n in ("smoke.json", "smoke.g2.json")] == ["a", "b"]


def test_a_whole_batch_delivered_again_writes_each_line_once(tmp_path):
    """A crash after a batch of several was appended, before the journal noted it: the batch comes again (the
    outbox hands an idempotent sink all it has not acknowledged). Only the last line used to be checked, so
    every record but the batch's last was appended twice. Found by tests/test_contracts.py."""
    sink = FileSink(tmp_path)
    sink.deliver([_record("a"), _record("b", 20)])
    sink.deliver([_record("a"), _record("b", 20), _record("c", 30)])  # again, with one committed since
    with open(sink.jsonl, "ab") as handle:  # a crash mid-way through the next batch: "d" whole, "e" torn
        handle.write(json.dumps({"result_id": "d", "step": 40}).encode() + b'\n{"result_id": "e", "st')
    sink.deliver([_record("d", 40), _record("e", 50)])
    assert [r["result_id"] for r in _lines(sink)] == ["a", "b", "c", "d", "e"]
