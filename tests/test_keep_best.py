"""keep_best: the best checkpoints kept under RESULTS_DIR/best by hard links, held from detection so that the
trainer's rotation cannot take them first (watcher/retention.py), and `ckpt-watch best`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ckpt_watch, start_daemon, wait_for

from watcher.config import build_config
from watcher.journal import Journal
from watcher.records import ACTIVE_STATES, JobState, Outcome, OutcomeKind, Result
from watcher.retention import Retention, read_index

METRIC = "smoke_mc/acc"


# --- a run of crafted results over real folders ---------------------------------------------------------------


class Run:
    """A journal, real checkpoint folders and a Retention over them; results are committed as the daemon does."""

    def __init__(self, output: Path, results_dir: Path, steps: list[int], **options):
        self.output, self.results_dir = output, results_dir
        for step in steps:
            folder = output / f"checkpoint-{step}"
            (folder / "shards").mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(bytes([step % 256]) * 4096)
            (folder / "shards" / "part-0").write_text(f"step {step}")
        self.config = build_config({"keep_best": [{"metric": METRIC, "mode": "max", "k": 2}], **options},
                                   {"output_dir": output, "results_dir": results_dir})  # fmt: skip
        self.journal = Journal(results_dir / "journal.sqlite")
        self.retention = self.open_retention()
        for step in steps:
            checkpoint = self.journal.add_checkpoint(f"checkpoint-{step}", step, output / f"checkpoint-{step}",
                                                     "fp", "hf", ["regular"])  # fmt: skip
            self.retention.hold(checkpoint)  # as WatchedRun.admit does
        self.journal.ensure_jobs([(c, "regular", "smoke") for c in self.journal.all_checkpoints()])

    def open_retention(self) -> Retention:
        active = lambda: self.journal.jobs(states=[JobState.PENDING, *ACTIVE_STATES])  # noqa: E731
        return Retention(self.results_dir, self.journal, self.config, active)

    def finish(self, step: int, value: float | None, record: bool = True, merged: Path | None = None) -> Result:
        """`merged`: the merged model the job left in its scratch folder (as the daemon hands it over)."""
        [job] = [j for j in self.journal.jobs() if j.checkpoint.step == step]
        job = self.journal.start(job)
        if merged is not None:
            self.retention.take_merged(job, Outcome(OutcomeKind.OK, metrics={METRIC: value}, merged_model=str(merged)))
        result = Result(result_id=f"r{step}", step=step, checkpoint=f"checkpoint-{step}", variant="regular",
                        preset="smoke", status="ok" if value is not None else "failed",
                        metrics={METRIC: value} if value is not None else {}, error=None if value else "boom",
                        checkpoint_path=str(job.checkpoint.path),
                        finished_at=f"2026-01-01T00:00:{step:02d}")  # fmt: skip
        assert self.journal.finish(job.id, result)
        if record:
            self.retention.result_recorded(result)
        return result

    @property
    def best(self) -> Path:
        return self.results_dir / "best"

    def kept(self) -> list[str]:
        """best/<metric>/ as it is on disk, and best.json's ranking (they must agree)."""
        folder = self.best / METRIC
        on_disk = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        [rule] = read_index(self.best)["rules"]
        assert sorted(entry["checkpoint"] for entry in rule["kept"] if entry["path"]) == on_disk
        return [entry["checkpoint"] for entry in rule["kept"]]

    def held(self) -> list[str]:
        return sorted(p.name for p in (self.best / ".held").iterdir())


def test_the_best_k_follow_results_arriving_out_of_order(tmp_path):
    run = Run(tmp_path / "out", tmp_path / "results", [10, 20, 30, 40])
    assert run.held() == ["checkpoint-10-g1", "checkpoint-20-g1", "checkpoint-30-g1", "checkpoint-40-g1"]
    run.finish(30, 0.3)
    assert run.kept() == ["checkpoint-30"]
    assert run.held() == ["checkpoint-10-g1", "checkpoint-20-g1", "checkpoint-40-g1"]  # 30 is decided
    run.finish(10, 0.9)
    assert run.kept() == ["checkpoint-10", "checkpoint-30"]
    shutil.rmtree(run.output / "checkpoint-20")  # the trainer's rotation, before checkpoint-20's result
    run.finish(20, 0.5)
    assert run.kept() == ["checkpoint-10", "checkpoint-20"]  # 30 left the best 2; 20 came from its hold
    assert not (run.best / METRIC / "checkpoint-30").exists()
    assert (run.best / METRIC / "checkpoint-20" / "model.safetensors").read_bytes() == bytes([20]) * 4096
    assert (run.best / METRIC / "checkpoint-20" / "shards" / "part-0").read_text() == "step 20"
    run.finish(40, 0.95)
    assert run.kept() == ["checkpoint-40", "checkpoint-10"]
    assert run.held() == []
    for step in (10, 40):  # hard links: the same files as the originals, no copy
        kept, original = (run.best / METRIC / f"checkpoint-{step}" / "model.safetensors",
                          run.output / f"checkpoint-{step}" / "model.safetensors")  # fmt: skip
        assert os.stat(kept).st_ino == os.stat(original).st_ino
    [rule] = read_index(run.best)["rules"]
    ranking = [(e["rank"], e["step"], e["value"], e["result_id"]) for e in rule["kept"]]
    assert ranking == [(1, 40, 0.95, "r40"), (2, 10, 0.9, "r10")]
    assert rule["kept"][0]["original"] == str(run.output / "checkpoint-40")


def test_a_reload_with_another_k_applies_at_the_next_look(tmp_path):
    run = Run(tmp_path / "out", tmp_path / "results", [10, 20, 30])
    for step, value in ((10, 0.5), (20, 0.6), (30, 0.4)):
        run.finish(step, value)
    assert run.kept() == ["checkpoint-20", "checkpoint-10"]
    reloaded = build_config({"keep_best": [{"metric": METRIC, "mode": "max", "k": 1}]},
                            {"output_dir": run.output, "results_dir": run.results_dir})  # fmt: skip
    run.retention.configure(reloaded)  # as WatchedRun.replace_setup does on SIGHUP
    run.retention.reconcile()
    assert run.kept() == ["checkpoint-20"]


def test_a_failed_job_releases_its_hold_and_keeps_nothing(tmp_path):
    run = Run(tmp_path / "out", tmp_path / "results", [10, 20])
    run.finish(10, None)
    assert run.held() == ["checkpoint-20-g1"] and run.kept() == []
    run.finish(20, 0.4)
    assert run.kept() == ["checkpoint-20"] and run.held() == []


def test_a_retention_failure_is_one_line_and_the_next_result_mends_it(tmp_path, caplog):
    run = Run(tmp_path / "out", tmp_path / "results", [10, 20])
    shutil.rmtree(run.best)
    run.best.write_text("not a folder")  # best/ cannot be written (as a full disk or a permission would do)
    with caplog.at_level(logging.ERROR, logger="ckpt-watch"):
        run.finish(10, 0.5)
        run.finish(20, 0.6)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keep_best: cannot update the best checkpoints" in errors[0], errors
    assert len(run.journal.results()) == 2  # the results are safe
    run.best.unlink()
    run.retention.reconcile()  # the next look at the output dir
    assert run.kept() == ["checkpoint-20", "checkpoint-10"]


def test_keep_merged_best_holds_a_merged_model_only_while_it_could_rank(tmp_path):
    run = Run(tmp_path / "out", tmp_path / "results", [10, 20, 30], keep_merged_best=True)
    scratch = tmp_path / "scratch"
    for step in (10, 20, 30):
        (scratch / str(step)).mkdir(parents=True)
        (scratch / str(step) / "model.safetensors").write_text(f"merged {step}")
    run.finish(10, 0.5, merged=scratch / "10")
    run.finish(20, 0.6, merged=scratch / "20")
    assert (run.best / METRIC / "checkpoint-20" / "merged" / "model.safetensors").read_text() == "merged 20"
    held = run.best / ".held" / "checkpoint-30-g1.merged-regular"
    run.retention.take_merged(run.journal.jobs()[-1], Outcome(OutcomeKind.OK, metrics={METRIC: 0.1},
                                                              merged_model=str(scratch / "30")))  # fmt: skip
    assert not held.exists()  # 0.1 would not be among the best 2: not worth holding
    run.finish(30, 0.7, merged=scratch / "30")
    assert run.kept() == ["checkpoint-30", "checkpoint-20"] and run.held() == []
    [rule] = read_index(run.best)["rules"]
    assert [e["merged"] for e in rule["kept"]] == [str(run.best / METRIC / f"checkpoint-{s}" / "merged") for s in (30, 20)]


CRASH = """
import os, signal, sys
sys.path[:0] = [{tests!r}]
from test_keep_best import Run
run = Run.__new__(Run)
from pathlib import Path
from watcher.config import build_config
from watcher.journal import Journal
run.output, run.results_dir = Path({output!r}), Path({results!r})
run.config = build_config({{"keep_best": [{{"metric": "smoke_mc/acc", "mode": "max", "k": 2}}]}},
                          {{"output_dir": run.output, "results_dir": run.results_dir}})
run.journal = Journal(run.results_dir / "journal.sqlite")
run.retention = run.open_retention()
real_rename = os.rename
def rename(source, destination):  # SIGKILL in the middle of a promotion: the folder is built, not yet in place
    if ".tmp-checkpoint-20" in str(source):
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(source, destination)
os.rename = rename
run.finish(20, 0.7)
"""


def test_a_kill_between_hold_and_promotion_is_mended_at_the_next_start(tmp_path):
    run = Run(tmp_path / "out", tmp_path / "results", [10, 20, 30])
    run.finish(10, 0.5)
    script = CRASH.format(tests=str(Path(__file__).parent), output=str(run.output), results=str(run.results_dir))
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run.best / METRIC / ".tmp-checkpoint-20").is_dir()  # half-way: built, not in place, best.json stale
    assert run.kept() == ["checkpoint-10"] and "checkpoint-20-g1" in run.held()
    shutil.rmtree(run.output / "checkpoint-20")  # and the trainer deleted it meanwhile: the hold has it
    restarted = run.open_retention()
    restarted.reconcile()  # the daemon's first look at the output dir after a start
    assert run.kept() == ["checkpoint-20", "checkpoint-10"]
    assert not (run.best / METRIC / ".tmp-checkpoint-20").exists()
    assert run.held() == ["checkpoint-30-g1"]  # still waiting for its result
    assert (run.best / METRIC / "checkpoint-20" / "shards" / "part-0").read_text() == "step 20"


# --- across filesystems ---------------------------------------------------------------------------------------------


@pytest.fixture
def other_filesystem(tmp_path):
    """A results dir on another filesystem than tmp_path: /dev/shm (a tmpfs) where it is one."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ckpt-watch-test-"))
    if os.stat(folder).st_dev == os.stat(tmp_path).st_dev:
        shutil.rmtree(folder)
        pytest.skip("/dev/shm is on the same filesystem as the tests' temporary folder")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_across_filesystems_the_best_are_copied_with_one_warning(tmp_path, other_filesystem, caplog):
    with caplog.at_level(logging.WARNING, logger="ckpt-watch"):
        run = Run(tmp_path / "out", other_filesystem / "results", [10, 20, 30])
        assert not (run.best / ".held").exists() or run.held() == []  # no early hold: it would be a copy
        run.finish(10, 0.5)
        run.finish(20, 0.6)
        run.finish(30, 0.1)
    assert run.kept() == ["checkpoint-20", "checkpoint-10"]
    kept = run.best / METRIC / "checkpoint-20" / "model.safetensors"
    original = run.output / "checkpoint-20" / "model.safetensors"
    assert kept.read_bytes() == original.read_bytes() and os.stat(kept).st_ino != os.stat(original).st_ino
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "copied there instead" in warnings[0], warnings


def test_across_filesystems_without_copies_nothing_is_kept(tmp_path, other_filesystem, caplog):
    with caplog.at_level(logging.WARNING, logger="ckpt-watch"):
        run = Run(tmp_path / "out", other_filesystem / "results", [10, 20], keep_best_copy=False)
        run.finish(10, 0.5)
        run.finish(20, 0.6)
    assert not (run.best / METRIC).exists()
    [rule] = read_index(run.best)["rules"]
    assert [(e["checkpoint"], e["path"], e["note"]) for e in rule["kept"]] == [
        ("checkpoint-20", None, "another filesystem and keep_best_copy = false"),
        ("checkpoint-10", None, "another filesystem and keep_best_copy = false")]  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keep_best_copy = false: nothing is kept" in warnings[0], warnings


# --- a real Trainer rotating its checkpoints away, the daemon keeping the best ---------------------------------------

PERPLEXITY = "ppl/perplexity"


# The first step of each job: wait until the test opens the gate (so that the trainer's rotation comes first, however
# loaded the machine), then read the weights the job was given.
GATE = """import json, os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
print(json.dumps({"gate/bytes": os.path.getsize(os.path.join(sys.argv[2], "model.safetensors"))}))
"""


def _config(folder: Path, keep_best: str) -> Path:
    config = folder / "watch.toml"
    gate, opened = folder / "gate.py", folder / "open"
    gate.write_text(GATE)
    # One attempt per job: a job whose checkpoint the trainer deletes under it must start again from the hold, not
    # fail (a failure would leave that checkpoint without a result).
    config.write_text(f'wandb = "off"\ntensorboard = "off"\nsettle = 0\nmax_attempts = 1\npreset = "ppl"\n'
                      f'{keep_best}\n[presets.ppl]\n[[presets.ppl.evaluators]]\nbackend = "command"\n'
                      f'command = ["{sys.executable}", "{gate}", "{opened}", "{{model_dir}}"]\n'
                      '[[presets.ppl.evaluators]]\nbackend = "probes"\nprobes = ["perplexity"]\n')  # fmt: skip
    return config


def _wait_for_daemon(predicate, what: str, log: Path) -> None:
    """wait_for, generously (other tests load the machine); a timeout says what the daemon logged."""
    try:
        wait_for(predicate, 300, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the daemon's log ends: {log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def rotated_run(tmp_path_factory):
    """A real Trainer run with save_total_limit=1 (checkpoint-10 .. -40; each one deleted by the next save) while the
    daemon runs with keep_best k=2 by held-out perplexity. Each save waits until the daemon holds the checkpoint (a
    trainer slower than detection), and jobs wait at a gate until training ends: the rotation deletes checkpoint-10,
    -20 and -30 before their results, -10 while its job runs.
    Returns the output dir, the config and the inode of each checkpoint's model.safetensors as saved."""
    from transformers import TrainerCallback

    from watcher.integrations.hf import CkptWatchCallback
    from watcher.tiny import train_tiny

    folder = tmp_path_factory.mktemp("rotated")
    output = folder / "output"
    output.mkdir()
    config = _config(folder, f'keep_best = [{{ metric = "{PERPLEXITY}", k = 2 }}]')
    inodes: dict[int, int] = {}

    class WaitForTheHold(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            inodes[step] = os.stat(output / f"checkpoint-{step}" / "model.safetensors").st_ino
            held = output / "ckpt-watch" / "best" / ".held" / f"checkpoint-{step}-g1"
            _wait_for_daemon(held.is_dir, f"the daemon to hold checkpoint-{step}", folder / "daemon.log")

    daemon = start_daemon(folder / "daemon.log", output, "--config", config, "--log-format", "plain")
    try:
        train_tiny(output, max_steps=40, save_steps=10, save_total_limit=1,
                   callbacks=[CkptWatchCallback(), WaitForTheHold()])  # fmt: skip
        (folder / "open").touch()  # the gate: evaluations may go on
        best_json = output / "ckpt-watch" / "best" / "best.json"

        def settled() -> bool:
            index = read_index(best_json.parent)
            done = len([line for line in (output / "ckpt-watch" / "results.jsonl").read_text().splitlines() if line]) \
                if (output / "ckpt-watch" / "results.jsonl").is_file() else 0  # fmt: skip
            return done == 4 and bool(index) and not any((best_json.parent / ".held").iterdir())

        _wait_for_daemon(settled, "4 results and no hold left", folder / "daemon.log")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    return output, config, inodes, (folder / "daemon.log").read_text()


def test_hard_links_survive_the_trainers_rotation(rotated_run):
    output, _config_file, inodes, log = rotated_run
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-40"]  # save_total_limit = 1
    results = [json.loads(line) for line in (output / "ckpt-watch" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["status"], r["attempt"]) for r in results) == [(10, "ok", 1), (20, "ok", 1),
                                                                                (30, "ok", 1), (40, "ok", 1)], log  # fmt: skip
    values = {r["step"]: r["metrics"][PERPLEXITY] for r in results}
    expected = sorted(values, key=lambda step: (values[step], step))[:2]  # lower perplexity is better
    [rule] = read_index(output / "ckpt-watch" / "best")["rules"]
    assert rule["mode"] == "min" and [e["step"] for e in rule["kept"]] == expected
    for step in expected:  # the very files the trainer wrote (same inode), though it deleted their folder
        kept = Path(rule["kept"][expected.index(step)]["path"])
        assert kept == output / "ckpt-watch" / "best" / "ppl" / "perplexity" / f"checkpoint-{step}"
        assert os.stat(kept / "model.safetensors").st_ino == inodes[step]
        assert (kept / "trainer_state.json").is_file() and (kept / "config.json").is_file()
    assert all(r["metrics"]["gate/bytes"] > 0 for r in results)  # every job read the weights ...
    for step in (20, 30):  # ... of rotated checkpoints from their holds
        assert f"checkpoint-{step}/regular/ppl: the trainer deleted it; evaluating the copy held in" in log
    assert "checkpoint-10/regular/ppl: the trainer deleted the checkpoint during the job; it starts again" in log


def test_best_prints_the_kept_checkpoints(rotated_run):
    output, _config_file, _inodes, _log = rotated_run
    [rule] = read_index(output / "ckpt-watch" / "best")["rules"]
    first = rule["kept"][0]
    text = ckpt_watch("best", output)
    assert text.returncode == 0, text.stderr
    assert f"{PERPLEXITY} (regular, lower is better): kept in" in text.stdout
    assert first["checkpoint"] in text.stdout and f"{first['value']:.4g}" in text.stdout
    as_json = ckpt_watch("best", output, "--json")
    [ranking] = json.loads(as_json.stdout)["rankings"]
    assert ranking["source"] == "best.json"
    assert [e["step"] for e in ranking["checkpoints"]] == [e["step"] for e in rule["kept"]]
    assert ranking["checkpoints"][0]["path_exists"] is True
    path_only = ckpt_watch("best", output, "--path-only")
    assert path_only.stdout == first["path"] + "\n" and path_only.returncode == 0


def test_best_ranks_results_jsonl_without_keep_best(rotated_run, tmp_path):
    output, _config_file, _inodes, _log = rotated_run
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    shutil.copy(output / "ckpt-watch" / "results.jsonl", results_dir)
    out = ckpt_watch("best", output, "--results-dir", results_dir, "--metric", PERPLEXITY, "--json")
    assert out.returncode == 0, out.stderr
    [ranking] = json.loads(out.stdout)["rankings"]
    assert ranking["source"] == "results.jsonl" and ranking["mode"] == "min" and len(ranking["checkpoints"]) == 4
    # Only checkpoint-40 is still where the trainer saved it: the others are marked deleted.
    assert [(e["step"] == 40) == e["original_exists"] for e in ranking["checkpoints"]] == [True] * 4
    text = ckpt_watch("best", output, "--results-dir", results_dir, "--metric", PERPLEXITY)
    assert "ranked from results.jsonl, not kept" in text.stdout and "(deleted)" in text.stdout
    maximum = ckpt_watch("best", output, "--results-dir", results_dir, "--metric", PERPLEXITY, "--mode", "max",
                         "--path-only")  # fmt: skip
    best_by_max = max(ranking["checkpoints"], key=lambda e: (e["value"], -e["step"]))
    if best_by_max["step"] == 40:
        assert maximum.stdout.strip() == str(output / "checkpoint-40")
    else:  # deleted by the rotation and not kept: one line, status 1
        assert maximum.returncode == 1 and "is no longer on disk" in maximum.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--metric", "nope/acc"], "has the metric 'nope/acc'; metrics: gate/bytes, ppl/nll_per_token, ppl/perplexity"),
    ([], "no keep_best rules in"),
    (["--top", "0", "--metric", PERPLEXITY], "--top must be a positive integer, got 0"),
])  # fmt: skip
def test_best_bad_input_is_one_line_and_status_2(rotated_run, tmp_path, arguments, message):
    output, _config_file, _inodes, _log = rotated_run
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    shutil.copy(output / "ckpt-watch" / "results.jsonl", results_dir)
    out = ckpt_watch("best", output, "--results-dir", results_dir, *arguments)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_best_without_results_is_one_line_and_status_2(tmp_path):
    out = ckpt_watch("best", tmp_path, "--metric", METRIC)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "no results in" in out.stderr
    missing = ckpt_watch("best", tmp_path / "nowhere")
    assert missing.returncode == 2 and "output dir not found" in missing.stderr



def test_a_hold_follows_a_marker_renamed_into_place_while_it_is_linked(tmp_path, monkeypatch):
    """The Trainer callback writes its sentinel as a temporary file renamed into place, possibly while the daemon
    (settle = 0) already links the folder: the hold has the sentinel, not the temporary file, and is not dropped."""
    from watcher import retention

    source = tmp_path / "checkpoint-10"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"w" * 100)
    (source / ".sentinel.tmp").write_text("{}")
    link = os.link

    def link_then_rename(src, dst, **kwargs):  # the rename lands between the walk's listing and this link
        if Path(src).name == ".sentinel.tmp" and Path(src).exists():
            os.rename(src, source / "ckpt-watch-complete.json")
        return link(src, dst, **kwargs)

    monkeypatch.setattr(retention.os, "link", link_then_rename)
    retention._link_tree(source, tmp_path / "held", copy_instead=False)
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == ["ckpt-watch-complete.json", "model.safetensors"]
