"""Evaluation backends, looked up by name.

Backends are imported only when asked for: the daemon imports this package to validate
configuration, and must not pay for (or depend on) torch and lm_eval; only a job's child
process actually runs an evaluator.
"""

from __future__ import annotations

import importlib

from watcher.evaluators.base import EvalOutput, Evaluator, EvaluatorError, JobContext

__all__ = ["EvalOutput", "Evaluator", "EvaluatorError", "JobContext", "get_evaluator", "known_backends"]

# backend name -> (module, class); strings so that listing backends imports nothing.
_BACKENDS: dict[str, tuple[str, str]] = {
    "lm_eval": ("watcher.evaluators.lm_eval_backend", "LmEvalBackend"),
    "probes": ("watcher.evaluators.probes", "ProbesBackend"),
    "command": ("watcher.evaluators.command", "CommandBackend"),
    "lmms_eval": ("watcher.evaluators.lmms_eval_backend", "LmmsEvalBackend"),
}


def known_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_evaluator(backend: str) -> Evaluator:
    """A fresh instance of the backend registered as `backend`."""
    try:
        module_name, class_name = _BACKENDS[backend]
    except (KeyError, TypeError):
        raise EvaluatorError(
            f"unknown evaluator backend {backend!r}; known backends: {', '.join(known_backends())}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)()
