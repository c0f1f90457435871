"""The job's child process: prepare the weights, run the preset's evaluators, write the outcome to disk.

Run as `python -m watcher.worker SPEC.json` by `watcher.jobs`, with CUDA_VISIBLE_DEVICES already pinned, so
heavy work (torch, lm-eval) and any crash, out-of-memory kill or hang stay inside this process. It reports its
stage through a pipe (CKPT_WATCH_STATUS_FD) and writes its `Outcome` atomically to the spec's `outcome_path`;
stdout and stderr go to the job's log file.

With `--serve` it is a warm worker instead (watcher/warm.py): started once per slot, it takes that slot's jobs
one after another over a pipe, each run exactly as the one-shot worker runs it (`run_one`); see `serve`.

In a Slurm job (watcher/slurm_jobs.py) the same worker runs on a compute node: it reports its stage by appending
the same lines to a file (CKPT_WATCH_STATUS_FILE) in its job folder on the shared filesystem, merges into
CKPT_WATCH_SCRATCH (the node's local disk, removed at the end) and does not watch for the daemon's death (it
runs on another machine; Slurm stops it, with SIGTERM, when the job is cancelled or times out).

The status pipe carries one JSON object per line, each with a "stage"; progress rides along in optional keys:

    {"stage": "preparing"}
    {"stage": "preparing", "done": BYTES, "total": BYTES}          merged weights written (every <= 0.2 s, and last
                                                                  with done == total)
    {"stage": "evaluating", "step": I, "steps": N, "backend": NAME}   evaluator step I of N (1-based) begins

A reader must ignore keys it does not know (and lines that are not JSON objects with a "stage").
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import resource
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from watcher.evaluators.base import EvaluatorError, JobContext
from watcher.prepare import PrepareError
from watcher.processes import GUARD_GRACE, guard, stop_descendants
from watcher.records import JobSpec, Outcome, OutcomeKind


def _report_stage(stage: str, **progress: Any) -> None:
    """Tell the daemon (see the protocol above); byte progress is not echoed into the job's log."""
    line = (json.dumps({"stage": stage, **progress}) + "\n").encode()
    fd = os.environ.get("CKPT_WATCH_STATUS_FD")
    if fd:
        try:  # one short write() to a pipe is atomic: lines from the merge's copy threads never interleave
            os.write(int(fd), line)
        except OSError:
            pass
    status_file = os.environ.get("CKPT_WATCH_STATUS_FILE")
    if status_file:
        try:  # O_APPEND: each line is one write at the file's end, whichever thread reports
            with open(status_file, "ab", buffering=0) as handle:
                handle.write(line)
        except OSError:
            pass
    if "done" not in progress:
        extra = f" (step {progress['step']} of {progress['steps']}: {progress['backend']})" if progress else ""
        print(f"[ckpt-watch] stage: {stage}{extra}", flush=True)


def run_job(spec: JobSpec) -> Outcome:
    from watcher.evaluators import get_evaluator
    from watcher.prepare import prepare_input, verify_input

    workdir = spec.scratch_dir
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    stages: dict[str, dict[str, float]] = {}
    steps = spec.preset.evaluators
    evaluators = [get_evaluator(step.backend) for step in steps]
    # Loaded in this process by every step: a sharded checkpoint is then read from its shards, not merged (unless
    # the daemon keeps merged copies, which then must exist).
    in_process = all(e.takes_loaded_model(dict(s.options), spec.devices) for e, s in zip(evaluators, steps))

    _report_stage("preparing")
    start = time.time()
    model = prepare_input(spec.checkpoint_path, spec.variant, workdir, spec.base_model, layout=spec.layout,
                          progress=lambda done, total: _report_stage("preparing", done=done, total=total),
                          merge=spec.keep_merged or not in_process, checkpoint_name=spec.checkpoint_name)  # fmt: skip
    try:
        timings["prepare_s"] = round(time.time() - start, 3)
        stages["prepare"] = _stage_usage(start)
        start = time.time()
        verify_input(model)  # before any evaluator: every weight must load
        stages["verify"] = _stage_usage(start)

        if not steps:
            _report_stage("evaluating")
        context = JobContext(checkpoint=spec.checkpoint_name, step=spec.step, variant=spec.variant, model=model)
        metrics: dict[str, float] = {}
        nonfinite: dict[str, str] = {}
        raw: dict[str, Any] = {}
        versions: dict[str, str] = {}
        evaluate_start = time.time()
        for index, (step, evaluator) in enumerate(zip(steps, evaluators)):
            _report_stage("evaluating", step=index + 1, steps=len(steps), backend=step.backend)
            start = time.time()
            step_dir = workdir / f"{index}-{step.backend}"
            step_dir.mkdir(parents=True, exist_ok=True)
            options = dict(step.options)
            # A folder for a step that needs one (merged now if not yet); None for one that loads in-process.
            needs_folder = model.has_folder or not evaluator.takes_loaded_model(options, spec.devices)
            output = evaluator.run(model.folder() if needs_folder else None, spec.devices, options, step_dir, context)
            metrics.update(output.metrics)
            nonfinite.update(output.nonfinite)
            # Keyed by backend (what `compare` looks up); a second step of the same backend gets its index.
            raw[step.backend if step.backend not in raw else f"{step.backend}#{index}"] = output.raw
            versions.update(output.versions)
            stages[f"{index}-{step.backend}"] = _stage_usage(start)
        timings["evaluate_s"] = round(time.time() - evaluate_start, 3)
    finally:
        model.close()
    merged = model.merged_folder
    return Outcome(OutcomeKind.OK, metrics=metrics, nonfinite=nonfinite, raw=raw, versions=versions, timings=timings,
                   stages=stages, merged_model=str(merged) if merged else None)  # fmt: skip


def _stage_usage(start: float) -> dict[str, float]:
    """Walltime of a stage and the memory it needed.

    `peak_rss_mb` is this process's high-water mark so far (the kernel keeps only one; in a warm worker that includes
    its imports and earlier jobs), `children_peak_rss_mb`
    that of the largest finished subprocess (lm-eval ranks, a custom command); `gpu_peak_*_mb` are the peaks of
    this stage alone, when it used CUDA through torch in this process.
    """
    usage = {"walltime_s": round(time.time() - start, 3),
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if children:
        usage["children_peak_rss_mb"] = round(children / 1024, 1)
    torch = sys.modules.get("torch")  # never imported just to ask: the command backend needs no torch
    if torch is not None and torch.cuda.is_initialized():
        usage["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        usage["gpu_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        torch.cuda.reset_peak_memory_stats()
    return usage


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        return serve(argv[1:])
    spec = JobSpec.read(Path(argv[0]))
    node_scratch = os.environ.get("CKPT_WATCH_SCRATCH")
    if node_scratch:  # a Slurm job: scratch on the node, chosen there (see watcher/slurm_jobs.py)
        spec = replace(spec, scratch_dir=Path(node_scratch))
    # We and all we start go with the daemon (no orphan may hold the GPU); a Slurm job's daemon is elsewhere.
    guard(spec.parent_pid or None)
    slurm_job = os.environ.get("SLURM_JOB_ID")
    where = f" in Slurm job {slurm_job} on {os.uname().nodename}" if slurm_job else ""
    outcome, code = run_one(spec, where)
    if node_scratch and not os.environ.get("CKPT_WATCH_KEEP_SCRATCH"):
        shutil.rmtree(node_scratch, ignore_errors=True)  # the daemon cannot reach a node's local disk
    # Last: for a Slurm job its appearance is what tells the daemon the job is over.
    outcome.write(spec.outcome_path)
    return code


def run_one(spec: JobSpec, where: str = "") -> tuple[Outcome, int]:
    """One job, in either mode: `run_job` with every exception turned into a recorded `Outcome` (and the exit
    status the one-shot worker ends with); then whatever the evaluators left running is stopped."""
    print(f"[ckpt-watch] job {spec.job_id}: {spec.checkpoint_name} / {spec.variant} / {spec.preset.name} on "
          f"{spec.device}{where} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})", flush=True)  # fmt: skip
    try:
        outcome = run_job(spec)
        code = 0
    except FileNotFoundError as exc:
        # Usually the trainer's checkpoint rotation deleting the folder under us; the daemon decides.
        traceback.print_exc()
        outcome = Outcome.failure(f"file vanished: {exc}")
        code = 3
    except (PrepareError, EvaluatorError) as exc:
        # The checkpoint or the preset is wrong, not the moment: retrying would fail the same way.
        print(f"[ckpt-watch] {type(exc).__name__}: {exc}", flush=True)
        outcome = Outcome.failure(_first_line(exc), OutcomeKind.PERMANENT)
        code = 3
    except Exception as exc:  # noqa: BLE001 - any failure must become a recorded outcome, not a lost job
        traceback.print_exc()
        outcome = Outcome.failure(f"{type(exc).__name__}: {_first_line(exc)}".rstrip(": "))
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    stop_descendants(os.getpid(), GUARD_GRACE)  # what the evaluators left running (we are their subreaper)
    return outcome, code


# --- the warm worker: one process per slot, jobs one after another (watcher/warm.py is the daemon's side) ---


def serve(argv: list[str]) -> int:
    """`python -m watcher.worker --serve --parent PID --home FOLDER`: a warm worker.

    It imports torch and transformers once, then takes one request per line on stdin, {"spec": PATH, "log":
    PATH}, and runs that job as the one-shot worker would (`run_one`): its stdout and stderr (fds 1 and 2, so
    also what subprocesses print) appended to the job's log, its cwd the job's folder, its environment as it
    was before the job, stage reports through the same status pipe (CKPT_WATCH_STATUS_FD). After writing the
    job's outcome it answers one line on the reply pipe (CKPT_WATCH_REPLY_FD): {"done": JOB_ID, "ok": BOOL,
    "rss_mb": ..., "gpu_mb": ...}, the memory it still holds (the daemon recycles a worker that holds too
    much). End of stdin: it exits. SIGTERM (the daemon stops it, or the daemon died): its tree is stopped.
    """
    options = dict(zip(argv[::2], argv[1::2]))
    guard(int(options["--parent"]))
    home = Path(options["--home"])
    reply_fd = int(os.environ["CKPT_WATCH_REPLY_FD"])
    for module in ("torch", "transformers"):  # the point of a warm worker: imported once, not per job
        importlib.import_module(module)

    served = 0
    for line in sys.stdin:
        request = json.loads(line)
        spec = JobSpec.read(Path(request["spec"]))
        served += 1
        outcome = _serve_one(spec, Path(request["log"]), f" in warm worker {os.getpid()} (its job {served})")
        outcome.write(spec.outcome_path)
        os.chdir(home)
        reply = {"done": spec.job_id, "ok": outcome.ok, **_memory_held()}
        os.write(reply_fd, (json.dumps(reply) + "\n").encode())
    return 0


def _serve_one(spec: JobSpec, log: Path, where: str) -> Outcome:
    """`run_one` with fds 1 and 2 on the job's log, in the job's folder, in a copy of the environment."""
    environment = dict(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.chdir(spec.outcome_path.parent)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # each job's stages report their own GPU peaks
        outcome, _ = run_one(spec, where)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        os.environ.clear()
        os.environ.update(environment)
    return outcome


def _memory_held() -> dict[str, float]:
    """What this worker still holds once a job's objects are gone: resident memory, and the GPU memory torch's
    allocator keeps reserved (0 when no job leaked a tensor). Freed heap is handed back to the kernel first, so
    that RSS measures what is still in use rather than what glibc kept."""
    gc.collect()
    torch = sys.modules.get("torch")
    gpu_mb = 0.0
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        gpu_mb = round(torch.cuda.memory_reserved() / 2**20, 1)
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere RSS is simply read as it is
    except (OSError, AttributeError):
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        rss_mb = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # the peak: an upper bound
    return {"rss_mb": rss_mb, "gpu_mb": gpu_mb}


if __name__ == "__main__":
    sys.exit(main())
