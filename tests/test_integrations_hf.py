"""The trainer callback on REAL `transformers.Trainer` runs: its sentinel, its run record, and the daemon's reading."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from watcher.completion import DEFAULT_SENTINEL, check_checkpoint
from watcher.integrations.run_record import RUN_RECORD, current_wandb_run, process_alive, read_run_record

from helpers import KEEP, SAVE_STEPS, STEPS, train_with_callback as train  # noqa: F401


def listing(folder: Path) -> dict[str, int]:
    """Every file below `folder` but the sentinel, by relative path, with its size: what the manifest must say."""
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = Path(directory, name)
            found[path.relative_to(folder).as_posix()] = path.stat().st_size
    found.pop(DEFAULT_SENTINEL)
    return found


def sentinel_of(folder: Path) -> dict:
    return json.loads((folder / DEFAULT_SENTINEL).read_text())


# ---------------------------------------------------------------------------------------------------
# The sentinel


def test_every_checkpoint_has_a_sentinel_matching_it_exactly(plain_run):
    checkpoints = sorted(p.name for p in plain_run.iterdir() if p.is_dir())
    assert checkpoints == ["checkpoint-4", "checkpoint-6"]  # rotation ran before on_save; survivors carry it
    for name in checkpoints:
        folder = plain_run / name
        step = int(name.split("-")[1])
        sentinel = sentinel_of(folder)
        assert sentinel["format"] == 1 and sentinel["step"] == step
        assert sentinel["files"] == listing(folder)
        assert {"model.safetensors", "trainer_state.json", "optimizer.pt"} <= set(sentinel["files"])
        state = json.loads((folder / "trainer_state.json").read_text())
        assert sentinel["epoch"] == pytest.approx(state["epoch"])
        assert sentinel["num_input_tokens_seen"] == state["num_input_tokens_seen"] > 0
        assert sentinel["writer"] == "ckpt-watch/hf" and sentinel["written_at"]
        assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # no temp file left behind


def test_daemon_takes_sentinel_checkpoints_as_complete_with_their_layout(plain_run):
    for step in (4, 6):
        verdict = check_checkpoint(plain_run / f"checkpoint-{step}", step)
        assert (verdict.complete, verdict.layout, verdict.reason, verdict.variants) == (True, "hf", "", ("regular",))
    # Naming our sentinel in the config is the same rule, not the presence-only one.
    assert check_checkpoint(plain_run / "checkpoint-6", 6, sentinel=DEFAULT_SENTINEL).layout == "hf"


@pytest.fixture
def copy_checkpoint(plain_run, tmp_path):
    dest = tmp_path / "checkpoint-6"
    shutil.copytree(plain_run / "checkpoint-6", dest)
    return dest


def test_truncated_listed_file_is_incomplete(copy_checkpoint):
    size = sentinel_of(copy_checkpoint)["files"]["model.safetensors"]
    with open(copy_checkpoint / "model.safetensors", "r+b") as f:
        f.truncate(size - 10)
    verdict = check_checkpoint(copy_checkpoint, 6)
    assert not verdict.complete and verdict.layout == "hf"
    assert verdict.reason == f"{DEFAULT_SENTINEL} lists model.safetensors ({size} bytes) but it has {size - 10}"


def test_files_the_layout_rules_never_read_are_checked_too(copy_checkpoint):
    """optimizer.pt is no weight file: only the manifest knows it is short or gone."""
    size = sentinel_of(copy_checkpoint)["files"]["optimizer.pt"]
    with open(copy_checkpoint / "optimizer.pt", "ab") as f:
        f.write(b"x")
    assert check_checkpoint(copy_checkpoint, 6).reason == (
        f"{DEFAULT_SENTINEL} lists optimizer.pt ({size} bytes) but it has {size + 1}"
    )
    (copy_checkpoint / "optimizer.pt").unlink()
    assert check_checkpoint(copy_checkpoint, 6).reason == f"{DEFAULT_SENTINEL} lists optimizer.pt ({size} bytes) but it is missing"
    # Without the sentinel the layout rules alone take the folder as complete: the manifest is the stronger rule.
    (copy_checkpoint / DEFAULT_SENTINEL).unlink()
    assert check_checkpoint(copy_checkpoint, 6).complete


def test_files_added_after_the_sentinel_do_not_matter(copy_checkpoint):
    (copy_checkpoint / "eval-notes.txt").write_text("written later by someone else")
    assert check_checkpoint(copy_checkpoint, 6).complete


TWO_RANKS = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_integrations_hf import train
trainer = train(Path({out!r}), ["none"])
print("RANK", os.environ["RANK"], "PID", os.getpid(), "WORLD", trainer.args.world_size, flush=True)
"""


def test_two_ranks_only_world_process_zero_writes(tmp_path):
    """torchrun, 2 CPU ranks (gloo DDP): each rank writes its own rng_state_R.pth; the sentinel, written after
    the callback's barrier by rank 0 alone, lists both whole, and the record carries rank 0's pid."""
    out = tmp_path / "output"
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pids = {}
    # Anywhere in the output, not at line starts: the ranks share one stdout, and a line of one rank can begin
    # in the middle of an unfinished line of the other's.
    for rank, pid, world in re.findall(r"RANK (\d+) PID (\d+) WORLD (\d+)", proc.stdout):
        assert world == "2"
        pids[int(rank)] = int(pid)
    assert sorted(pids) == [0, 1], proc.stdout[-3000:]
    for step in (4, 6):
        folder = out / f"checkpoint-{step}"
        files = sentinel_of(folder)["files"]
        assert files == listing(folder)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)
        assert check_checkpoint(folder, step).complete
    record = read_run_record(out)
    assert record["pid"] == pids[0] and record["state"] == "finished"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------
# The run record


def test_run_record_without_wandb(plain_run):
    record = read_run_record(plain_run)
    raw = json.loads((plain_run / RUN_RECORD).read_text())
    assert record == raw
    assert record["format"] == 1 and record["state"] == "finished"
    assert record["wandb"] is None
    assert record["logging_dir"] is None  # transformers 5 has no args.logging_dir; no TensorBoardCallback here
    assert record["output_dir"] == str(plain_run.resolve())
    assert record["global_step"] == STEPS
    assert record["pid"] == os.getpid() and record["hostname"] == socket.gethostname()
    assert record["started_at"] <= record["updated_at"]
    assert process_alive(record) is True


def test_run_record_with_offline_wandb_and_tensorboard(wandb_run):
    out, wandb_dir = wandb_run
    record = read_run_record(out)
    assert record["state"] == "finished"
    offline_files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(offline_files) == 1, offline_files
    run_id = offline_files[0].name.removeprefix("run-").removesuffix(".wandb")
    run = record["wandb"]
    assert run["id"] == run_id
    assert (run["project"], run["mode"], run["entity"]) == ("ckpt-watch-test", "offline", None)
    assert Path(run["sync_dir"]) == offline_files[0].parent
    assert Path(run["dir"]) == offline_files[0].parent / "files" and Path(run["dir"]).is_dir()
    # The TensorBoardCallback's own dir (runs/<time>_<host>), holding its event file.
    logging_dir = Path(record["logging_dir"])
    assert logging_dir.parent == out / "runs"
    assert list(logging_dir.glob("events.out.tfevents.*"))
    assert check_checkpoint(out / "checkpoint-6", 6).complete


def test_read_run_record_tolerates_missing_torn_and_foreign_files(tmp_path):
    assert read_run_record(tmp_path) is None
    assert read_run_record(tmp_path / "no-such-dir") is None
    path = tmp_path / RUN_RECORD
    for content in (b"", b'{"format": 1, "wandb": {"id": "ab', b"[1, 2]", b'{"wandb": null}', b'{"format": "1"}',
                    b"\xff\xfe not utf-8"):
        path.write_bytes(content)
        assert read_run_record(tmp_path) is None, content
    path.write_text(json.dumps({"format": 1, "wandb": {"project": "p"}, "state": "running", "future": 1}))
    assert read_run_record(tmp_path) == {"format": 1, "wandb": None, "state": "running", "future": 1}
    path.unlink()
    path.mkdir()  # a directory where the file should be
    assert read_run_record(tmp_path) is None


def test_process_alive_only_answers_on_the_writers_host():
    here = socket.gethostname()
    assert process_alive({"pid": os.getpid(), "hostname": here}) is True
    assert process_alive({"pid": os.getpid(), "hostname": here + "-elsewhere"}) is None
    assert process_alive({"hostname": here}) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert process_alive({"pid": dead.pid, "hostname": here}) is False


def test_wandb_run_seen_late_or_finished_early(tmp_path, monkeypatch):
    """Callback order: a run that appears only after train begin is recorded at the next save; a run finished
    before train end is kept. A stand-in wandb module, so no real run is started."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from watcher.integrations.hf import CkptWatchCallback

    fake = types.ModuleType("wandb")
    fake.run = None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback = CkptWatchCallback(logging_dir=tmp_path / "tb")

    callback.on_train_begin(args, state, control)
    assert read_run_record(tmp_path)["wandb"] is None
    fake.run = types.SimpleNamespace(
        entity="team", project="proj", id="abc123", name="nice-run", dir=str(tmp_path / "wb" / "files"),
        url="https://wandb.example/team/proj/runs/abc123", settings=types.SimpleNamespace(mode="run", sync_dir=None),
    )
    state.global_step = 2
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"12345")
    callback.on_save(args, state, control)
    record = read_run_record(tmp_path)
    assert record["wandb"] == {
        "entity": "team", "project": "proj", "id": "abc123", "name": "nice-run", "mode": "online",
        "dir": str(tmp_path / "wb" / "files"), "sync_dir": None, "url": "https://wandb.example/team/proj/runs/abc123",
    }
    assert record["logging_dir"] == str(tmp_path / "tb") and record["global_step"] == 2
    assert sentinel_of(tmp_path / "checkpoint-2")["files"] == {"model.safetensors": 5}
    fake.run = None  # the script called wandb.finish() itself
    callback.on_train_end(args, state, control)
    record = read_run_record(tmp_path)
    assert record["state"] == "finished" and record["wandb"]["id"] == "abc123"
    assert current_wandb_run() is None


def test_not_world_process_zero_writes_nothing(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from watcher.integrations.hf import CkptWatchCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=False, global_step=2)
    (tmp_path / "checkpoint-2").mkdir()
    callback = CkptWatchCallback()
    for event in (callback.on_train_begin, callback.on_save, callback.on_train_end):
        event(args, state, TrainerControl())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint-2"]


def test_daemon_side_modules_import_no_transformers():
    code = (
        "import sys\n"
        "import watcher.completion, watcher.integrations.run_record, watcher.integrations.sentinel\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'wandb'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
