"""What an lmms-eval run leaves behind, read the same way in local and server mode: its results JSON and, when it
fails, the most telling line of its log.

The results are flattened as the lm_eval backend's are ("task/metric", "@filter" when the filter is not "none");
the results file's layout is described in lmms_eval_backend.py's module docstring.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watcher.evaluators.base import EvalOutput
from watcher.evaluators.lm_eval_run import flatten_results, to_json_safe

# The results JSON's parts worth keeping; per-sample logs are never asked for (no --log_samples), and
# pretty_env_info/git hashes/task_hashes are environment noise.
_RAW_KEYS = (
    "results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
    "config", "date", "lmms_eval_version", "transformers_version", "throughput", "usage", "efficiency",
    "model_name", "total_evaluation_time_seconds",
)  # fmt: skip
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:?")


def failure_reason(err: list[str], out: list[str]) -> str:
    lines = [line.strip() for line in err if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:300]
    for line in reversed([line.strip() for line in out if line.strip()]):
        if "| ERROR" in line or "| CRITICAL" in line:
            return line.split(" - ", 1)[-1][:300]
    rest = lines or [line.strip() for line in out if line.strip()]
    return rest[-1][:300] if rest else ""


def read_results_file(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"lmms-eval results file {str(path)!r} is unreadable: {exc}") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise RuntimeError(f"lmms-eval results file {str(path)!r} has no 'results' table")
    return results


def parse_results(results: Mapping[str, Any], versions: dict[str, str] | None = None) -> EvalOutput:
    """Metrics flattened like lm-eval's ("task/metric", "@filter"), groups included; raw without samples."""
    metrics = flatten_results({task: v for task, v in results["results"].items() if isinstance(v, Mapping)})
    for name, values in (results.get("groups") or {}).items():
        if isinstance(values, Mapping):
            metrics.update(flatten_results({name: values}))
    raw = {key: to_json_safe(results[key]) for key in _RAW_KEYS if key in results}
    return EvalOutput(metrics=metrics, raw=raw, versions=dict(versions or {}))


def versions_from_results(results: Mapping[str, Any]) -> dict[str, str]:
    """What the results file says it ran on: transformers, and torch with its build tag (e.g. 2.11.0+cu130)."""
    versions = {}
    if isinstance(results.get("transformers_version"), str):
        versions["lmms_eval.transformers"] = results["transformers_version"]
    found = re.search(r"PyTorch version: (\S+)", str(results.get("pretty_env_info", "")))
    if found:
        versions["lmms_eval.torch"] = found.group(1)
    # Not "lmms_eval_version": it is `git describe` run in the eval's cwd (utils.get_lmms_eval_version_string),
    # so for a pip-installed lmms-eval it names whatever repository the workdir sits in, if any.
    return versions
