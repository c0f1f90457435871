"""Filesystem detection and the polling mode."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers import ckpt_watch, job_states, journal_checkpoints, results, start_daemon, wait_for
from watcher.watch import NETWORK_FILESYSTEMS, filesystem_type


def test_filesystem_type_uses_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        "server:/export /data nfs4 rw,relatime 0 0\n"
        "/dev/sdb1 /data/local ext4 rw 0 0\n"
        "lustre@o2ib:/scratch /mnt/my\\040scratch lustre rw 0 0\n"
    )
    assert filesystem_type("/data/runs/out", str(mounts)) == "nfs4"
    assert filesystem_type("/data/local/out", str(mounts)) == "ext4"
    assert filesystem_type("/database", str(mounts)) == "overlay"  # /data is not a prefix of /database
    assert filesystem_type("/mnt/my scratch/run", str(mounts)) == "lustre"
    assert {"nfs4", "lustre"} <= NETWORK_FILESYSTEMS


def test_polling_mode_finds_a_new_checkpoint(trainer_output, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    config = tmp_path / "c.toml"
    config.write_text('[presets.params]\n[[presets.params.evaluators]]\nbackend = "probes"\n')
    log = tmp_path / "daemon.log"
    daemon = start_daemon(log, output, "--config", config, "--preset", "params", "--poll", "0.5", "--settle", "0.5")
    try:
        wait_for(lambda: b"polling every 0.5 s" in log.read_bytes(), 60, what="the daemon to start polling")
        shutil.copytree(trainer_output / "checkpoint-20", output / "checkpoint-20")
        wait_for(lambda: len(results(output)) == 1, 60, what="the result")
    finally:
        daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=60) == 0
    assert job_states(output) == {"checkpoint-20/regular": "done"}


PARAMS = '[presets.params]\n[[presets.params.evaluators]]\nbackend = "probes"\n'


def _quiet_copy(source, dest, global_step=None):
    """A whole checkpoint folder, its files old (a backfill), with trainer_state's global_step set if given."""
    shutil.copytree(source, dest)
    if global_step is not None:
        state = dest / "trainer_state.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), "global_step": global_step}))
    old = time.time() - 3600
    for path in dest.rglob("*"):
        os.utime(path, (old, old))


def test_folders_the_pattern_admits_but_that_cannot_be_checkpoints_fail_only_themselves(trainer_output, tmp_path):
    """A step beyond SQLite's range killed the daemon at every start (OverflowError); `checkpoint-30\\n` was
    evaluated as step 30. Each is logged once and ignored; the real checkpoint is evaluated, twice in a row."""
    output = tmp_path / "output"
    output.mkdir()
    _quiet_copy(trainer_output / "checkpoint-10", output / "checkpoint-10")
    huge = "99999999999999999999"
    _quiet_copy(trainer_output / "checkpoint-20", output / f"checkpoint-{huge}", global_step=int(huge))
    _quiet_copy(trainer_output / "checkpoint-30", output / "checkpoint-30\n")
    config = tmp_path / "c.toml"
    config.write_text('wandb = "off"\ntensorboard = "off"\n' + PARAMS)
    for _ in range(2):  # the second start must not die either
        run = ckpt_watch(output, "--scan", "--config", config, "--preset", "params")
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
        assert [r["checkpoint"] for r in results(output)] == ["checkpoint-10"]
        warnings = [line for line in run.stderr.splitlines() if "ignoring folder" in line]
        assert len(warnings) == 2, run.stderr
        assert any(huge in line and "larger than" in line for line in warnings), warnings
        assert any("'checkpoint-30\\n'" in line and "control characters" in line for line in warnings), warnings


def _generations(output, name):
    return [c.generation for c in journal_checkpoints(output) if c.name == name]


def test_re_saves_under_inotify(trainer_output, tmp_path):
    """`touch config.json` and deleting optimizer.pt are not re-saves; rewriting the weights is, and each
    generation keeps its own record file. After a delete-and-recreate, an in-place rewrite was noticed only by the
    next rescan (24.6 s; 0.4 s otherwise): the watch of the deleted folder was kept. The rescan is 300 s here, so
    only inotify can notice it in time."""
    output = tmp_path / "output"
    output.mkdir()
    config = tmp_path / "c.toml"
    config.write_text('wandb = "off"\ntensorboard = "off"\nrescan_interval = 300\n' + PARAMS)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(log, output, "--config", config, "--preset", "params", "--settle", "0.5")
    folder = output / "checkpoint-10"
    try:
        wait_for(lambda: b"(inotify)" in log.read_bytes(), 60, what="the daemon to start watching")
        shutil.copytree(trainer_output / "checkpoint-10", folder, copy_function=shutil.copyfile)
        wait_for(lambda: len(results(output)) == 1, 60, what="the first result")

        later = time.time() + 5
        os.utime(folder / "config.json", (later, later))
        (folder / "optimizer.pt").unlink()
        # A barrier: checkpoint-20 is evaluated after any re-save of checkpoint-10 (policy all: step order).
        shutil.copytree(trainer_output / "checkpoint-20", output / "checkpoint-20", copy_function=shutil.copyfile)
        wait_for(lambda: len(results(output)) == 2, 60, what="checkpoint-20's result")
        assert _generations(output, "checkpoint-10") == [1]

        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes())
        wait_for(lambda: len(results(output)) == 3, 60, what="the re-save's result")
        records = [r for r in results(output) if r["checkpoint"] == "checkpoint-10"]
        assert [r["generation"] for r in records] == [1, 2]
        per_job = [json.loads((output / "ckpt-watch" / "checkpoint-10" / "regular" / n).read_text())["result_id"]
                   for n in ("params.json", "params.g2.json")]  # fmt: skip
        assert per_job == [r["result_id"] for r in records]

        # Deleted and created again before the daemon looks (stopped meanwhile, so the order is certain).
        daemon.send_signal(signal.SIGSTOP)
        try:
            shutil.rmtree(folder)
            shutil.copytree(trainer_output / "checkpoint-10", folder, copy_function=shutil.copyfile)
        finally:
            daemon.send_signal(signal.SIGCONT)
        wait_for(lambda: _generations(output, "checkpoint-10") == [1, 2, 3], 60, what="the recreated folder")
        rewritten = time.monotonic()
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        wait_for(lambda: _generations(output, "checkpoint-10") == [1, 2, 3, 4], 60, what="the in-place rewrite")
        noticed = time.monotonic() - rewritten
        print(f"in-place rewrite after delete-and-recreate noticed after {noticed:.2f} s (settle 0.5 s)")
        assert noticed < 15, noticed
    finally:
        daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=60) == 0


MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.mark.serial  # lowers the machine-wide inotify queue limit for every daemon started meanwhile
def test_an_inotify_queue_overflow_is_logged_once_and_rescanned_at_once(trainer_output, tmp_path):
    """With a small queue, events were dropped silently and the checkpoint whose events were lost was found only
    by the rescan (30 s by default; 300 s here). The daemon is stopped (SIGSTOP) while a burst of events and the
    checkpoint's arrival happen, so the queue certainly overflows and the arrival's event is certainly lost."""
    try:
        original = MAX_QUEUED_EVENTS.read_text()
        MAX_QUEUED_EVENTS.write_text(original)
    except OSError as exc:
        pytest.skip(f"{MAX_QUEUED_EVENTS} is not writable ({exc.strerror}): needs root")
    output = tmp_path / "output"
    output.mkdir()
    staged = tmp_path / "staged"
    for step in (20, 30):
        shutil.copytree(trainer_output / f"checkpoint-{step}", staged / f"checkpoint-{step}", copy_function=shutil.copyfile)
    config = tmp_path / "c.toml"
    config.write_text('wandb = "off"\ntensorboard = "off"\nrescan_interval = 300\n' + PARAMS)
    log = tmp_path / "daemon.log"
    # The limit applies to inotify instances created while it is set: restored as soon as the daemon watches.
    MAX_QUEUED_EVENTS.write_text("16")
    try:
        daemon = start_daemon(log, output, "--config", config, "--preset", "params", "--settle", "0.5")
        wait_for(lambda: b"(inotify)" in log.read_bytes(), 60, what="the daemon to start watching")
    finally:
        MAX_QUEUED_EVENTS.write_text(original)
    try:
        for round, step in enumerate((20, 30)):
            daemon.send_signal(signal.SIGSTOP)
            try:
                for i in range(100):
                    (output / f"note-{round}-{i}.txt").write_text("x")  # not checkpoints, but events all the same
                os.rename(staged / f"checkpoint-{step}", output / f"checkpoint-{step}")
            finally:
                daemon.send_signal(signal.SIGCONT)
            arrived = time.monotonic()
            wait_for(lambda: len(results(output)) == round + 1, 60, what=f"checkpoint-{step}'s result")
            print(f"checkpoint-{step} evaluated {time.monotonic() - arrived:.2f} s after an overflow")
        text = log.read_text()
        assert text.count("inotify dropped events") == 1, text
        assert "Traceback" not in text and "Inotify queue overflowed" not in text  # watchdog's own line stays out
    finally:
        daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=60) == 0
