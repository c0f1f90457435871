"""The config file's tables, each a typed dataclass documented field by field where it is declared, with the
parser that checks it: `[[schedule]]` (ScheduleEntry), `keep_best` (KeepBestRule), `[slurm]` (SlurmSettings),
`[[alerts]]` (AlertRule). Every check raises ConfigError, one line naming the table and the key (exit status 2);
it lives here, below watcher/config.py, which re-exports it with everything else of this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A usage or configuration problem: reported as one line, exit status 2."""


POLICIES = ("all", "latest")
VARIANTS = ("regular", "ema")


@dataclass(frozen=True)
class ScheduleEntry:
    """One `[[schedule]]` entry: a preset and the checkpoints it runs on (watcher/schedules.py applies it).

    The conditions `every`, `every_steps` and `final` add up: an entry with `every = 10` and `final = true` runs
    on every 10th checkpoint and on the final one. An entry with none of them runs on every checkpoint."""

    preset: str
    """The preset's name (bundled or a `[presets.NAME]` table)."""

    every: int | None = None
    """Every Nth checkpoint of the run in step order, counting from the first: the 1st, N+1th, 2N+1th, ... (so
    the run's first checkpoint gives an early reading, and `every = 1` is every checkpoint)."""

    every_steps: int | None = None
    """Each time training passes a multiple of K steps: the first checkpoint at or after K, 2K, 3K, ... (exactly
    the multiples when the save interval divides K; the next save after each multiple when it does not)."""

    final: bool = False
    """The run's final checkpoint, once the run is known to have finished (the trainer's run record says
    `state = finished`, or `ckpt-watch finalize OUTPUT_DIR`). Never skipped by `latest`."""

    variants: tuple[str, ...] | None = None
    """Weight variants this entry evaluates (`regular`, `ema`). Default: the top-level `variants`."""

    priority: int = 0
    """Higher runs first when jobs compete for slots; entries of equal priority share them (see schedules.py)."""

    policy: str | None = None
    """`all` or `latest`, for this entry only: `latest` skips this entry's jobs that a newer checkpoint overtook.
    Default: the top-level `policy`."""


SCHEDULE_KEYS = tuple(f.name for f in dataclasses.fields(ScheduleEntry))


@dataclass(frozen=True)
class KeepBestRule:
    """One `keep_best` rule: keep the best `k` checkpoints by one metric under RESULTS_DIR/best/ (watcher/retention.py
    keeps that folder equal to the ranking of watcher/standings.py)."""

    metric: str
    """The metric as results name it, e.g. `ckpt_watch_smoke_mc/acc`; its "/" become subfolders of best/."""

    mode: str = "auto"
    """`max` (higher is better), `min`, or `auto`: lm-eval's own `higher_is_better`, else the metric's name."""

    k: int = 3
    """How many checkpoints are kept: the best k (ties: the earlier step)."""

    variant: str = "regular"
    """Whose results rank the checkpoints: `regular` or `ema` (kept under best/ema/<metric>/)."""


KEEP_BEST_KEYS = tuple(f.name for f in dataclasses.fields(KeepBestRule))
EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class SlurmSettings:
    """The `[slurm]` table, used with `executor = "slurm"`: each job becomes a Slurm batch job (watcher/slurm.py
    talks to Slurm, watcher/slurm_jobs.py follows the jobs). Unset options are left to the cluster's defaults."""

    partition: str | None = None
    """`--partition`."""

    account: str | None = None
    """`--account`."""

    qos: str | None = None
    """`--qos`."""

    gpus_per_job: int | None = None
    """GPUs one job asks for (`--gres=gpu:N`). Default: the preset's `gpus`. 0: no GPU, the job runs on the CPU."""

    gpu_type: str | None = None
    """The GPU type in `--gres=gpu:TYPE:N` (e.g. `a100`), for clusters whose GRES names types."""

    cpus_per_task: int | None = None
    """`--cpus-per-task`."""

    mem: str | None = None
    """`--mem`, in Slurm's notation (`64G`, `500M`)."""

    constraint: str | None = None
    """`--constraint` (node features, e.g. `h100`)."""

    time: str | None = None
    """`--time`, in Slurm's notation (`30`, `1:30:00`, `1-00:00:00`). Default: the preset's `time_budget` (else
    `job_timeout`) plus a margin for start-up (10 %, at least 5 minutes). Past it Slurm ends the job: TIMEOUT."""

    max_jobs: int = 4
    """Slurm jobs of ours queued or running at once (the executor's slot count)."""

    setup: tuple[str, ...] = ()
    """Shell lines run in the job before the worker, e.g. `module load cuda/12.4`, `source /shared/env/bin/activate`."""

    extra: tuple[str, ...] = ()
    """Further sbatch options, one per entry: `--reservation=eval` or a whole `#SBATCH --reservation=eval` line."""

    job_dir: Path | None = None
    """Where job folders go (spec, outcome, stage file, job script): a folder both this machine and the compute
    nodes see. Default: RESULTS_DIR/.slurm."""

    scratch: str | None = None
    """Where a job merges sharded checkpoints, as the compute node sees it (shell variables are expanded there).
    Default: `$SLURM_TMPDIR`, else `$TMPDIR`, else the job's folder under `job_dir`."""

    python: str | None = None
    """The Python the job runs the worker with. Default: the one running the daemon (a shared-filesystem install;
    after `setup` lines that activate an environment, `python` is usually what you want)."""

    poll: float = 10.0
    """Seconds between `squeue` queries. A job's own files (stage, outcome) are read every half second; Slurm is
    asked at once when a job's outcome appears, so this only bounds how soon a job Slurm ended (time limit, scancel,
    node failure) is noticed. At least 1 s (the scheduler's own load)."""

    cancel_on_stop: bool = False
    """When the daemon stops (SIGTERM): cancel its Slurm jobs. Default: leave them running; their outcomes are
    collected at the next start."""


SLURM_KEYS = tuple(f.name for f in dataclasses.fields(SlurmSettings))


ALERT_CONDITIONS = ("drop_from_best", "below", "above", "nan")
ALERT_MODES = ("auto", "max", "min")


@dataclass(frozen=True)
class AlertRule:
    """One `[[alerts]]` rule (watcher/alerts.py evaluates it whenever a result is committed). Exactly one
    condition (`drop_from_best`, `below`, `above` or `nan`) is set. A rule fires at most once per checkpoint
    (generation), journaled; firing logs a warning, appends to RESULTS_DIR/alerts.jsonl, raises a W&B alert on
    the training run when a W&B sink is configured, and with `stop_training` writes the stop request."""

    name: str
    """How logs, alerts.jsonl, W&B and the journal name the rule; unique. Default: derived from the rule, e.g.
    `mmlu/acc drop_from_best 5%` (`mmlu/acc[ema] below 0.3` for the ema variant)."""

    metric: str
    """The metric, as results name it (`task/metric`, e.g. `ckpt_watch_smoke_mc/acc`)."""

    variant: str = "regular"
    """The weight variant whose results are watched (`regular` or `ema`)."""

    mode: str = "auto"
    """Which direction is better, for `drop_from_best`: `max`, `min`, or `auto` (lm-eval's own
    higher_is_better, else the metric's name; see watcher/standings.py `resolve_mode`)."""

    drop_from_best: float | str | None = None
    """Fires when the checkpoint is worse than the best so far (the best of the earlier steps) by at least this
    much: a number is an absolute drop, a string like `"5%"` a drop relative to the best so far's value."""

    below: float | None = None
    """Fires when the checkpoint's value is below this number."""

    above: float | None = None
    """Fires when the checkpoint's value is above this number."""

    nan: bool = False
    """`true`: fires when a successful result reports the metric as NaN or infinite (evaluators keep such values
    out of the metrics, in the result's `nonfinite`). A metric missing from a result is not NaN, and a failed
    job is not either (it has no metrics; a failure is logged as one already)."""

    consecutive: int = 1
    """Fires only when the condition holds at this many consecutive evaluated checkpoints (by step, those with
    a value of the metric), ending at the checkpoint that fires."""

    stop_training: bool = False
    """When it fires, also write the stop request OUTPUT_DIR/ckpt-watch-stop.json, which the Hugging Face
    callback answers at the next save by stopping training (watcher/integrations/sentinel.py)."""

    @property
    def condition(self) -> str:
        """The condition as written, e.g. `drop_from_best 5%`, `below 0.3`, `nan`."""
        for key in ("drop_from_best", "below", "above"):
            value = getattr(self, key)
            if value is not None:
                return f"{key} {value:g}" if isinstance(value, (int, float)) else f"{key} {value}"
        return "nan"


ALERT_KEYS = tuple(f.name for f in dataclasses.fields(AlertRule))


def _table_named(what: str, table: Any, keys: tuple[str, ...], name_key: str) -> str:
    """How errors name one table of a list (`what`, and its `name_key` value when it has one), once it is known to be
    a table with only `keys`; a one-line ConfigError otherwise."""
    if not isinstance(table, dict):
        raise ConfigError(f"{what} must be a table, got {table!r}")
    name = table.get(name_key)
    where = what + (f" ({name_key} {name!r})" if isinstance(name, str) and name else "")
    for key in table:
        if key not in keys:
            raise ConfigError(f"unknown key '{key}' in {where}; known keys: {', '.join(keys)}")
    return where


def schedule_entry(number: int, entry: Any) -> ScheduleEntry:
    """A `[[schedule]]` table (or an entry already checked, on a reload) as a ScheduleEntry; a one-line
    ConfigError naming the entry (its position, and its preset when it has one) otherwise."""
    if isinstance(entry, ScheduleEntry):
        return entry
    where = _table_named(f"schedule entry {number}", entry, SCHEDULE_KEYS, "preset")
    preset = entry.get("preset")
    if not isinstance(preset, str) or not preset:
        raise ConfigError(f"{where} needs a preset name, got {preset!r}")
    for name in ("every", "every_steps"):
        value = entry.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    if not isinstance(entry.get("final", False), bool):
        raise ConfigError(f"{where}: final must be true or false, got {entry['final']!r}")
    priority = entry.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"{where}: priority must be an integer, got {priority!r}")
    if entry.get("policy") is not None and entry["policy"] not in POLICIES:
        raise ConfigError(f"{where}: policy must be one of {', '.join(POLICIES)}, got {entry['policy']!r}")
    variants = entry.get("variants")
    if variants is not None and (not isinstance(variants, list) or not variants
                                 or any(v not in VARIANTS for v in variants)):  # fmt: skip
        raise ConfigError(f"{where}: variants must be a non-empty list of {', '.join(VARIANTS)}, got {variants!r}")
    return ScheduleEntry(**{**entry, "variants": tuple(variants) if variants else None})


def keep_best_rule(number: int, rule: Any) -> KeepBestRule:
    """A `keep_best` rule (or a rule already checked, on a reload) as a KeepBestRule; a one-line ConfigError
    naming the rule (its position, and its metric when it has one) otherwise."""
    if isinstance(rule, KeepBestRule):
        return rule
    where = _table_named(f"keep_best rule {number}", rule, KEEP_BEST_KEYS, "metric")
    metric = rule.get("metric")
    if not isinstance(metric, str) or not metric.strip():
        raise ConfigError(f"{where} needs a metric name, got {metric!r}")
    # The metric names a folder under best/: every part a plain name (no "..", no hidden folder like .held).
    if any(not part or part.startswith(".") or "\\" in part for part in metric.split("/")):
        raise ConfigError(f"{where}: the metric must be a path of plain names (its parts become folders of best/; "
                          f"no empty part, none starting with '.'), got {metric!r}")  # fmt: skip
    mode = rule.get("mode", "auto")
    if mode not in ("max", "min", "auto"):
        raise ConfigError(f"{where}: mode must be one of max, min, auto, got {mode!r}")
    k = rule.get("k", 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{where}: k must be a positive integer, got {k!r}")
    variant = rule.get("variant", "regular")
    if variant not in VARIANTS:
        raise ConfigError(f"{where}: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "regular" and metric.split("/")[0] == "ema":
        raise ConfigError(f"{where}: a regular metric cannot start with 'ema/' (best/ema/ holds the ema rules)")
    return KeepBestRule(metric=metric, mode=mode, k=k, variant=variant)


def slurm_settings(table: Any) -> SlurmSettings:
    """The `[slurm]` table (or settings already checked, on a reload) as SlurmSettings; a one-line ConfigError
    naming the key otherwise."""
    if isinstance(table, SlurmSettings):
        return table
    if not isinstance(table, dict):
        raise ConfigError(f"slurm must be a table ([slurm]), got {table!r}")
    for key in table:
        if key not in SLURM_KEYS:
            raise ConfigError(f"unknown key '{key}' in [slurm]; known keys: {', '.join(SLURM_KEYS)}")
    values = dict(table)
    for key in ("partition", "account", "qos", "gpu_type", "mem", "constraint", "time", "scratch", "python"):
        value = values.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip() or "\n" in value):
            raise ConfigError(f"slurm.{key} must be a one-line string, got {value!r}")
    for key, minimum in (("gpus_per_job", 0), ("cpus_per_task", 1), ("max_jobs", 1)):
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            kind = "a non-negative integer" if minimum == 0 else "a positive integer"
            raise ConfigError(f"slurm.{key} must be {kind}, got {value!r}")
    for key in ("setup", "extra"):
        value = values.get(key, ())
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(line, str) and "\n" not in line for line in value):
            raise ConfigError(f"slurm.{key} must be a list of one-line strings, got {value!r}")
        values[key] = tuple(value)
    for line in values.get("extra", ()):
        if not line.strip().startswith(("-", "#SBATCH")):
            raise ConfigError(f"slurm.extra entries are sbatch options like '--reservation=eval', got {line!r}")
    poll = values.get("poll", 10.0)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not math.isfinite(poll) or poll < 1:
        raise ConfigError(f"slurm.poll must be at least 1 s (each poll is a query to the Slurm controller), got {poll!r}")
    values["poll"] = float(poll)
    if not isinstance(values.get("cancel_on_stop", False), bool):
        raise ConfigError(f"slurm.cancel_on_stop must be true or false, got {values['cancel_on_stop']!r}")
    job_dir = values.get("job_dir")
    if job_dir is not None:
        if not isinstance(job_dir, (str, Path)) or not str(job_dir):
            raise ConfigError(f"slurm.job_dir must be a folder, got {job_dir!r}")
        values["job_dir"] = Path(job_dir).expanduser()
    return SlurmSettings(**values)


def alert_rule(number: int, rule: Any) -> AlertRule:
    """An `[[alerts]]` table (or a rule already checked, on a reload) as an AlertRule; a one-line ConfigError
    naming the rule (its position, and its name or metric when it has one) otherwise."""
    if isinstance(rule, AlertRule):
        return rule
    if not isinstance(rule, dict):
        raise ConfigError(f"alert rule {number} must be a table, got {rule!r}")
    label = rule.get("name") or rule.get("metric")
    where = f"alert rule {number}" + (f" ({label!r})" if isinstance(label, str) and label else "")
    for key in rule:
        if key not in ALERT_KEYS:
            raise ConfigError(f"unknown key '{key}' in {where}; known keys: {', '.join(ALERT_KEYS)}")
    metric = rule.get("metric")
    if not isinstance(metric, str) or not metric.strip():
        raise ConfigError(f"{where} needs a metric name, got {metric!r}")
    if rule.get("variant", "regular") not in VARIANTS:
        raise ConfigError(f"{where}: variant must be one of {', '.join(VARIANTS)}, got {rule['variant']!r}")
    if rule.get("mode", "auto") not in ALERT_MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(ALERT_MODES)}, got {rule['mode']!r}")
    given = [key for key in ALERT_CONDITIONS if rule.get(key) not in (None, False)]
    if len(given) != 1:
        raise ConfigError(f"{where} needs exactly one condition of {', '.join(ALERT_CONDITIONS)}, got "
                          f"{', '.join(given) or 'none'}")  # fmt: skip
    for key in ("below", "above"):
        value = rule.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):  # fmt: skip
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    _drop_amount(where, rule.get("drop_from_best"))
    if not isinstance(rule.get("nan", False), bool):
        raise ConfigError(f"{where}: nan must be true or false, got {rule['nan']!r}")
    consecutive = rule.get("consecutive", 1)
    if isinstance(consecutive, bool) or not isinstance(consecutive, int) or consecutive < 1:
        raise ConfigError(f"{where}: consecutive must be a positive integer, got {consecutive!r}")
    if not isinstance(rule.get("stop_training", False), bool):
        raise ConfigError(f"{where}: stop_training must be true or false, got {rule['stop_training']!r}")
    values = {key: float(value) if key in ("below", "above") and value is not None else value
              for key, value in rule.items()}  # fmt: skip
    values.setdefault("name", "")
    if not isinstance(values["name"], str) or "\n" in values["name"]:
        raise ConfigError(f"{where}: name must be a one-line string, got {values['name']!r}")
    checked = AlertRule(**values)
    if not checked.name.strip():
        variant = "" if checked.variant == "regular" else f"[{checked.variant}]"
        checked = dataclasses.replace(checked, name=f"{checked.metric}{variant} {checked.condition}")
    return checked


def _drop_amount(where: str, value: Any) -> None:
    """`drop_from_best`: a positive finite number, or a string of a positive percentage like "5%"."""
    if value is None:
        return
    if isinstance(value, str):
        number = value.strip()[:-1] if value.strip().endswith("%") else None
        try:
            amount = float(number) if number else math.nan
        except ValueError:
            amount = math.nan
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = float(value)
    else:
        amount = math.nan
    if not math.isfinite(amount) or amount <= 0:
        raise ConfigError(f"{where}: drop_from_best must be a positive number (an absolute drop) or a percentage "
                          f"like \"5%\" (relative to the best so far), got {value!r}")
