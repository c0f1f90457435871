"""Helpers for tests that run the real daemon as a subprocess and read what it left on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors.torch import load_file

from watcher.journal import CheckpointRow, JobRow, JournalReader
from watcher.sinks import read_results

T = TypeVar("T")


def ckpt_watch(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", *map(str, args)], capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 300), **kwargs)  # fmt: skip


def start_daemon(log: Path, *args) -> subprocess.Popen:
    handle = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "watcher", *map(str, args)], stdout=handle, stderr=subprocess.STDOUT)


def results(output: Path) -> list[dict]:
    """The run's results.jsonl records as the JSON objects on disk (what a user's script reads)."""
    return [result.to_dict() for result in read_results(output / "ckpt-watch")]


def read_journal(output: Path, read: Callable[[JournalReader], T], empty: T) -> T:
    """`read(reader)` on the run's journal, read-only; `empty` while the daemon has not created it yet."""
    path = output / "ckpt-watch" / "journal.sqlite"
    if not path.is_file():
        return empty
    with JournalReader(path) as reader:
        return read(reader)


def journal_jobs(output: Path) -> list[JobRow]:
    return read_journal(output, JournalReader.jobs, [])


def journal_checkpoints(output: Path) -> list[CheckpointRow]:
    return read_journal(output, JournalReader.checkpoints, [])


def job_states(output: Path) -> dict[str, str]:
    """checkpoint/variant -> state; of a re-saved checkpoint, the newest generation's job."""
    return {f"{job.checkpoint.name}/{job.variant}": str(job.state) for job in journal_jobs(output)}


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_processes(spec_root: Path) -> list[int]:
    """PIDs of job child processes started for this results dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "watcher.worker" in cmdline and str(spec_root) in cmdline:
                pids.append(int(entry.name))
    return pids


# --- what is left of a daemon's processes ----------------------------------------------------------------
#
# A daemon started with a unique CKPT_WATCH_TEST_MARKER in its environment passes it to every process it starts,
# at any depth, so /proc/<pid>/environ shows what is left of an incarnation (see tests/test_processes.py).

MARKER = "CKPT_WATCH_TEST_MARKER"
LEFT_AFTER_KILL = 5.0  # the promise: nothing of a killed daemon is alive this many seconds later


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries `marker` (zombies have an empty environ and are not counted)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as handle:
                    if needle in handle.read().split(b"\0"):
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            lines.append(f"{pid}: {argv[:150]}")
        except OSError:
            pass
    return "\n".join(lines)


def assert_none_left(marker: str, what: str) -> None:
    deadline = time.monotonic() + LEFT_AFTER_KILL
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = marked(marker)
    assert not left, f"{what}: {len(left)} process(es) left {LEFT_AFTER_KILL:g} s after the kill:\n{describe(left)}"


def marked_env(marker: str) -> dict[str, str]:
    return {**os.environ, MARKER: marker, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}


# --- merged model folders ----------------------------------------------------------------------------------


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[5, 77, 130, 200, 31, 9]])
    with torch.no_grad():
        return model(ids).logits


STEPS, SAVE_STEPS, KEEP = 6, 2, 2  # checkpoint-2 is rotated away by save_total_limit; -4 and -6 stay


def train_with_callback(output_dir: Path, report_to: list[str], **arguments):
    """A few steps of the tiny Llama with the real Trainer, `CkptWatchCallback` added in the documented line."""
    from transformers import Trainer, TrainingArguments

    from watcher.integrations.hf import CkptWatchCallback
    from watcher.tiny import build_model, build_tokenizer, training_text

    tokenizer = build_tokenizer()
    ids = tokenizer(training_text()[:3000])["input_ids"]
    dataset = [{"input_ids": ids[i : i + 32], "labels": ids[i : i + 32]} for i in range(0, len(ids) - 32, 32)]
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        save_steps=SAVE_STEPS,
        save_strategy="steps",
        save_total_limit=KEEP,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=SAVE_STEPS,
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **arguments,
    )
    trainer = Trainer(model=build_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(CkptWatchCallback())
    trainer.train()
    return trainer


def sleep_preset_config(tmp_path: Path, preset: str, seconds: float, top: str = "") -> Path:
    """A config file (W&B and TensorBoard off, `top` lines first) whose preset `preset` is one `command` evaluator
    that sleeps `seconds` and prints a metric: a job of known length that needs no model, no GPU."""
    script = tmp_path / "sleep_job.py"
    script.write_text("import json, sys, time\ntime.sleep(float(sys.argv[1]))\nprint(json.dumps({'x': 1}))\n")
    config = tmp_path / "c.toml"
    config.write_text(f'wandb = "off"\ntensorboard = "off"\npreset = "{preset}"\n{top}'
                      f'[presets.{preset}]\n[[presets.{preset}.evaluators]]\nbackend = "command"\n'
                      f'command = ["{sys.executable}", "{script}", "{seconds}"]\n')  # fmt: skip
    return config


def with_steps(trainer_output: Path, destination: Path, steps: list[int]) -> Path:
    """A copy of the Trainer's output dir at `destination` with exactly these checkpoint steps: its
    checkpoint-10/20/30, and more made by copying checkpoint-30 with the step in trainer_state.json changed (so
    the completion rules accept them)."""
    shutil.copytree(trainer_output, destination)
    for step in steps:
        folder = destination / f"checkpoint-{step}"
        if not folder.exists():
            shutil.copytree(destination / "checkpoint-30", folder)
            state = json.loads((folder / "trainer_state.json").read_text())
            (folder / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}))
    for folder in destination.glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) not in steps:
            shutil.rmtree(folder)
    return destination
