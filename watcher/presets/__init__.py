"""Evaluation presets as data: the bundled TOML file plus the user's `[presets.NAME]` tables.

A preset names the evaluators a job runs (backend + options), an optional time budget, and how many GPUs of the
pool one of its jobs takes (`gpus`, default 1). Presets are validated when the daemon starts, so a typo is a
one-line error before any checkpoint is touched.
"""

from __future__ import annotations

import math
import sys
from importlib import resources
from typing import Any

from watcher.config import ConfigError
from watcher.records import EvaluatorStep, Preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_PRESET_KEYS = {"description", "time_budget", "evaluators", "gpus"}


def bundled_tables() -> dict[str, Any]:
    text = resources.files("watcher.presets").joinpath("bundled.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_presets(
    user_tables: dict[str, Any] | None = None, backend_settings: dict[str, Any] | None = None
) -> dict[str, Preset]:
    """All presets by name: bundled ones, overridden or extended by the user's tables.

    `backend_settings` (the config's `[backends.NAME]` tables) fill in options of every evaluator of that
    backend; an evaluator entry's own option wins.
    """
    from watcher.evaluators import known_backends  # lazy: keeps the import light

    backend_settings = backend_settings or {}
    for backend in backend_settings:
        if backend not in known_backends():
            raise ConfigError(f"[backends.{backend}]: unknown backend; known backends: {', '.join(known_backends())}")
    tables = bundled_tables()
    tables.update(user_tables or {})
    return {name: _parse(name, table, backend_settings) for name, table in tables.items()}


def get_preset(
    name: str, user_tables: dict[str, Any] | None = None, backend_settings: dict[str, Any] | None = None
) -> Preset:
    presets = load_presets(user_tables, backend_settings)
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(presets))}")
    return presets[name]


def _parse(name: str, table: Any, backend_settings: dict[str, Any]) -> Preset:
    from watcher.evaluators import EvaluatorError, get_evaluator, known_backends  # lazy: keeps the import light

    if not isinstance(table, dict):
        raise ConfigError(f"preset {name!r} must be a table")
    unknown = set(table) - _PRESET_KEYS
    if unknown:
        raise ConfigError(f"unknown key '{sorted(unknown)[0]}' in preset {name!r}")
    evaluators = table.get("evaluators", [])
    if not isinstance(evaluators, list):
        raise ConfigError(f"preset {name!r}: evaluators must be a list of [[{name}.evaluators]] tables")
    steps = []
    for entry in evaluators:
        if not isinstance(entry, dict):
            raise ConfigError(f"preset {name!r}: each evaluator must be a table with a 'backend' key")
        backend = entry.get("backend")
        if backend not in known_backends():
            raise ConfigError(
                f"preset {name!r}: unknown backend {backend!r}; known backends: {', '.join(known_backends())}"
            )
        options = {**backend_settings.get(backend, {}), **{k: v for k, v in entry.items() if k != "backend"}}
        try:
            get_evaluator(backend).check_options(options)
        except EvaluatorError as exc:
            raise ConfigError(f"preset {name!r}: {exc}") from None
        steps.append(EvaluatorStep(backend, options))
    if not steps:
        raise ConfigError(f"preset {name!r} runs no evaluator: add at least one [[{name}.evaluators]] entry")
    budget = table.get("time_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):  # fmt: skip
        raise ConfigError(f"preset {name!r}: time_budget must be a positive number of seconds, got {budget!r}")
    gpus = table.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"preset {name!r}: gpus must be a positive integer (GPUs one job takes), got {gpus!r}")
    return Preset(name, str(table.get("description", "")), float(budget) if budget else None, tuple(steps), gpus)
