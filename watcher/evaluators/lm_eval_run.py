"""One lm-eval run in this process (`lm_eval.simple_evaluate`): the options, the tasks, the results.

Used by the lm_eval backend (lm_eval_backend.py) for a run on one device, and by each rank of a data-parallel
run (lm_eval_parallel.py).

Besides lm-eval's own tasks and any user task directories (`include_path`), the bundled offline
tasks of `watcher/data/tasks/` (`ckpt_watch_smoke_mc`, `ckpt_watch_smoke_ppl` and their group
`ckpt_watch_smoke`) are always available. Their YAMLs are templates: `datasets` resolves relative
`data_files` against the process's cwd, not against the YAML, so they are rendered with the absolute path of the
installed data and a private `datasets` cache, once, into a folder of the system's temporary directory that every
later job and process reuses (bundled_tasks_dir).

Per process too: lm-eval's task index. Building a TaskManager parses every task YAML under its paths (thousands
for lm-eval's own tasks, seconds), so one is built per set of task folders and kept; a job gets it with its own
metadata. A long-lived worker (one per slot) pays for it once.

Requests are not cached across jobs (simple_evaluate's `cache_requests`): they do not depend on the weights, but
lm-eval keys its cache file by task name and few-shot count only, in a folder shared by every process (inside its
own package unless LM_HARNESS_CACHE_PATH is set), and never by the task's YAML or data, so an edited task or a
user task of the same name as another would be served stale requests; and building them is milliseconds for the
bundled tasks.

On one device, with the `hf` model and the default dtype, the run takes the job's loaded model object
(watcher.model_input.ModelInput.load) instead of loading the folder again: `HFLM(pretrained=<model>)`.

torch, lm_eval and datasets are imported inside `evaluate()` only, so that importing this module is cheap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher.evaluators.base import EvalOutput, EvaluatorError, is_int, is_number, reject_unknown_options

if TYPE_CHECKING:
    from watcher.model_input import ModelInput

BUNDLED_TASKS = ("ckpt_watch_smoke", "ckpt_watch_smoke_mc", "ckpt_watch_smoke_ppl")

# A fixed size, not "auto", also on cuda: every checkpoint is then batched (and padded) the same
# way, so differences between checkpoints are not partly batching noise; "auto" would also re-probe
# the GPU with trial forward passes in every job, since each job is a fresh process.
DEFAULT_BATCH_SIZE = 8

_DATA_PLACEHOLDER = "__CKPT_WATCH_DATA__"
_CACHE_PLACEHOLDER = "__CKPT_WATCH_CACHE__"
_KNOWN_OPTIONS = frozenset(
    {"tasks", "limit", "num_fewshot", "batch_size", "dtype", "model", "include_path", "model_args"}
)
# HFLM arguments that still apply when it is handed a loaded model (the others are from_pretrained's, or pick a
# parallel mode): a step whose model_args stay within these can share the job's loaded model.
OBJECT_MODEL_ARGS = frozenset({
    "backend", "tokenizer", "truncation", "logits_cache", "max_length", "softmax_dtype", "mixed_precision_dtype",
    "max_batch_size", "add_bos_token", "prefix_token_id", "think_end_token", "enable_thinking", "chat_template_args",
    "use_fast_tokenizer",
})  # fmt: skip
# The parts of simple_evaluate's return worth keeping; "samples" (per-sample logs) is deliberately absent.
_RAW_KEYS = (
    "results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
)


@dataclass(frozen=True)
class LmEvalOptions:
    tasks: list[str]
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = DEFAULT_BATCH_SIZE
    dtype: str = "auto"
    model: str = "hf"
    include_paths: tuple[Path, ...] = ()
    model_args: Mapping[str, Any] | None = None


def takes_loaded_model(opts: LmEvalOptions, devices: int) -> bool:
    """Whether this run can use the job's loaded model: `hf` on one device, in the dtype the model is loaded in
    ("auto": config.json's), with no model_args that only a load from a folder would apply."""
    return (opts.model == "hf" and devices == 1 and opts.dtype == "auto"
            and set(opts.model_args or {}) <= OBJECT_MODEL_ARGS)  # fmt: skip


def evaluate(model: "Path | ModelInput", device: str, opts: LmEvalOptions) -> EvalOutput | None:
    """One lm-eval run in this process; None on the non-zero ranks of a data-parallel run.

    `model`: a model folder, which lm-eval loads itself, or the job's ModelInput, whose loaded model it takes
    (only when `takes_loaded_model`)."""
    import lm_eval
    from lm_eval.api.registry import get_model

    try:
        get_model(opts.model)
    except ValueError:
        raise EvaluatorError(f"unknown lm-eval model type {opts.model!r}") from None

    _disable_datasets_telemetry()
    _per_process_caches()
    if isinstance(model, Path):
        model_args = {"pretrained": str(model.resolve()), "dtype": opts.dtype, **(opts.model_args or {})}
        metadata = dict(model_args)
        lm: Any = opts.model
    else:
        lm, metadata = _loaded_model(model, device, opts)
        model_args = None
    task_manager = _task_manager(opts, bundled_tasks_dir(), metadata=metadata)

    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=list(opts.tasks),
            num_fewshot=opts.num_fewshot,
            batch_size=opts.batch_size,
            device=device,
            limit=opts.limit,
            task_manager=task_manager,
            log_samples=False,
        )
    except ValueError as error:
        # A task asked for both alone and inside a requested group: a preset mistake, not a crash.
        if str(error).startswith("Duplicate task"):
            raise EvaluatorError(f"lm-eval: {error}") from None
        raise
    if results is None:  # the non-zero ranks of a data-parallel run
        return None
    raw = {key: to_json_safe(results[key]) for key in _RAW_KEYS if key in results}
    nonfinite: dict[str, str] = {}
    metrics = flatten_results(results["results"], nonfinite)
    return EvalOutput(metrics=metrics, raw=raw, versions=_versions(opts.model), nonfinite=nonfinite)


def _loaded_model(model: "ModelInput", device: str, opts: LmEvalOptions) -> tuple[Any, dict[str, Any]]:
    """lm-eval's `hf` model around the job's loaded model, set up as simple_evaluate would set it up from the
    folder (the same HFLM arguments), and the task metadata a folder run would have."""
    from lm_eval.models.huggingface import HFLM

    loaded, _ = model.load(device)
    args = dict(opts.model_args or {})
    # Its own tokenizer, loaded by HFLM with its own arguments (add_bos_token, use_fast_tokenizer) as from a
    # folder: HFLM adds a pad token to the one it gets, which the probes' shared tokenizer must not see.
    tokenizer = args.pop("tokenizer", str(model.tokenizer_dir))
    lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=opts.batch_size, device=device, **args)
    metadata = {"pretrained": str(model.tokenizer_dir), "dtype": opts.dtype, **(opts.model_args or {})}
    return lm, metadata


def parse_options(options: Mapping[str, Any]) -> LmEvalOptions:
    """Validate the user's options up front, so mistakes fail in a second, before any model is loaded."""
    if not isinstance(options, Mapping):
        raise EvaluatorError(f"lm_eval options must be a table, got {type(options).__name__}")
    reject_unknown_options("lm_eval", options, _KNOWN_OPTIONS)

    tasks = options.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks or not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t for t in tasks):
        raise EvaluatorError("lm_eval option 'tasks' must be a non-empty list of task names")

    limit = options.get("limit")
    if limit is not None and (not is_number(limit) or not 0 < limit < math.inf):
        raise EvaluatorError(f"lm_eval option 'limit' must be a positive number (<1 is a fraction), got {limit!r}")

    num_fewshot = options.get("num_fewshot")
    if num_fewshot is not None and (not is_int(num_fewshot) or num_fewshot < 0):
        raise EvaluatorError(f"lm_eval option 'num_fewshot' must be a non-negative integer, got {num_fewshot!r}")

    batch_size = options.get("batch_size", DEFAULT_BATCH_SIZE)
    if not (is_int(batch_size) and batch_size > 0) and not _is_auto_batch_size(batch_size):
        raise EvaluatorError(
            f"lm_eval option 'batch_size' must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}"
        )

    for key in ("dtype", "model"):
        if key in options and not (isinstance(options[key], str) and options[key]):
            raise EvaluatorError(f"lm_eval option {key!r} must be a non-empty string, got {options[key]!r}")
    if options.get("model") == "vllm" and importlib.util.find_spec("vllm") is None:
        # Checked here, where the daemon validates presets at start, rather than in every job.
        raise EvaluatorError("lm_eval model 'vllm' needs vLLM installed in ckpt-watch's environment "
                             "(pip install vllm), or use model = \"hf\"")  # fmt: skip

    model_args = options.get("model_args") or {}
    if not isinstance(model_args, Mapping):
        raise EvaluatorError(f"lm_eval option 'model_args' must be a table, got {model_args!r}")
    if "pretrained" in model_args:
        raise EvaluatorError("lm_eval option 'model_args' must not set 'pretrained': the checkpoint is the model")

    return LmEvalOptions(
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        dtype=options.get("dtype", "auto"),
        model=options.get("model", "hf"),
        include_paths=_include_paths(options.get("include_path")),
        model_args=dict(model_args),
    )


def _include_paths(value: Any) -> tuple[Path, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, (str, Path)) and str(p) for p in items):
        raise EvaluatorError(f"lm_eval option 'include_path' must be a path or a list of paths, got {value!r}")
    paths = tuple(Path(p).expanduser().resolve() for p in items)
    for path in paths:
        # lm-eval silently indexes nothing from a missing directory; say so instead of "unknown task".
        if not path.exists():
            raise EvaluatorError(f"lm_eval include_path {str(path)!r} does not exist")
    return paths


def _is_auto_batch_size(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    head, _, tail = value.partition(":")
    return head == "auto" and (not tail or (tail.isdigit() and int(tail) > 0))


def bundled_data_dir() -> Path:
    """The installed `watcher/data` directory, as a real path (datasets needs files on disk)."""
    data = resources.files("watcher").joinpath("data")
    path = Path(str(data))
    if not path.joinpath("tasks").is_dir():
        raise EvaluatorError(f"bundled data not found at {str(path)!r}; is ckpt-watch installed from a zip?")
    return path


_bundled_tasks: Path | None = None  # this process's rendered bundled tasks (bundled_tasks_dir)


def bundled_tasks_dir() -> Path:
    """The bundled tasks, rendered, with the `datasets` cache of their data beside them: in a folder of the system's
    temporary directory named after this user and the templates, rendered by the first process that needs it and
    reused by every job of every process after it (a worker stopped by SIGTERM leaves nothing to clean up)."""
    global _bundled_tasks
    if _bundled_tasks is None or not _bundled_tasks.is_dir():
        import hashlib
        import os
        import shutil
        import tempfile

        data_dir = bundled_data_dir()
        templates = sorted(data_dir.joinpath("tasks").glob("*.yaml"))
        key = hashlib.sha256(str(data_dir).encode() + b"".join(t.read_bytes() for t in templates)).hexdigest()[:16]
        home = Path(tempfile.gettempdir()) / f"ckpt-watch-{os.getuid()}-lm-eval-tasks-{key}"
        tasks = home / "lm_eval_tasks"
        if not tasks.is_dir():
            home.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=home))
            render_bundled_tasks(home, tasks_dir=staging)
            try:
                os.rename(staging, tasks)  # whole or not at all; a process that renders at the same time loses
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        _bundled_tasks = tasks
    return _bundled_tasks


def render_bundled_tasks(workdir: Path, tasks_dir: Path | None = None) -> Path:
    """Write the bundled task YAMLs, with absolute data paths filled in, to `tasks_dir` (default
    `workdir/lm_eval_tasks`); their `datasets` cache is `workdir/hf_datasets_cache`."""
    data_dir = bundled_data_dir()
    out = tasks_dir or workdir / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    # A private cache: the bundled data is tiny, and a job must not leave arrow files in ~/.cache.
    cache_dir = workdir / "hf_datasets_cache"
    for template in sorted(data_dir.joinpath("tasks").glob("*.yaml")):
        text = template.read_text(encoding="utf-8")
        # The placeholders sit inside double-quoted YAML strings, and JSON escaping is valid there.
        text = text.replace(_DATA_PLACEHOLDER, json.dumps(str(data_dir))[1:-1])
        text = text.replace(_CACHE_PLACEHOLDER, json.dumps(str(cache_dir))[1:-1])
        out.joinpath(template.name).write_text(text, encoding="utf-8")
    return out


# (task folders, whether lm-eval's own tasks are indexed too) -> the TaskManager built for them in this process
_task_managers: dict[tuple[tuple[str, ...], bool], Any] = {}


def _task_manager(opts: LmEvalOptions, bundled_dir: Path, metadata: dict[str, Any]):
    """A TaskManager that knows every requested task, or EvaluatorError naming the unknown ones."""
    # Bundled first: later include paths win, so a user's task can shadow a bundled one.
    paths = (str(bundled_dir), *(str(p) for p in opts.include_paths))
    # Indexing lm-eval's ~15k built-in task names takes several seconds; the smoke preset runs on
    # every checkpoint and needs none of them, so they are indexed only when a requested task is not ours.
    manager = _indexed_tasks(paths, include_defaults=False)
    include_defaults = not all(task in manager.all_tasks or _is_task_file(task) for task in opts.tasks)
    if include_defaults:
        manager = _indexed_tasks(paths, include_defaults=True)
    manager = _with_metadata(manager, metadata, include_defaults)

    unknown = [task for task in opts.tasks if task not in manager.all_tasks and not _is_task_file(task)]
    if unknown:
        raise EvaluatorError(
            f"unknown lm-eval task(s): {', '.join(unknown)} "
            "(not a built-in task, group or tag, not bundled with ckpt-watch, not in include_path)"
        )
    return manager


def _indexed_tasks(paths: tuple[str, ...], include_defaults: bool):
    """The TaskManager of these task folders, built once per process (see the module docstring)."""
    from lm_eval.tasks import TaskManager

    key = (paths, include_defaults)
    if key not in _task_managers:
        _task_managers[key] = TaskManager(include_path=list(paths), include_defaults=include_defaults)
    return _task_managers[key]


def _with_metadata(manager, metadata: dict[str, Any], include_defaults: bool):
    """The same task index, building tasks with this job's metadata (what simple_evaluate would pass: some tasks
    read the model's arguments from it). TaskManager takes metadata only when it builds its index, and hands it to
    its TaskFactory, so a copy gets a factory of its own; the index is shared."""
    import copy

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    if not hasattr(manager, "_factory"):  # another lm-eval: index again rather than guess at its insides
        return TaskManager(include_path=manager.include_path, include_defaults=include_defaults, metadata=metadata)
    job_manager = copy.copy(manager)
    job_manager.metadata = metadata
    job_manager._factory = TaskFactory(meta=metadata)
    return job_manager


def _is_task_file(task: str) -> bool:
    """lm-eval also accepts a path to a task YAML in place of a name."""
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def flatten_results(results: Mapping[str, Mapping[str, Any]], nonfinite: dict[str, str] | None = None
                    ) -> dict[str, float]:  # fmt: skip
    """Turn lm-eval's `results` into flat "task/metric" names with finite float values.

    lm-eval keys are "metric,filter" ("acc,none", "acc_stderr,none", "exact_match,strict-match").
    The common filter "none" is left out of the name and any other becomes "@filter", so two
    filters of one metric never collide. Keys without a filter (alias, name, sample_len) are not
    metrics; "N/A", NaN and infinite values are dropped, since they cannot be plotted or compared.
    Group entries have the same shape and are flattened the same way.
    """
    flat: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or not is_number(value):
                continue
            suffix = "" if filter_name == "none" else f"@{filter_name}"
            if not math.isfinite(value):
                if nonfinite is not None:  # kept by name for the alert rules' `nan` condition
                    nonfinite[f"{task}/{metric}{suffix}"] = str(float(value))
                continue
            flat[f"{task}/{metric}{suffix}"] = float(value)
    return flat


def to_json_safe(value: Any) -> Any:
    """A copy of `value` that json.dumps(..., allow_nan=False) accepts.

    lm-eval's configs can hold callables (`!function` hooks) and numpy scalars, and its results NaN;
    those become strings (non-finite floats as "nan"/"inf"/"-inf") rather than being dropped.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if is_int(value):
        return int(value)
    if is_number(value):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_safe(item) for item in value]
    return str(value)


def _disable_datasets_telemetry() -> None:
    # Unless HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, `datasets` sends a download-count HEAD
    # request to S3 whenever it loads even a local json/text file. It only counts downloads, but on
    # an air-gapped GPU box it is a network attempt (with a 3 s timeout) per task.
    import datasets.config

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False


def _per_process_caches() -> None:
    """Two things lm-eval redoes in every `simple_evaluate` that cannot change within a process; a warm worker
    (one process, many jobs) does them once. Each is skipped when this lm-eval version lacks what it replaces.

    * `add_env_info` (lm_eval/evaluator.py, after the evaluation) describes the machine with torch's
      `collect_env`, which runs `pip list`, `nvidia-smi` and others in subprocesses: about 1.1 s of a 2.2 s smoke
      run on the CPU VM. We keep none of it (_RAW_KEYS), but lm-eval's results keep their keys: the first call's
      answer is reused.
    * `apply_template` (lm_eval/utils.py) compiles a task's Jinja template (`env.from_string`) for every document
      and field: ~0.3 s for the smoke tasks. A compiled Template is immutable and renders independently, so the
      compile is memoised by template text.
    """
    import functools

    import lm_eval.evaluator
    import lm_eval.utils

    add_env_info = getattr(lm_eval.evaluator, "add_env_info", None)
    if callable(add_env_info) and not getattr(add_env_info, "_ckpt_watch_once", False):
        collected: dict[str, Any] = {}

        def add_env_info_once(storage: dict[str, Any]) -> None:
            if not collected:
                add_env_info(collected)
            storage.update(collected)

        add_env_info_once._ckpt_watch_once = True  # type: ignore[attr-defined]
        add_env_info_once.__wrapped__ = add_env_info  # type: ignore[attr-defined]
        lm_eval.evaluator.add_env_info = add_env_info_once
    env = getattr(lm_eval.utils, "env", None)
    if env is not None and callable(getattr(env, "from_string", None)) and "from_string" not in vars(env):
        compile_template = env.from_string
        compiled = functools.lru_cache(maxsize=4096)(compile_template)

        def from_string(source: Any, *args: Any, **kwargs: Any) -> Any:
            # Only the plain form lm-eval uses is memoised (`globals` would be an unhashable dict).
            return compiled(source) if isinstance(source, str) and not args and not kwargs else compile_template(source, *args, **kwargs)

        env.from_string = from_string


def _versions(model_type: str = "hf") -> dict[str, str]:
    versions = {"python": platform.python_version()}
    packages = ["lm_eval", "transformers", "torch", "datasets", "accelerate"] + (["vllm"] if model_type == "vllm" else [])
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    import torch  # already imported by the evaluation; its own version string names the build (e.g. +cu130)

    versions["torch"] = torch.__version__
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions
