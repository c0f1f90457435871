"""Evaluate a multimodal checkpoint with lmms-eval (EvolvingLMMs-Lab/lmms-eval), outside ckpt-watch's environment.

lmms-eval pins its own dependencies (for example an exact wandb), which cannot live in ckpt-watch's environment,
so it is never imported here. It runs in one of two places, configured once for all presets:

    [backends.lmms_eval]
    python = "/opt/lmms-eval/.venv/bin/python"     # local: `python -m lmms_eval ...` as a child process
    # server_url = "http://gpu-box:8000"           # or: a running `python -m lmms_eval serve` (exactly one)

Local mode runs lmms-eval's CLI in the job's child process environment (CUDA_VISIBLE_DEVICES already pinned),
with its output streamed into the job's log and its results JSON written under the job's workdir. Server mode
submits the job to lmms-eval's HTTP server (POST /evaluate, then GET /jobs/{id} until it ends); the server runs
the evaluation on a GPU of its own choosing (it ignores the request's `device`) and reports the results file as a
path, so the checkpoint and the output directory must be on a filesystem both sides see under the same path.

Both modes parse the results JSON the same way as the lm_eval backend ("task/metric", "@filter" when the filter
is not "none"). What this module relies on, from lmms-eval 0.7.3 (source paths in its repository):
  - lmms_eval/__main__.py (parse_eval_args, cli_evaluate_single): the CLI flags; results are saved by
    lmms_eval/loggers/evaluation_tracker.py (save_results_aggregated) as
    <output_path>/<sanitized model name>/<date>_results.json with keys results, groups, group_subtasks, configs,
    versions, n-shot, higher_is_better, n-samples, config, lmms_eval_version (git "branch@sha"), date,
    pretty_env_info, transformers_version, ... Note that cli_evaluate catches an exception of the evaluation,
    prints it and still exits 0 (lmms_eval/cli/dispatch.py, lmms_eval/__main__.py), so a missing results file, not
    the exit status, is what says a run failed.
  - lmms_eval/entrypoints/protocol.py (EvaluateRequest, JobInfo, JobStatus), entrypoints/http_server.py (routes)
    and entrypoints/job_scheduler.py (_build_eval_cmd, _parse_output_directory): a completed job's `result` is
    {model_name: {"results": "<path>_results.json", "samples": [...]}}; the request has no include_path and the
    command it builds has no --device.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence, TextIO

from watcher import processes
from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext
from watcher.evaluators.lmms_eval_options import LmmsEvalOptions, parse_options
from watcher.evaluators.lmms_eval_results import failure_reason, parse_results, read_results_file, versions_from_results
from watcher.evaluators.lmms_eval_server import run_on_server

# Model classes of lmms-eval 0.7.3 whose __init__ takes `device_map`; most default it to "auto" and then move
# inputs to "cuda" even on a CPU job (chat/huggingface.py, simple/qwen2_5_vl.py, simple/qwen2_vl.py,
# simple/qwen3_vl.py; simple/llava_hf.py defaults to ""). For these, local mode passes device_map=<the job's
# device> unless model_args set it: with CUDA_VISIBLE_DEVICES pinned, "cuda:0" is exactly the job's GPU.
_DEVICE_MAP_MODELS = frozenset({"huggingface", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_hf"})

# Variables of ours that would break, or hijack, another environment's interpreter. The distributed ones are
# the list lmms-eval's own server scrubs (entrypoints/job_scheduler.py, _SLURM_DISTRIBUTED_ENV_SCRUB, abridged):
# inherited, they make Accelerate attempt an env:// rendezvous.
_SCRUBBED_ENV = (
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT",
    "CONDA_PREFIX", "CKPT_WATCH_STATUS_FD",
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NPROCS", "SLURM_NODEID", "PMIX_RANK",
)  # fmt: skip
# Cheap: importlib.metadata and torch/version.py read as text, no heavy import (the metadata of a PyPI CUDA wheel
# says "2.11.0", torch/version.py "2.11.0+cu130").
_VERSIONS_SCRIPT = """
import importlib.metadata as m, importlib.util, json, os, platform, re
out = {"python": platform.python_version()}
for name in ("lmms_eval", "torch", "torchvision", "transformers"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
try:
    spec = importlib.util.find_spec("torch")
    text = open(os.path.join(os.path.dirname(spec.origin), "version.py")).read()
    out["torch"] = re.search(r"__version__\\s*=\\s*\\W([\\w.+-]+)", text).group(1)
except Exception:
    pass
print(json.dumps(out))
"""
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # loguru colours lmms-eval's log lines even into a pipe


class LmmsEvalBackend:
    name = "lmms_eval"

    def takes_loaded_model(self, options: dict[str, Any], devices: Sequence[str]) -> bool:
        return False  # lmms-eval runs in its own process (its own Python) and loads a model folder

    def check_options(self, options: dict[str, Any]) -> None:
        parse_options(options)

    def run(
        self, model_dir: Path, devices: Sequence[str], options: dict[str, Any], workdir: Path,
        context: JobContext | None = None,
    ) -> EvalOutput:
        opts = parse_options(options)
        model_dir = Path(model_dir).resolve()
        if not model_dir.is_dir():
            raise EvaluatorError(f"model dir {str(model_dir)!r} does not exist or is not a directory")
        if "," in str(model_dir):
            # lmms-eval splits --model_args on commas (utils.simple_parse_args_string) and keeps quotes verbatim.
            raise EvaluatorError(f"lmms-eval cannot take a model path containing a comma: {str(model_dir)!r}")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + opts.timeout if opts.timeout else None
        device = devices[0]  # lmms-eval's model classes load one copy: on several GPUs, the first
        if opts.server_url:
            return run_on_server(opts, model_dir, device, workdir, deadline)
        return _run_locally(opts, model_dir, device, workdir, deadline)


def _model_args_string(model_args: Mapping[str, Any]) -> str:
    """lmms-eval's "k=v,k=v" form; booleans as True/False, which its handle_arg_string turns back into bools."""
    return ",".join(f"{key}={value}" for key, value in model_args.items())


# --- local mode: python -m lmms_eval ---------------------------------------------------------------------------


def _run_locally(
    opts: LmmsEvalOptions, model_dir: Path, device: str, workdir: Path, deadline: float | None
) -> EvalOutput:
    assert opts.python is not None
    env = child_env(opts.python)
    versions = _interpreter_versions(opts.python, env, workdir)

    output = workdir / "lmms_eval_output"
    shutil.rmtree(output, ignore_errors=True)
    model_args = {"pretrained": str(model_dir), **opts.model_args}
    if opts.model in _DEVICE_MAP_MODELS:
        model_args.setdefault("device_map", device)
    argv = [str(opts.python), "-m", "lmms_eval",
            "--model", opts.model,
            "--model_args", _model_args_string(model_args),
            "--tasks", ",".join(opts.tasks),
            "--batch_size", str(opts.batch_size),
            "--device", device,
            "--output_path", str(output)]  # fmt: skip
    if opts.limit is not None:
        argv += ["--limit", str(opts.limit)]
    if opts.num_fewshot is not None:
        argv += ["--num_fewshot", str(opts.num_fewshot)]
    if opts.include_path is not None:
        argv += ["--include_path", str(opts.include_path)]

    print(f"[ckpt-watch] lmms_eval: {' '.join(argv)}", flush=True)
    code, tail = _run_streaming(argv, env, workdir, deadline, opts.timeout)
    if code != 0:
        raise RuntimeError(f"lmms-eval exited with status {code}: {tail}".rstrip(": "))
    results_file = find_results_file(output)
    if results_file is None:
        _raise_no_results(tail, f"lmms-eval wrote no results file under {output}")
    results = read_results_file(results_file)
    versions.update(versions_from_results(results))
    out = parse_results(results, versions)
    out.raw.update({"mode": "local", "argv": argv})
    return out


def child_env(python: Path) -> dict[str, str]:
    """Our environment, minus what would make another environment's interpreter load our packages.

    CUDA_VISIBLE_DEVICES (pinned by the daemon) and everything else are inherited. Our venv's bin directory is
    taken off PATH, so that lmms-eval's own subprocesses find its tools, not ours.
    """
    env = {key: value for key, value in os.environ.items() if key not in _SCRUBBED_ENV}
    ours = {str(Path(sys.prefix) / "bin"), str(Path(sys.exec_prefix) / "bin")}
    if os.environ.get("VIRTUAL_ENV"):
        ours.add(str(Path(os.environ["VIRTUAL_ENV"]) / "bin"))
    theirs = str(python.parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and (p not in ours or p == theirs)]
    env["PATH"] = os.pathsep.join([theirs, *[p for p in path if p != theirs]])
    env["PYTHONUNBUFFERED"] = "1"  # its log lines reach the job's log as they happen
    return env


def _interpreter_versions(python: Path, env: dict[str, str], workdir: Path) -> dict[str, str]:
    """lmms-eval's version and what it runs on, from its environment (cheap: importlib.metadata, no imports)."""
    try:
        done = processes.run([str(python), "-c", _VERSIONS_SCRIPT], env=env, cwd=workdir,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    except OSError as exc:
        raise EvaluatorError(f"lmms_eval python {str(python)!r} cannot be run: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"lmms_eval python {str(python)!r} did not answer a version query in 120 s") from None
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
        assert isinstance(found, dict)
    except (IndexError, ValueError, AssertionError):
        last = (done.stderr.strip().splitlines() or [""])[-1][:300]
        raise EvaluatorError(f"lmms_eval python {str(python)!r} is not a working Python interpreter: "
                             f"status {done.returncode} {last}".rstrip())  # fmt: skip
    if not found.get("lmms_eval"):
        raise EvaluatorError(f"lmms_eval python {str(python)!r} has no lmms-eval installed (pip install lmms-eval)")
    # Prefixed: a preset's evaluators share one versions dict, and this torch is not ckpt-watch's torch.
    return {("lmms_eval" if name == "lmms_eval" else f"lmms_eval.{name}"): str(version)
            for name, version in found.items() if version}  # fmt: skip


def _run_streaming(
    argv: list[str], env: dict[str, str], cwd: Path, deadline: float | None, timeout: float | None
) -> tuple[int, str]:
    """Run argv with its stdout/stderr copied line by line into ours (the job's log); return (status, reason).

    `reason` is the most telling recent line: the last exception line of a traceback, else the last loguru
    ERROR line, else the last line of stderr or stdout.
    """
    tails = {"out": collections.deque(maxlen=200), "err": collections.deque(maxlen=200)}
    try:
        # Its own process group, dying with the job (watcher/processes.py): no orphan keeps holding the GPU.
        proc = processes.spawn(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    except OSError as exc:
        raise EvaluatorError(f"lmms_eval python {argv[0]!r} cannot be run: {exc.strerror or exc}") from None
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, tails["out"]), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tails["err"]), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        processes.stop(proc)
        raise RuntimeError(f"lmms-eval timed out after {timeout:g} s (option 'timeout')") from None
    except BaseException:  # e.g. KeyboardInterrupt/SIGTERM handling: never leave it running
        processes.stop(proc)
        raise
    finally:
        for pump in pumps:
            pump.join(timeout=10)
    return proc.returncode, failure_reason(list(tails["err"]), list(tails["out"]))


def _pump(source, sink: TextIO, tail: collections.deque) -> None:
    for raw in iter(source.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError):
            pass
        tail.append(_ANSI.sub("", line.rstrip("\r\n").rsplit("\r", 1)[-1]))  # a tqdm bar: its last state
    source.close()


def find_results_file(output: Path) -> Path | None:
    """The newest `<output>/<model>/<date>_results.json` (evaluation_tracker.save_results_aggregated)."""
    found = sorted(output.glob("*/*_results.json"), key=lambda p: p.stat().st_mtime) if output.is_dir() else []
    return found[-1] if found else None


def _raise_no_results(reason: str, what: str):
    # lmms-eval exits 0 after catching an evaluation error; an unknown task is the preset's fault (permanent).
    missing = re.search(r"Tasks not found: ([^.]+)", reason)
    if missing:
        raise EvaluatorError(f"unknown lmms-eval task(s): {missing.group(1).strip()}")
    raise RuntimeError(f"{what}: {reason}" if reason else what)
