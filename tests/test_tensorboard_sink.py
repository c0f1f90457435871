"""The TensorBoard sink: points read back with TensorBoard's own loader, at the right steps, across restarts."""

import errno
import hashlib
import struct
import subprocess
import sys
from dataclasses import replace
from datetime import datetime

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from watcher.records import Result  # noqa: E402
from watcher.sinks import event_files  # noqa: E402
from watcher.sinks import tensorboard as tb  # noqa: E402
from watcher.sinks.tensorboard import TensorBoardSink, resolve_tensorboard_dir  # noqa: E402

WHEN = "2026-11-21T15:04:05+00:00"  # watcher/daemon.py _iso
EPOCH = datetime.fromisoformat(WHEN).timestamp()


def _record(step, variant="regular", status="ok", metrics=None, finished_at=WHEN):
    metrics = {"arc/acc": step / 1000 + (0.5 if variant == "ema" else 0), "arc/acc_norm": 1 / 3} if metrics is None else metrics
    return Result(result_id=f"{step}-{variant}", step=step, checkpoint=f"checkpoint-{step}", variant=variant,
                  preset="smoke", status=status, metrics=metrics, finished_at=finished_at,
                  progress={"train/epoch": step / 100, "train/tokens": step * 4096.0})  # fmt: skip


def _f32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _read(folder):
    """{tag: [(step, value, wall_time), ...]} as TensorBoard's Python loader sees the folder."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records):
    points = {}
    for r in sorted(records, key=lambda r: r.step):
        if r.status != "ok":
            continue
        prefix = "eval" if r.variant == "regular" else "eval_ema"
        for name, value in r.metrics.items():
            points.setdefault(f"{prefix}/{name}", []).append((r.step, _f32(value), EPOCH))
    return points


def _events(folder):
    return sorted(p.name for p in folder.iterdir() if "tfevents" in p.name)


def test_every_metric_at_its_step_read_back_with_tensorboards_loader(tmp_path):
    folder = tmp_path / "runs" / "ckpt-watch-eval"
    sink = TensorBoardSink(folder)
    first = [_record(500), _record(500, "ema"), _record(300, status="failed", metrics={"arc/acc": 0.9})]
    sink.deliver(first)
    assert _read(folder) == _expected(first)  # on disk when deliver returns, the sink still open
    later = [_record(200), _record(200, "ema")]  # a retried job of an earlier checkpoint
    sink.deliver(later)
    sink.deliver([_record(700, status="failed"), _record(800, metrics={})])  # nothing to write
    sink.close()
    seen = _read(folder)
    assert seen == _expected(first + later)
    assert set(seen) == {"eval/arc/acc", "eval/arc/acc_norm", "eval_ema/arc/acc", "eval_ema/arc/acc_norm"}
    assert [step for step, _, _ in seen["eval/arc/acc"]] == [200, 500]  # no failed step 300, in step order
    assert seen["eval_ema/arc/acc"][1][1] == pytest.approx(1.0)  # 500/1000 + 0.5: the EMA curve is its own
    assert len(_events(folder)) == 1  # the out-of-order point made the sink rewrite one ordered file


def test_a_restart_adds_a_file_and_the_loader_merges_them(tmp_path):
    folder = tmp_path / "eval"
    sink = TensorBoardSink(folder)
    sink.deliver([_record(100), _record(200)])
    sink.close()
    sink = TensorBoardSink(folder)  # the daemon restarted
    sink.deliver([_record(300), _record(300, "ema")])
    sink.deliver([_record(400)])
    sink.close()
    assert len(_events(folder)) == 2 and all(name.endswith(".ckpt-watch") for name in _events(folder))
    assert _read(folder) == _expected([_record(s) for s in (100, 200, 300, 400)] + [_record(300, "ema")])

    sink = TensorBoardSink(folder)  # another restart, and a result below the steps already written
    sink.deliver([_record(150)])
    sink.close()
    assert len(_events(folder)) == 1
    regular = [_record(s) for s in (100, 150, 200, 300, 400)]
    assert _read(folder) == _expected([*regular, _record(300, "ema")])  # every point once, in step order


def test_a_repeated_delivery_only_repeats_points(tmp_path):
    folder = tmp_path / "eval"
    sink = TensorBoardSink(folder)
    sink.deliver([_record(100), _record(200)])
    sink.close()
    sink = TensorBoardSink(folder)
    sink.deliver([_record(200)])  # a crash after the write, before the journal noted it: the batch again
    sink.close()
    steps = [step for step, _, _ in _read(folder)["eval/arc/acc"]]
    assert steps == [100, 200, 200]  # an equal step appends; TensorBoard's data server keeps the last one


def test_a_write_error_raises_and_leaves_no_half_batch(tmp_path, monkeypatch):
    folder = tmp_path / "eval"
    sink = TensorBoardSink(folder)
    sink.deliver([_record(100)])
    real_write = event_files.os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(event_files.os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        sink.deliver([_record(200), _record(300)])
    assert _read(folder) == _expected([_record(100)])  # cut back to what was delivered
    monkeypatch.setattr(event_files.os, "write", real_write)
    sink.deliver([_record(200), _record(300)])  # the outbox retries the batch: a new file
    sink.close()
    assert len(_events(folder)) == 2
    assert _read(folder) == _expected([_record(s) for s in (100, 200, 300)])


def test_the_trainers_event_files_are_untouched(tmp_path):
    output = tmp_path / "out"
    trainer_run = output / "runs" / "May01_12-00-00_node-0"
    trainer_run.mkdir(parents=True)
    (trainer_run / "events.out.tfevents.1714560000.node-0.1234.0").write_bytes(b"the trainer's own bytes")
    snapshot = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in trainer_run.iterdir()}
    folder = resolve_tensorboard_dir("auto", output, trainer_run)
    assert folder == output / "runs" / "ckpt-watch-eval"
    sink = TensorBoardSink(folder)
    sink.deliver([_record(500)])
    sink.deliver([_record(200)])  # a rewrite deletes files: only ours, only in our folder
    sink.close()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in trainer_run.iterdir()} == snapshot
    assert sorted(p.name for p in (output / "runs").iterdir()) == ["May01_12-00-00_node-0", "ckpt-watch-eval"]


def test_resolve_tensorboard_dir(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    assert resolve_tensorboard_dir("off", output, output / "runs" / "x") is None
    assert resolve_tensorboard_dir("auto", output, None) is None  # no TensorBoard in the trainer
    assert resolve_tensorboard_dir("auto", output, output / "runs" / "x") is None  # recorded, never created
    (output / "runs").mkdir()
    assert resolve_tensorboard_dir("auto", output, None) == output / "runs" / "ckpt-watch-eval"
    (output / "runs" / "x").mkdir()
    assert resolve_tensorboard_dir("auto", output, output / "runs" / "x") == output / "runs" / "ckpt-watch-eval"
    custom = tmp_path / "tb" / "mine"  # TENSORBOARD_LOGGING_DIR, not under runs/: a subfolder of it
    custom.mkdir(parents=True)
    assert resolve_tensorboard_dir("auto", output, custom) == custom / "ckpt-watch-eval"
    trial = output / "runs" / "x" / "trial-3"  # a hyperparameter-search trial
    trial.mkdir()
    assert resolve_tensorboard_dir("auto", output, trial) == trial / "ckpt-watch-eval"
    assert resolve_tensorboard_dir(str(tmp_path / "tbx"), output, None) == tmp_path / "tbx"
    assert resolve_tensorboard_dir("tb-eval", output, None) == output / "tb-eval"
    with pytest.raises(ValueError, match="logging dir"):
        resolve_tensorboard_dir(str(custom), output, custom)
    (custom / "events.out.tfevents.1714560000.node-0").write_bytes(b"")
    with pytest.raises(ValueError, match="did not write"):
        resolve_tensorboard_dir(str(custom), output, None)
    ours = output / "runs" / "ckpt-watch-eval"
    TensorBoardSink(ours).deliver([_record(100)])
    assert resolve_tensorboard_dir("auto", output, None) == ours  # our own files are fine


def test_finished_at_is_the_wall_time(tmp_path):
    assert tb._walltime(_record(1, finished_at="2026-11-21T15:04:05Z")) == EPOCH
    assert tb._walltime(_record(1, finished_at=WHEN)) == EPOCH
    assert abs(tb._walltime(_record(1, finished_at="garbage")) - datetime.now().timestamp()) < 60


def test_the_sink_imports_neither_torch_nor_tensorboard(tmp_path):
    """tensorboardX would import torch; the daemon process must never import it."""
    code = (
        "import sys; from pathlib import Path\n"
        "from watcher.records import Result\n"
        "from watcher.sinks.tensorboard import TensorBoardSink\n"
        f"s = TensorBoardSink(Path({str(tmp_path)!r})); s.deliver([{_record(100)!r}]); s.close()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorboardX', 'tensorboard', 'numpy'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert _read(tmp_path) == _expected([_record(100)])


def test_holds_is_what_the_event_files_have_at_that_step_and_value(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.deliver([_record(100), _record(200)])
    sink.close()
    other = replace(_record(200), result_id="200-again", metrics={"arc/acc": 0.9, "arc/acc_norm": 1 / 3})
    failed = replace(_record(300, status="failed"), result_id="300-failed")  # no points: nothing to send
    asked = [_record(100), other, _record(300), failed, _record(100, "ema")]
    assert TensorBoardSink(tmp_path).holds(asked) == {"100-regular", "300-failed"}


def test_a_crash_in_the_middle_of_a_rewrite_neither_loses_nor_repeats_points(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.deliver([_record(100), _record(200)])
    sink.close()
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    sink = TensorBoardSink(tmp_path)
    sink.deliver([_record(150)])  # below 200: a rewrite into one `.full` file, then the old file goes
    sink.close()
    for path, data in before.items():  # as if killed after the full file got its name, before the deletion
        path.write_bytes(data)
    (tmp_path / ".being-written.0000000000000001.ckpt-watch").write_bytes(b"half a rewrite")  # an older crash
    assert [step for step, _, row in tb.read_points(tmp_path) if "eval/arc/acc" in row] == [100, 150, 200]
    sink = TensorBoardSink(tmp_path)
    sink.deliver([_record(300)])  # the next daemon deletes what the crash left
    sink.close()
    assert _read(tmp_path) == _expected([_record(s) for s in (100, 150, 200, 300)])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".being-written")]
    assert len(_events(tmp_path)) == 2  # the full file and the new one
