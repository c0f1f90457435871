"""The settle window and the one-level poll, on real Trainer checkpoints with a controlled clock."""

import os
import shutil
import time

import pytest

from watcher.config import WatchConfig
from watcher.detect import Detector


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def output(trainer_output, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def _detector(output, clock, known=None, settle=5.0):
    known = known if known is not None else {}
    return Detector(output, WatchConfig().checked_step, known.get, settle=settle, sentinel=None, clock=clock)


def _fresh_copy(trainer_output, output, name="checkpoint-10"):
    dest = output / name
    shutil.copytree(trainer_output / name, dest, copy_function=shutil.copyfile)  # new mtimes: just written
    return dest


def test_a_fresh_checkpoint_waits_for_the_settle_window(trainer_output, output):
    clock = Clock()
    detector = _detector(output, clock)
    _fresh_copy(trainer_output, output)
    assert detector.check(detector.candidates()) == []
    assert detector.settling and detector.next_due() == pytest.approx(5.0)
    clock.now += 4.9
    assert detector.check(detector.due()) == [] and detector.due() == []
    clock.now += 0.2
    (ready,) = detector.check(detector.due())
    assert (ready.name, ready.step, ready.verdict.layout) == ("checkpoint-10", 10, "hf")
    assert not detector.settling
    assert ready.progress["train/epoch"] > 0  # read once, here, from trainer_state.json: journaled with it


def test_a_change_during_the_window_starts_it_again(trainer_output, output):
    clock = Clock()
    detector = _detector(output, clock)
    folder = _fresh_copy(trainer_output, output)
    detector.check(["checkpoint-10"])
    clock.now += 3
    (folder / "extra.txt").write_text("late write")
    assert detector.check(["checkpoint-10"]) == []
    clock.now += 3  # 6 s after the first sight, 3 s after the change
    assert detector.check(["checkpoint-10"]) == []
    clock.now += 2.1
    assert [r.name for r in detector.check(["checkpoint-10"])] == ["checkpoint-10"]


def test_an_old_quiet_checkpoint_is_ready_at_once(trainer_output, output):
    _fresh_copy(trainer_output, output, "checkpoint-20")
    clock = Clock()
    clock.now += 60  # the daemon starts a minute after the checkpoint's last write
    detector = _detector(output, clock)
    assert [r.name for r in detector.check(detector.candidates())] == ["checkpoint-20"]


def test_a_copy_that_keeps_old_mtimes_still_waits_for_the_settle_window(trainer_output, output):
    """rsync -a, cp -p, shutil.copy2: files arrive with their old mtimes; the window follows ctimes too."""
    clock = Clock()
    folder = output / "checkpoint-20"
    shutil.copytree(trainer_output / "checkpoint-20", folder)
    old = time.time() - 3600
    for path in folder.iterdir():
        os.utime(path, (old, old))
    detector = _detector(output, clock)
    assert detector.check(detector.candidates()) == [] and detector.settling
    clock.now += 3
    # A write that leaves size and mtime as they were (a copy that preserves mtimes rewrites a file).
    state = folder / "trainer_state.json"
    state.write_text(state.read_text())
    os.utime(state, (old, old))
    assert detector.check(["checkpoint-20"]) == []
    clock.now += 2.1  # 5.1 s after the first sight, 2.1 s after the write
    assert detector.check(["checkpoint-20"]) == []
    clock.now += 3
    assert [r.name for r in detector.check(["checkpoint-20"])] == ["checkpoint-20"]


def test_incomplete_and_known_checkpoints_are_not_ready(trainer_output, output):
    clock = Clock()
    folder = _fresh_copy(trainer_output, output)
    (folder / "trainer_state.json").unlink()
    detector = _detector(output, clock)
    clock.now += 100
    assert detector.check(["checkpoint-10"]) == [] and not detector.settling

    known_folder = _fresh_copy(trainer_output, output, "checkpoint-20")
    from watcher.fingerprint import fingerprint

    detector = _detector(output, clock, known={"checkpoint-20": fingerprint(known_folder)})
    assert detector.check(["checkpoint-20"]) == [] and not detector.settling


def test_the_one_level_poll_skips_unchanged_known_folders_until_a_thorough_look(trainer_output, output):
    from watcher.fingerprint import fingerprint

    clock = Clock()
    folder = _fresh_copy(trainer_output, output)
    known = {"checkpoint-10": fingerprint(folder)}
    detector = _detector(output, clock, known=known, settle=0.0)
    assert detector.check(["checkpoint-10"], thorough=False) == []  # first look walks it and remembers
    # The weights rewritten in place under the same names: the folder's own stat does not change.
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, (time.time() + 5, time.time() + 5))
    assert detector.check(["checkpoint-10"], thorough=False) == []
    assert [r.name for r in detector.check(["checkpoint-10"], thorough=True)] == ["checkpoint-10"]
    # A new file changes the folder's mtime, so even the cheap poll walks it again.
    known["checkpoint-10"] = fingerprint(folder)
    detector.check(["checkpoint-10"], thorough=False)
    (folder / "late.txt").write_text("x")
    assert [r.name for r in detector.check(["checkpoint-10"], thorough=False)] == ["checkpoint-10"]
