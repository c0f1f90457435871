"""At most once per (result, sink) across kill -9: W&B (offline, the real `wandb`) and TensorBoard deliveries
killed at random moments, restarted, killed again; in the end every point is there exactly once.

The deliverer is the daemon's own outbox and sinks in a child process (`HARNESS`), committing results
checkpoint by checkpoint and delivering after each, as the daemon does. Each kill takes the child's whole
process group and any process it started elsewhere (wandb-core), as the daemon's start-up does for a previous
incarnation's leftovers (issue 10, item 1). Set CKPT_WATCH_CRASH_SEED to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from watcher.journal import Journal
from watcher.sinks.tensorboard import read_points
from watcher.sinks.wandb_files import history_rows

CHECKPOINTS = 6  # x 2 variants = 12 results, one W&B delivery per checkpoint
KILLS = 5
HARNESS = r"""
import json, sys
from pathlib import Path
from watcher.journal import Journal
from watcher.outbox import Outbox
from watcher.records import JobState, Result
from watcher.sinks.tensorboard import TensorBoardSink
from watcher.sinks.wandb_run import WandbSink

root, checkpoints = Path(sys.argv[1]), int(sys.argv[2])
journal = Journal(root / "journal.sqlite")
journal.recover_interrupted()
wandb = WandbSink("p/crashrun", "defer", root / "output", root / "results", force=True)  # as `ckpt-watch sync`
outbox = Outbox(journal, [wandb, TensorBoardSink(root / "tb")])
for step in range(10, 10 * checkpoints + 1, 10):
    name = f"checkpoint-{step}"
    ckpt = journal.latest_checkpoint(name) or journal.add_checkpoint(name, step, root / name, "fp", "hf", ["regular", "ema"])
    journal.ensure_jobs((ckpt, v, "smoke") for v in ["regular", "ema"])
    # Every pending job, this checkpoint's and those a kill left behind: each result is named by its own job.
    for job in journal.jobs("smoke", [JobState.PENDING]):
        journal.start(job)
        own = job.checkpoint.step
        journal.finish(job.id, Result(result_id=f"{own}-{job.variant}", step=own, checkpoint=job.checkpoint.name,
                                      variant=job.variant, preset="smoke", status="ok",
                                      metrics={"arc/acc": own / 1000}))
    outbox.deliver_pending(force=True)
print(json.dumps(outbox.deliver_pending(force=True)))
"""


def _marked(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _kill_everything(process: subprocess.Popen, mark: str) -> int:
    """SIGKILL the harness's group and every process carrying its mark; returns how many there were."""
    alive = _marked(mark)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.monotonic() + 10
    while [pid for pid in _marked(mark) if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]:
        assert time.monotonic() < deadline, "processes outlived SIGKILL"
        time.sleep(0.05)
    return len(alive)


def test_kill_9_during_wandb_and_tensorboard_delivery_neither_loses_nor_repeats(tmp_path):
    seed = int(os.environ.get("CKPT_WATCH_CRASH_SEED", random.randrange(10**9)))
    rng = random.Random(seed)
    mark = f"CKPT_WATCH_CRASH_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path),
           mark.split("=")[0]: mark.split("=")[1]}  # fmt: skip
    command = [sys.executable, "-c", HARNESS, str(tmp_path), str(CHECKPOINTS)]
    start, kills = time.monotonic(), []
    for _ in range(KILLS):
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE)
        delay = rng.uniform(0.3, 4.0)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            kills.append((round(delay, 2), _kill_everything(process, mark)))
        else:
            kills.append((round(delay, 2), "ended"))
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    why = f"seed {seed} (CKPT_WATCH_CRASH_SEED={seed} replays it); kills (at s, processes): {kills}"
    print(why)
    assert finished.returncode == 0, f"{why}\n{finished.stderr[-2000:]}"
    assert json.loads(finished.stdout.strip().splitlines()[-1]) == {"wandb": 0, "tensorboard": 0}, why

    expected = Counter((step, prefix) for step in range(10, 10 * CHECKPOINTS + 1, 10) for prefix in ("eval", "eval_ema"))
    wandb_rows = [row for log in (tmp_path / "results" / "wandb").glob("offline-run-*/run-crashrun.wandb")
                  for row in history_rows(log)]  # fmt: skip
    seen = Counter((row["train/global_step"], key.split("/")[0]) for row in wandb_rows for key in row
                   if key.endswith("/arc/acc"))  # fmt: skip
    assert seen == expected, f"W&B rows: {why}"
    points = Counter((step, tag.split("/")[0]) for step, _, row in read_points(tmp_path / "tb") for tag in row)
    assert points == expected, f"TensorBoard points: {why}"
    journal = Journal(tmp_path / "journal.sqlite")
    assert journal.in_flight("wandb") == journal.in_flight("tensorboard") == set(), why
    journal.close()
    assert time.monotonic() - start < 90, why
