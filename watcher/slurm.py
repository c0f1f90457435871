"""Slurm through its command-line tools: render a batch script, submit it, read job states, cancel.

No daemon knowledge here (watcher/slurm_jobs.py follows the jobs and journals them); this module only speaks
sbatch, squeue and scancel, each run with a timeout and the inherited environment (SLURM_CONF passes through).

Why the CLI and not submitit or pyslurm: submitit reads job states through `sacct`, which needs slurmdbd (and a
database) — without it `sacct` answers "Slurm accounting storage is disabled", with exit status 0, and many
clusters do not let users reach it anyway. pyslurm must be built against the cluster's exact Slurm version. The
commands are on every Slurm machine, and `squeue --states=all` still shows a finished job for MinJobAge (what
was measured on a real one-node Slurm 22.05: tests/slurm/README.md).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from watcher.config import SlurmSettings

COMMAND_TIMEOUT = 30.0
"""Seconds a Slurm command may take. A controller that is down makes squeue give up by itself (18 s with
Slurm's default MessageTimeout, measured); one that accepts but never answers would hang without this."""

SQUEUE_CHUNK = 200
"""Job ids per squeue call: one call for every job we follow, split only when there are hundreds."""

# Slurm's job states in which a job is not over yet (squeue %T spelling); every other state is terminal.
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
})  # fmt: skip

# What slurmstepd writes into the job's output when it kills a job over its --mem: by polling (task/none:
# "exceeded memory limit ... being killed", "Exceeded job memory limit"; the job ends FAILED) or after the kernel's
# OOM killer in a cgroup ("Detected 1 oom-kill event(s)"; the job ends OUT_OF_MEMORY). Measured: tests/slurm/README.md.
MEMORY_KILL = re.compile(r"exceeded (job )?memory limit|oom-kill", re.IGNORECASE)


class SlurmError(Exception):
    """A Slurm command failed or did not answer; str() is one line naming the command and Slurm's own first
    stderr line."""


@dataclass(frozen=True)
class SlurmJobState:
    slurm_id: str
    state: str
    """squeue's %T: PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL, ..."""
    reason: str
    """squeue's %r: Priority, Resources, JobHeldUser, None, NonZeroExitCode, TimeLimit, ..."""
    start_time: float | None = field(default=None, compare=False)
    """squeue's %S as a time.time() value, once the job runs or ran (while pending, %S is only Slurm's forecast)."""

    @property
    def finished(self) -> bool:
        """The job is over: a state outside Slurm's pending/running family."""
        return self.state not in ACTIVE_STATES


def missing_tools() -> str | None:
    """Why Slurm cannot be used from here, or None."""
    missing = [tool for tool in ("sbatch", "squeue", "scancel") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH (executor = \"slurm\" needs Slurm's command-line tools)"
    return None


def time_limit(seconds: float) -> str:
    """Slurm's --time text for `seconds`, rounded up to whole minutes (at least one: 0 would mean no limit)."""
    minutes = max(1, math.ceil(seconds / 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours:02d}:{minutes:02d}:00"
    return f"{days}-{clock}" if days else clock


def _directive_value(value: str) -> str:
    """A value for an #SBATCH line. sbatch splits these lines like a shell (checked: a quoted path with spaces or a
    single quote works, an unquoted one with a space is "Invalid directive"), so shlex.quote is the escaping."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"a line break cannot go into an #SBATCH line: {value!r}")
    return shlex.quote(value)


def _file_pattern(path: Path) -> str:
    """A path for --output/--error: Slurm expands %j, %x, ... there, and %% is a literal % (checked)."""
    return _directive_value(str(path).replace("%", "%%"))


def job_script(*, name: str, log: Path, workdir: Path, settings: SlurmSettings, gpus: int, time: str,
               commands: list[str]) -> str:  # fmt: skip
    """The batch script: #SBATCH options, then the `setup` lines, then `commands` (shell lines, as given).

    stdout and stderr both go to `log`, appended (a retried job adds to the same log). --no-requeue: Slurm would
    requeue a job after a node failure under the same id; ckpt-watch's own retries own that decision.
    Create `log`'s folder and `workdir` before sbatch: a job whose --output folder is missing ends FAILED
    (JobLaunchFailure) with no log at all, and one whose --chdir is missing runs in /tmp (measured)."""
    options = [
        f"--job-name={_directive_value(name)}",
        f"--output={_file_pattern(log)}",
        f"--error={_file_pattern(log)}",
        "--open-mode=append",
        f"--chdir={_directive_value(str(workdir))}",
        "--no-requeue",
        f"--time={_directive_value(time)}",
    ]
    if gpus > 0:
        kind = f"{_directive_value(settings.gpu_type)}:" if settings.gpu_type else ""
        options.append(f"--gres=gpu:{kind}{gpus}")
    for option, value in (("partition", settings.partition), ("account", settings.account), ("qos", settings.qos),
                          ("cpus-per-task", settings.cpus_per_task), ("mem", settings.mem),
                          ("constraint", settings.constraint)):  # fmt: skip
        if value is not None:
            options.append(f"--{option}={_directive_value(str(value))}")
    lines = ["#!/bin/bash"] + [f"#SBATCH {option}" for option in options]
    for entry in settings.extra:  # raw sbatch options, as the user wrote them
        entry = entry.strip()
        lines.append(entry if entry.startswith("#SBATCH") else f"#SBATCH {entry}")
    if settings.setup:
        lines += ["", "# [slurm] setup"] + list(settings.setup)
    lines += [""] + list(commands)
    return "\n".join(lines) + "\n"


def _run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run one Slurm command with a timeout; its result whatever the exit status. SlurmError only when it could not
    be run or did not answer in time."""
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError as e:
        if e.filename == argv[0]:
            raise SlurmError(f"{argv[0]}: not found on PATH (is Slurm installed here?)") from None
        raise SlurmError(f"{_shown(argv)} could not be run: {e}") from None  # its cwd is missing
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{_shown(argv)} did not answer within {COMMAND_TIMEOUT:g} s (is slurmctld up?)") from None
    except OSError as e:  # a cwd that is gone, a tool that is not executable
        raise SlurmError(f"{_shown(argv)} could not be run: {e}") from None


def _shown(argv: list[str]) -> str:
    """The command as one short line (squeue over hundreds of ids is cut)."""
    text = shlex.join(argv)
    return text if len(text) <= 160 else text[:157] + "..."


def _failure(argv: list[str], result: subprocess.CompletedProcess[str]) -> SlurmError:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    # Slurm's error comes first (e.g. "sbatch: error: invalid partition specified: nopart"); a warning may precede it.
    first = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no message")
    return SlurmError(f"{_shown(argv)} failed (exit status {result.returncode}): {first}")


def submit(script: Path, *, cwd: Path | None = None) -> str:
    """`sbatch --parsable SCRIPT`: the new job's id."""
    argv = ["sbatch", "--parsable", str(script)]
    result = _run(argv, cwd=cwd)
    if result.returncode != 0:
        raise _failure(argv, result)
    # --parsable prints "ID" or "ID;CLUSTER" (on a multi-cluster set-up).
    slurm_id = result.stdout.strip().split(";")[0]
    if not slurm_id.isdigit():
        raise SlurmError(f"{_shown(argv)} printed no job id: {result.stdout.strip()[:200]!r}")
    return slurm_id


def _unknown_id(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "invalid job id" in result.stderr.lower()


def _squeue(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    """Run squeue; None when Slurm knows none of the ids asked for."""
    result = _run(argv)
    if _unknown_id(result):
        return None
    if result.returncode != 0:
        raise _failure(argv, result)
    return result


def states(slurm_ids: Iterable[str]) -> dict[str, SlurmJobState]:
    """The state of each job Slurm still knows, finished ones included (for MinJobAge after their end); a purged
    or never-known id is absent. One squeue call for all (per SQUEUE_CHUNK ids)."""
    ids = list(dict.fromkeys(slurm_ids))
    found: dict[str, SlurmJobState] = {}
    for start in range(0, len(ids), SQUEUE_CHUNK):
        chunk = ids[start : start + SQUEUE_CHUNK]
        result = _squeue(["squeue", "-h", "--states=all", "-j", ",".join(chunk), "-o", "%i|%T|%r|%S"])
        if result is None and len(chunk) > 1:
            # squeue 22.05 leaves unknown ids out of a list and fails only for a single unknown id; should another
            # version fail for the whole list, ask one by one rather than lose the known ones.
            for slurm_id in chunk:
                found.update(states([slurm_id]))
            continue
        for line in result.stdout.splitlines() if result else []:
            slurm_id, state, reason, start = (line.split("|", 3) + ["", "", ""])[:4]
            if slurm_id.strip() in chunk:
                state = state.strip()
                found[slurm_id.strip()] = SlurmJobState(slurm_id.strip(), state, reason.strip(),
                                                        None if state == "PENDING" else _slurm_time(start))  # fmt: skip
    return found


def _slurm_time(text: str) -> float | None:
    """squeue's %S (`2026-11-28T01:50:00`, the controller's local time, as this host's when they share a zone, the
    usual case on one cluster) as time.time(); None for N/A, Unknown or anything else."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def find_by_name(name: str) -> list[str]:
    """Ids of the jobs named `name` that Slurm still knows (any state), oldest first: to adopt a job whose
    submission a killed daemon had not journaled yet."""
    if "," in name:  # squeue -n takes a comma-separated list
        raise ValueError(f"a Slurm job name with a comma cannot be looked up: {name!r}")
    result = _squeue(["squeue", "-h", "--states=all", "-n", name, "-o", "%i|%j"])
    ids = []
    for line in result.stdout.splitlines() if result else []:
        slurm_id, _, job_name = line.partition("|")
        if job_name == name:  # -n matches whole names; kept as a check of what we parse
            ids.append(slurm_id.strip())
    return sorted(ids, key=int)


def cancel(slurm_id: str) -> None:
    """`scancel ID`; a job that already ended, or that Slurm no longer knows, is not an error."""
    argv = ["scancel", slurm_id]
    result = _run(argv)
    # Slurm 22.05 answers 0 for both; other versions say "Invalid job id specified" or "already completing or
    # completed" with a non-zero status.
    if result.returncode != 0 and not re.search(r"invalid job id|already complet", result.stderr, re.IGNORECASE):
        raise _failure(argv, result)


def describe_end(state: SlurmJobState, log_tail: str) -> tuple[bool, str]:
    """For a finished job whose worker left no outcome file: (retry?, reason). The reason always names the Slurm
    state word (TIMEOUT, OUT_OF_MEMORY, ...), so users and tests can find it.

    The caller handles its own cancels (journaled before scancel) before asking: a CANCELLED job here was cancelled
    by someone else. A failure that would come back the same (time, memory, deadline, cancel) is not retried; one
    that may be the node's or the moment's (node failure, preemption, an exit status) is."""
    job, word = f"Slurm job {state.slurm_id}", state.state
    if word == "OUT_OF_MEMORY" or (word == "FAILED" and MEMORY_KILL.search(log_tail)):
        how = "" if word == "OUT_OF_MEMORY" else ", killed by slurmstepd over its memory limit"
        return False, f"{job} ran out of memory ({word}{how}); raise [slurm] mem"
    if word == "TIMEOUT":
        return False, f"{job} hit its time limit (TIMEOUT); raise [slurm] time"
    if word == "DEADLINE":
        return False, f"{job} passed its --deadline before it could finish (DEADLINE)"
    if word == "CANCELLED":
        return False, f"{job} was cancelled outside ckpt-watch (CANCELLED: scancel or an administrator)"
    if word == "COMPLETED":
        return True, f"{job} completed but its worker left no outcome (COMPLETED)"
    last_line = next((line.strip() for line in reversed(log_tail.splitlines()) if line.strip()), "")
    said = f": {last_line[:200]}" if last_line else ""
    return True, f"{job} ended {word} ({state.reason or 'no reason given'}){said}"
