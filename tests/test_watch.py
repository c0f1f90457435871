"""Filesystem detection and the polling mode."""

import json
import os
import shutil
import signal
import time

from helpers import ckpt_watch, job_states, results, start_daemon, wait_for
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
