"""Shared, expensive fixtures. Everything here is session-scoped: build once, copy before mutating."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from helpers import marked, train_with_callback
from slurm_fixture import slurm_cluster  # noqa: F401  (a fixture: pytest finds it by name here)

# The Hugging Face Hub is unreachable here and must never be needed: every model and data set is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


# --- running in parallel (pytest-xdist; pyproject's addopts: -n auto --dist loadfile) -------------------------
#
# loadfile keeps each module on one worker, so a module- or session-scoped fixture that one module uses (the
# scanned run of test_status_plot, the lm-eval smoke run, producers' torchrun) is built once; a session fixture
# several modules share (trainer_output, factories' torchrun cache) is built at most once per worker.
# (--dist loadgroup with xdist_group marks would allow finer grouping, but pytest-xdist 3.8 cannot add its group
# suffix to pytest 9's node ids: every test is then scheduled on its own.)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test marked `serial` runs alone: it holds an exclusive lock that every other test holds shared.

    For tests that change something machine-wide (a sysctl) or assert timings (latency, watchdog intervals) that
    a second test's load on this 2-core VM could break. Without xdist there is nothing to wait for."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return (yield)
    # Each worker's base temp dir is popen-gwN inside the run's own, which pytest's retention cleans up.
    shared = item.config._tmp_path_factory.getbasetemp().parent
    mode = fcntl.LOCK_EX if item.get_closest_marker("serial") else fcntl.LOCK_SH
    with open(shared / "serial-tests.lock", "a") as lock:
        fcntl.flock(lock, mode)  # released when the file is closed
        return (yield)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """A test that uses the real Slurm cluster is marked `slurm`: `-m "not slurm"` leaves those out."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def trainer_output(tmp_path_factory) -> Path:
    """A real `transformers.Trainer` output dir with checkpoint-10, -20, -30 of the tiny model.

    Read-only: tests that change files must copy it first (see `copy_trainer_output`).
    """
    from watcher.tiny import train_tiny

    out = tmp_path_factory.mktemp("trainer-output")
    train_tiny(out, max_steps=30, save_steps=10)
    return out


@pytest.fixture
def copy_trainer_output(trainer_output, tmp_path):
    """A private copy of the Trainer output dir (metadata and mtimes preserved), safe to modify."""

    def _copy(name: str = "output") -> Path:
        dest = tmp_path / name
        shutil.copytree(trainer_output, dest)
        return dest

    return _copy


@pytest.fixture(scope="session")
def tiny_model_dir(trainer_output) -> Path:
    """A consolidated Hugging Face model folder (the last Trainer checkpoint). Read-only."""
    return trainer_output / "checkpoint-30"


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """An untrained tiny Qwen2-MoE model folder (4 experts, top-2, shared expert; MoE layers 0 and 2). Read-only."""
    from watcher.tiny import save_tiny_moe

    return save_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory) -> Path:
    """report_to="none", counting input tokens. Read-only."""
    out = tmp_path_factory.mktemp("hf-callback") / "output"
    train_with_callback(out, ["none"], include_num_input_tokens_seen=True)
    return out


@pytest.fixture(scope="session")
def wandb_run(tmp_path_factory) -> tuple[Path, Path]:
    """report_to W&B (offline) and TensorBoard. Returns (output dir, WANDB_DIR). Read-only."""
    root = tmp_path_factory.mktemp("hf-callback-wandb")
    out, wandb_dir = root / "output", root / "wandb-dir"
    wandb_dir.mkdir()
    env = {
        "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_PROJECT": "ckpt-watch-test",
        "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        import wandb

        try:
            train_with_callback(out, ["wandb", "tensorboard"])
        finally:
            wandb.finish()  # WandbCallback leaves the run open; no other test may see it
    return out, wandb_dir


@pytest.fixture(scope="session")
def wandb_server():
    """The wire-level stand-in W&B server (tests/wandb_standin.py), one for the session; tests use run ids of
    their own. A request it did not understand fails the session (see `wandb_online`)."""
    from wandb_standin import Server

    with Server() as server:
        yield server


@pytest.fixture
def wandb_online(wandb_server, monkeypatch, tmp_path):
    """The real `wandb` client (this process and its children) talking to the stand-in server."""
    for key, value in {"WANDB_BASE_URL": wandb_server.url, "WANDB_API_KEY": "k" * 40, "WANDB_MODE": "online",
                       "HOME": str(tmp_path), "WANDB_SILENT": "true", "WANDB_INIT_TIMEOUT": "30"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    for key in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_SERVICE"):
        monkeypatch.delenv(key, raising=False)
    yield wandb_server
    import sys

    if "wandb" in sys.modules:  # the W&B API used in this process keeps its settings (this URL, online): drop them
        sys.modules["wandb"].teardown()
    assert not wandb_server.unknown, f"requests the stand-in W&B server did not understand: {wandb_server.unknown}"


@pytest.fixture
def marker():
    """A unique CKPT_WATCH_TEST_MARKER value for a daemon's environment (helpers.marked_env); what still carries
    it when the test ends is killed, so a failed test leaves nothing to the next one."""
    value = uuid.uuid4().hex
    yield value
    for pid in marked(value):  # a failed test must not leave its processes to the next one
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
