"""A custom command as an evaluator: your own script, given the model folder, printing JSON metrics on stdout.

    [[presets.mine.evaluators]]
    backend = "command"
    command = ["python", "my_eval.py", "{model_dir}", "--step", "{step}"]
    timeout = 600          # seconds (optional)

The command is an argument list, never a shell string (nothing is interpreted by a shell, so paths with
spaces or quotes are safe). Placeholders: {model_dir} {step} {variant} {checkpoint} {device} {workdir}; a
literal brace is written {{ or }}, as in Python's str.format. It runs
in the job's child process environment, so CUDA_VISIBLE_DEVICES is already pinned. Its stdout must end with a
JSON object; nested objects are flattened with "/", and only finite numbers are kept as metrics. A top-level
"versions" object of strings ({"my_eval": "1.2"}) is recorded as the versions the job ran with, not as metrics.
{device} is "cpu", "cuda:0", or "cuda:0,1" on a job pinned to several GPUs.
"""

from __future__ import annotations

import json
import math
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext

PLACEHOLDERS = ("model_dir", "step", "variant", "checkpoint", "device", "workdir")
_OPTIONS = {"command", "timeout"}


class CommandBackend:
    name = "command"

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise EvaluatorError(f"unknown command option(s): {', '.join(sorted(unknown))}; known: command, timeout")
        command = options.get("command")
        if isinstance(command, str):
            raise EvaluatorError("command must be an argument list like [\"python\", \"eval.py\", \"{model_dir}\"], "
                                 "not a shell string")  # fmt: skip
        if not command or not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise EvaluatorError("command must be a non-empty list of strings")
        for argument in command:
            for _, field, _, _ in string.Formatter().parse(argument):
                if field is not None and field not in PLACEHOLDERS:
                    raise EvaluatorError(f"command: unknown placeholder {{{field}}}; known: "
                                         + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))  # fmt: skip
        timeout = options.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise EvaluatorError(f"command option 'timeout' must be a positive number of seconds, got {timeout!r}")

    def run(
        self, model_dir: Path, device: str, options: dict[str, Any], workdir: Path, context: JobContext | None = None
    ) -> EvalOutput:
        self.check_options(options)
        context = context or JobContext()
        values = {"model_dir": str(model_dir), "step": str(context.step), "variant": context.variant,
                  "checkpoint": context.checkpoint, "device": device, "workdir": str(workdir)}  # fmt: skip
        argv = [argument.format(**values) for argument in options["command"]]
        try:
            done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=options.get("timeout"))
        except FileNotFoundError:
            raise EvaluatorError(f"command not found: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"command timed out after {options['timeout']:g} s: {argv[0]}") from None
        print(done.stderr, end="", flush=True)  # into the job's log
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"command exited with status {done.returncode}: {tail[0][:300]}")
        output = _last_json_object(done.stdout)
        if output is None:
            raise EvaluatorError(f"command printed no JSON object on stdout: {argv[0]}")
        declared = output.pop("versions", None)
        versions = {str(k): str(v) for k, v in declared.items()} if isinstance(declared, dict) else {}
        versions["command"] = shutil.which(argv[0]) or argv[0]  # which program ran, e.g. a venv's python
        return EvalOutput(metrics=flatten(output), raw={"argv": argv, "output": output}, versions=versions)


def _last_json_object(stdout: str) -> dict | None:
    """The whole stdout as JSON, or else its last line that is a JSON object (scripts often log first)."""
    for text in [stdout, *reversed(stdout.strip().splitlines())]:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def flatten(value: dict, prefix: str = "") -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            metrics.update(flatten(item, name + "/"))
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item):
            metrics[name] = float(item)
    return metrics
