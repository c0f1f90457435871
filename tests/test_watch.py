"""Filesystem detection and the polling mode."""

import shutil
import signal

from helpers import job_states, results, start_daemon, wait_for
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
