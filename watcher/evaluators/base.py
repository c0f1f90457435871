"""The contract between a job's child process and the evaluation backends.

The daemon imports this module (through `watcher.evaluators`), so it must stay free of heavy
imports: no torch, no lm_eval. Backends do their heavy importing inside `run()`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

if TYPE_CHECKING:  # a type only: importing it here would not cost much, but the daemon needs none of it
    from watcher.model_input import ModelInput


@dataclass
class EvalOutput:
    """What one evaluation of one checkpoint produced."""

    metrics: dict[str, float]  # flat, "task/metric" -> finite float; never NaN/inf/"N/A"
    raw: dict  # JSON-serialisable raw backend output, without per-sample logs
    versions: dict[str, str]  # versions of the backend and what it ran on, e.g. {"lm_eval": "0.4.13"}
    # Metrics the backend reported as NaN or infinite, kept out of `metrics` (nothing can plot or rank them):
    # "task/metric" -> "nan" | "inf" | "-inf". The alert rules' `nan` condition reads them (watcher/alerts.py).
    nonfinite: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobContext:
    """What is being evaluated, for backends that hand it on (the custom command's placeholders), and the job's
    model: one watcher.model_input.ModelInput shared by every step of the preset, so that the model is loaded
    once per job (`model.load(device)`) and a sharded checkpoint is merged only if a step asks for a folder."""

    checkpoint: str = ""
    step: int = 0
    variant: str = "regular"
    model: "ModelInput | None" = None


def is_int(value: Any) -> bool:
    """An integer option value (TOML gives int; bool is not one, though Python says it is)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class EvaluatorError(RuntimeError):
    """The evaluation request itself is wrong (unknown task or backend, bad option, bad model dir).

    The message is one line meant for the user, so callers can report it without a traceback.
    """


def reject_unknown_options(backend: str, options: Iterable[str], known: Iterable[str]) -> None:
    """EvaluatorError naming the option names that `backend` does not know, and those it does.

    Rejected rather than ignored: a misspelt "limit" would silently turn a quick eval into a full one.
    """
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise EvaluatorError(f"unknown {backend} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")


class Evaluator(Protocol):
    name: str

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise EvaluatorError if the options are wrong. Cheap and import-light: the daemon calls it when it
        loads presets, so a typo in a preset stops the daemon at start, not every job later."""
        ...

    def takes_loaded_model(self, options: dict[str, Any], devices: Sequence[str]) -> bool:
        """Whether `run` with these options on these devices can work from `context.model` alone, in this
        process (its `load`, `specs` and `config`), with `model_dir` None. When every step of a preset says so,
        a sharded checkpoint is not merged: the model is loaded straight from its shards. Cheap and import-light,
        like check_options (called before the prepare stage)."""
        ...

    def run(
        self, model_dir: Path | None, devices: Sequence[str], options: dict[str, Any], workdir: Path,
        context: JobContext | None = None,
    ) -> EvalOutput:
        """Evaluate the model in `model_dir` on `devices`: ("cpu",), ("cuda:0",), or ("cuda:0", "cuda:1") for a job
        pinned to several GPUs (watcher.records.JobSpec.devices; CUDA_VISIBLE_DEVICES renumbers them from 0). A
        backend that uses one GPU takes the first, one that can spread work takes them all.

        `workdir` is a private scratch directory for this job; `model_dir` is never written to. The worker passes
        `context.model` too: a backend that loads the model in this process takes it from `context.model.load()`
        (the job's one load), and `model_dir` is None when the backend said it `takes_loaded_model` (it may still
        call `context.model.folder()`, which then merges). Without `context.model` (a direct call) `model_dir` is
        a model folder.
        """
        ...

