"""`ckpt-watch presets [--config FILE]`: list the presets (bundled and your own) and what each runs."""

from __future__ import annotations

import sys
from pathlib import Path


def describe_step(backend: str, options: dict) -> str:
    details = ", ".join(f"{key}={value}" for key, value in options.items())
    return f"{backend}({details})" if details else backend


def needs_network(preset) -> str:
    """Whether a preset's evaluators download something: "no", or "yes" with what would do without it.

    lm-eval tasks other than the bundled offline ones (and user task folders, `include_path`) fetch their data
    sets from the Hugging Face Hub unless the datasets cache already holds them; lmms-eval's tasks always do.
    """
    from watcher.evaluators.lm_eval_run import BUNDLED_TASKS

    answer = "no"
    for step in preset.evaluators:
        if step.backend == "lmms_eval":
            return "yes (lmms-eval's tasks download their data)"
        if step.backend == "lm_eval" and not step.options.get("include_path"):
            tasks = step.options.get("tasks", [])
            if any(task not in BUNDLED_TASKS for task in ([tasks] if isinstance(tasks, str) else tasks)):
                answer = "yes, or a warm datasets cache"
    return answer


def main(argv: list[str]) -> int:
    from watcher.cli.common import _Parser
    from watcher.config import load_toml
    from watcher.presets import load_presets

    parser = _Parser(prog="ckpt-watch presets", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a config file whose [presets.NAME] tables are included")
    args = parser.parse_args(argv)
    file_values = load_toml(args.config) if args.config else {}
    user = file_values.get("presets", {})
    # In file order (the bundled file is ordered by cost), user presets after the bundled ones.
    for name, preset in load_presets(user, file_values.get("backends", {})).items():
        budget = f"time budget {preset.time_budget:g} s" if preset.time_budget else "no time budget"
        origin = " [from config]" if name in user else ""
        print(f"{name}{origin} ({budget}; needs network: {needs_network(preset)}): {preset.description}")
        for step in preset.evaluators:
            print(f"    {describe_step(step.backend, step.options)}")
    sys.stdout.flush()
    return 0
