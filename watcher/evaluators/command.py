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
from typing import Any, Sequence

from watcher import processes
from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext, reject_unknown_options
from watcher.evaluators.lm_eval_run import to_json_safe
from watcher.records import device_text

PLACEHOLDERS = ("model_dir", "step", "variant", "checkpoint", "device", "workdir")
_OPTIONS = {"command", "timeout"}
# An argument ending like this names a script: relative to the config file, and checked at start-up.
SCRIPT_SUFFIXES = (".py", ".sh", ".bash", ".pl", ".rb", ".jl", ".r", ".R", ".lua", ".js")
OUTPUT_EXCERPT = 300  # characters of a failed command's output quoted in its error
# What a program (or its interpreter: python, bash) prints when a file it was told to open does not exist.
_FILE_NOT_FOUND = ("No such file or directory", "can't open file")


def resolve_command_paths(base: Path, command: Any) -> Any:
    """A config file's `command` list with its relative paths made absolute against the file's folder `base`.

    A path is an argument with a "/" or a script suffix (my_eval.py) or that names a file next to the config;
    options ("-m", "--step"), placeholders, module names (`-m my_package`) and bare program names ("python",
    found on PATH) stay as they are. Anything that is not a list of strings is left for `check_options` to report.
    """
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return command
    resolved = []
    for index, argument in enumerate(command):
        looks_like_path = "/" in argument or argument.endswith(SCRIPT_SUFFIXES) or (base / argument).is_file()
        if index == 0 and "/" not in argument:
            looks_like_path = (base / argument).is_file()  # "python" is a program on PATH unless it is right here
        if argument and looks_like_path and "{" not in argument and not argument.startswith("-"):
            path = Path(argument).expanduser()
            argument = str(path if path.is_absolute() else (base / path).resolve())
        resolved.append(argument)
    return resolved


def _missing_files(command: list[str]) -> str | None:
    """The first program or script of `command` that does not exist, as an error message, or None."""
    program = command[0]
    if "{" not in program:
        if "/" in program and not Path(program).is_file():
            return f"command not found: {program}"
        if "/" not in program and shutil.which(program) is None:
            return f"command not found: {program} (not on PATH)"
    for argument in command[1:]:
        if Path(argument).is_absolute() and argument.endswith(SCRIPT_SUFFIXES) and not Path(argument).exists():
            return f"command: script not found: {argument} (relative paths are relative to the config file)"
    return None


def excerpt(text: str, limit: int = OUTPUT_EXCERPT) -> str:
    """The start of a program's output on one line (an error message is one line), at most `limit` characters."""
    flat = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class CommandBackend:
    name = "command"

    def takes_loaded_model(self, options: dict[str, Any], devices: Sequence[str]) -> bool:
        return False  # the command runs in its own process and reads a model folder

    def check_options(self, options: dict[str, Any]) -> None:
        reject_unknown_options("command", options, _OPTIONS)
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
        missing = _missing_files(command)
        if missing:
            raise EvaluatorError(missing)
        timeout = options.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise EvaluatorError(f"command option 'timeout' must be a positive number of seconds, got {timeout!r}")

    def run(
        self, model_dir: Path, devices: Sequence[str], options: dict[str, Any], workdir: Path,
        context: JobContext | None = None,
    ) -> EvalOutput:
        self.check_options(options)
        context = context or JobContext()
        values = {"model_dir": str(model_dir), "step": str(context.step), "variant": context.variant,
                  "checkpoint": context.checkpoint, "device": device_text(devices),
                  "workdir": str(workdir)}  # fmt: skip
        argv = [argument.format(**values) for argument in options["command"]]
        Path(workdir).mkdir(parents=True, exist_ok=True)  # its cwd: a missing one read as "command not found"
        try:
            # Its own process group, dying with the job: a timeout stops everything the command started.
            done = processes.run(argv, cwd=workdir, capture_output=True, text=True, timeout=options.get("timeout"))
        except FileNotFoundError:
            raise EvaluatorError(f"command not found: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"command timed out after {options['timeout']:g} s: {argv[0]}") from None
        # Both streams into the job's log (this process's stdout is that log), so a failure can be read there.
        print(f"[ckpt-watch] command: {argv}\n[ckpt-watch] its stdout:\n{done.stdout}", end="", flush=True)
        print(f"\n[ckpt-watch] its stderr:\n{done.stderr}", end="\n", flush=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [excerpt(done.stdout)]
            message = f"command exited with status {done.returncode}: {tail[0][:OUTPUT_EXCERPT]}"
            if any(marker in done.stderr for marker in _FILE_NOT_FOUND):
                raise EvaluatorError(message)  # a missing file stays missing: retrying would fail the same way
            raise RuntimeError(message)
        output = _last_json_object(done.stdout)
        if output is None:
            printed = excerpt(done.stdout) or "nothing"
            raise EvaluatorError(f"command printed no JSON object on stdout: {argv[0]}; it printed: {printed}")
        declared = output.pop("versions", None)
        versions = {str(k): str(v) for k, v in declared.items()} if isinstance(declared, dict) else {}
        versions["command"] = shutil.which(argv[0]) or argv[0]  # which program ran, e.g. a venv's python
        nonfinite: dict[str, str] = {}
        metrics = flatten(output, nonfinite=nonfinite)
        # json.loads takes NaN and Infinity; the journal's JSON does not: they are kept as strings in the raw output
        return EvalOutput(metrics=metrics, raw={"argv": argv, "output": to_json_safe(output)}, versions=versions,
                          nonfinite=nonfinite)  # fmt: skip


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


def flatten(value: dict, prefix: str = "", nonfinite: dict[str, str] | None = None) -> dict[str, float]:
    """Nested numbers as "a/b" metrics; NaN and infinite ones go to `nonfinite` (name -> "nan"/"inf"/"-inf")."""
    metrics: dict[str, float] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            metrics.update(flatten(item, name + "/", nonfinite))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            if math.isfinite(item):
                metrics[name] = float(item)
            elif nonfinite is not None:
                nonfinite[name] = str(float(item))
    return metrics
