"""The file sink: per-job JSON plus results.jsonl, idempotent across crashes."""

import json

from watcher.sinks import FileSink


def _record(rid, step=10):
    return {"result_id": rid, "step": step, "checkpoint": f"checkpoint-{step}", "variant": "regular",
            "preset": "smoke", "status": "ok", "metrics": {"t/acc": 0.5}, "raw": {"big": [1, 2, 3]}}


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
    sink.jsonl.write_text(json.dumps(_record("a")))
    sink.deliver([_record("a")])
    sink.deliver([_record("b", 20)])
    assert [r["result_id"] for r in _lines(sink)] == ["a", "b"]


def test_read_results_skips_a_torn_last_line(tmp_path):
    from watcher.sinks import read_results

    sink = FileSink(tmp_path)
    sink.deliver([_record("a")])
    with open(sink.jsonl, "ab") as handle:
        handle.write(b'{"result_id": "b", "ste')
    assert [r["result_id"] for r in read_results(tmp_path)] == ["a"]
    assert read_results(tmp_path / "nowhere") == []
