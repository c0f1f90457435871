"""The lmms_eval backend's options: checked up front (no lmms-eval, no network), shared by both modes.

Local mode (lmms_eval_backend.py) and server mode (lmms_eval_server.py) both take an LmmsEvalOptions; the
module docstring of lmms_eval_backend.py says what the options mean and which lmms-eval behaviour they follow.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher.evaluators.base import EvaluatorError, is_int, is_number, reject_unknown_options

# lmms-eval's model class for LLaVA-family Hugging Face checkpoints (lmms_eval/models/simple/llava_hf.py and
# chat/llava_hf.py: llava, llava_next, llava_onevision via AutoProcessor): the one verified end to end here.
# Other architectures name their class in `model` (qwen2_5_vl, qwen3_vl, internvl_hf, ...). lmms-eval's generic
# `huggingface` class would be the natural default, but in 0.7.3 it passes `audios=` to the processor, which
# transformers 5 rejects ("You passed keyword argument `audios` which is deprecated").
DEFAULT_MODEL = "llava_hf"
DEFAULT_BATCH_SIZE = 1  # lmms-eval's own default; many of its model classes only implement batch size 1
DEFAULT_POLL_INTERVAL = 5.0

_KNOWN_OPTIONS = frozenset({
    "tasks", "model", "model_args", "limit", "batch_size", "num_fewshot", "include_path",
    "python", "server_url", "output_dir", "poll_interval", "timeout",
})  # fmt: skip


@dataclass(frozen=True)
class LmmsEvalOptions:
    tasks: list[str]
    model: str = DEFAULT_MODEL
    model_args: dict[str, Any] = field(default_factory=dict)
    limit: int | float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_fewshot: int | None = None
    include_path: Path | None = None
    python: Path | None = None
    server_url: str | None = None
    output_dir: Path | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    timeout: float | None = None


def parse_options(options: Mapping[str, Any]) -> LmmsEvalOptions:
    """Validate the user's options up front (cheap: no lmms-eval, no network), so a preset typo stops the daemon."""
    if not isinstance(options, Mapping):
        raise EvaluatorError(f"lmms_eval options must be a table, got {type(options).__name__}")
    reject_unknown_options("lmms_eval", options, _KNOWN_OPTIONS)

    python, server_url = options.get("python"), options.get("server_url")
    if python is None and server_url is None:
        raise EvaluatorError(
            "lmms_eval needs its own environment: configure exactly one of 'python' or 'server_url', e.g. "
            '[backends.lmms_eval] python = "/path/to/lmms-eval-venv/bin/python" '
            '(or server_url = "http://host:8000")'
        )
    if python is not None and server_url is not None:
        raise EvaluatorError("lmms_eval options 'python' and 'server_url' exclude each other: configure one")

    tasks = options.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks or not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t for t in tasks):
        raise EvaluatorError("lmms_eval option 'tasks' must be a non-empty list of task names")
    bad = [t for t in tasks if "," in t]
    if bad:
        raise EvaluatorError(f"lmms_eval task names cannot contain commas: {bad[0]!r}; list them separately")

    model = options.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model or not re.fullmatch(r"[\w.\-]+", model):
        raise EvaluatorError(f"lmms_eval option 'model' must be an lmms-eval model name, got {model!r}")

    model_args = options.get("model_args") or {}
    if not isinstance(model_args, Mapping):
        raise EvaluatorError(f"lmms_eval option 'model_args' must be a table, got {model_args!r}")
    if "pretrained" in model_args:
        raise EvaluatorError("lmms_eval option 'model_args' must not set 'pretrained': the checkpoint is the model")
    for key, value in model_args.items():
        if not re.fullmatch(r"\w+", str(key)):
            raise EvaluatorError(f"lmms_eval model_args key {key!r} is not a plain name")
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and "," in value):
            # Everything becomes one "k=v,k=v" string for lmms-eval, which splits it on commas.
            raise EvaluatorError(
                f"lmms_eval model_args.{key} must be a string without commas, a number or a boolean, got {value!r}"
            )

    limit = options.get("limit")
    if limit is not None and (not is_number(limit) or not 0 < limit < math.inf):
        raise EvaluatorError(f"lmms_eval option 'limit' must be a positive number (<1 is a fraction), got {limit!r}")

    batch_size = options.get("batch_size", DEFAULT_BATCH_SIZE)
    if not (is_int(batch_size) and batch_size > 0):
        raise EvaluatorError(f"lmms_eval option 'batch_size' must be a positive integer, got {batch_size!r}")

    num_fewshot = options.get("num_fewshot")
    if num_fewshot is not None and (not is_int(num_fewshot) or num_fewshot < 0):
        raise EvaluatorError(f"lmms_eval option 'num_fewshot' must be a non-negative integer, got {num_fewshot!r}")

    include_path = _single_path(options, "include_path")
    if include_path is not None and not include_path.is_dir():
        raise EvaluatorError(f"lmms_eval include_path {str(include_path)!r} is not a directory")
    output_dir = _single_path(options, "output_dir")

    for key in ("poll_interval", "timeout"):
        value = options.get(key)
        if value is not None and (not is_number(value) or not 0 < value < math.inf):
            raise EvaluatorError(f"lmms_eval option {key!r} must be a positive number of seconds, got {value!r}")

    if python is not None:
        for key in ("output_dir", "poll_interval"):
            if key in options:
                raise EvaluatorError(f"lmms_eval option {key!r} is for server mode (server_url) only")
        if not isinstance(python, (str, Path)) or not str(python):
            raise EvaluatorError(f"lmms_eval option 'python' must be the path of an interpreter, got {python!r}")
        python = Path(python).expanduser()
        if not python.is_absolute():
            raise EvaluatorError(f"lmms_eval option 'python' must be an absolute path, got {str(python)!r}")
        if not python.is_file() or not os.access(python, os.X_OK):
            raise EvaluatorError(f"lmms_eval python {str(python)!r} does not exist or is not executable")
    else:
        if not isinstance(server_url, str) or urllib.parse.urlsplit(server_url).scheme not in ("http", "https") \
                or not urllib.parse.urlsplit(server_url).netloc:  # fmt: skip
            raise EvaluatorError(f"lmms_eval option 'server_url' must be an http(s) URL, got {server_url!r}")
        if include_path is not None:
            raise EvaluatorError(
                "lmms_eval option 'include_path' does not work with server_url: the server's POST /evaluate has no "
                "such field; install the tasks in the server's lmms-eval instead"
            )
        server_url = server_url.rstrip("/")

    return LmmsEvalOptions(
        tasks=list(tasks),
        model=model,
        model_args=dict(model_args),
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        include_path=include_path,
        python=python,
        server_url=server_url,
        output_dir=output_dir,
        poll_interval=float(options.get("poll_interval", DEFAULT_POLL_INTERVAL)),
        timeout=float(options["timeout"]) if options.get("timeout") is not None else None,
    )


def _single_path(options: Mapping[str, Any], key: str) -> Path | None:
    value = options.get(key)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]  # lmms-eval's --include_path takes one directory
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value):
        raise EvaluatorError(f"lmms_eval option {key!r} must be one directory path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise EvaluatorError(f"lmms_eval option {key!r} must be an absolute path, got {str(path)!r}")
    return path
