"""Helpers for tests that run the real daemon as a subprocess and read what it left on disk."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from watcher.sinks import read_results


def ckpt_watch(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", *map(str, args)], capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 300), **kwargs)  # fmt: skip


def start_daemon(log: Path, *args) -> subprocess.Popen:
    handle = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "watcher", *map(str, args)], stdout=handle, stderr=subprocess.STDOUT)


def results(output: Path) -> list[dict]:
    return read_results(output / "ckpt-watch")


def journal_rows(output: Path, sql: str) -> list[tuple]:
    db = output / "ckpt-watch" / "journal.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []


def job_states(output: Path) -> dict[str, str]:
    rows = journal_rows(output, "SELECT c.name, j.variant, j.state FROM jobs j JOIN checkpoints c ON c.id = j.checkpoint_id"
                                " ORDER BY c.generation")  # fmt: skip
    return {f"{name}/{variant}": state for name, variant, state in rows}


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
