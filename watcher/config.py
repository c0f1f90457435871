"""Configuration: one typed dataclass, loadable from TOML, overridable from the command line.

Every field is documented where it is declared. A TOML file may set any field by its name; command-line flags
override the file. Unknown keys are an error naming the key, so a typo never silently does nothing. The file's
tables ([[schedule]], keep_best, [slurm], [[alerts]]) are typed and checked in watcher/config_tables.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher.config_tables import (  # re-exported: watcher.config is where the rest of ckpt-watch imports them
    EXECUTORS, POLICIES, VARIANTS, AlertRule, ConfigError, KeepBestRule, ScheduleEntry, SlurmSettings, alert_rule,
    keep_best_rule, schedule_entry, slurm_settings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class BadCheckpointName(ValueError):
    """A folder name the checkpoint pattern admits that cannot be a checkpoint (the message says why)."""


MAX_STEP = 2**63 - 1  # SQLite's INTEGER


# HF Trainer and LMMs-Engine: checkpoint-N; torchtitan: step-N; veRL: global_step_N.
DEFAULT_CHECKPOINT_PATTERN = r"^(?:checkpoint-|step-|global_step_)(?P<step>\d+)$"
LOG_FORMATS = ("auto", "plain", "json")


@dataclass
class WatchConfig:
    output_dir: Path | list[Path] | None = None
    """The training run's output_dir, whose checkpoint folders are watched; or a list of them: one daemon watches
    several runs (each keeps its own results dir, journal, W&B run and TensorBoard dir; the pool and the
    schedule are shared, and runs take turns for slots)."""

    runs_root: Path | None = None
    """Instead of `output_dir`: a folder whose subfolders are runs. Each subfolder that holds checkpoint folders
    is watched as a run from the moment its first checkpoint folder appears."""

    device: str = "cpu"
    """Where jobs run: `cpu`, `cuda`, `cuda:N`, or a list `cuda:1,2`. Jobs run in child processes whose
    CUDA_VISIBLE_DEVICES is set to exactly these GPUs; the daemon itself never initialises CUDA."""

    preset: str = "smoke"
    """Evaluation preset to run on every checkpoint (see `presets` below and the bundled ones), when no
    `[[schedule]]` entry is given."""

    schedule: list[ScheduleEntry] = field(default_factory=list)
    """`[[schedule]]` entries: which preset runs on which checkpoints, at what priority (see `ScheduleEntry`).
    None given: one entry, `preset` on every checkpoint with the top-level `policy` and `variants`."""

    executor: str = "local"
    """Where jobs run: `local` (child processes on this machine, one per slot of `device`) or `slurm` (one Slurm
    batch job each, at most `[slurm] max_jobs` at once; `device` is then not used)."""

    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    """The `[slurm]` table (see `SlurmSettings`)."""

    cpu_jobs: int = 1
    """With `device = "cpu"`: how many jobs run at once."""

    warm: bool = True
    """Local jobs run in a warm worker per slot: a long-lived process that imports torch and transformers once
    and takes that slot's jobs one after another, each with its own folder, log and time budget (watcher/warm.py).
    `false`: a fresh process per job. Either way a crash fails only the job it ran (retried in a fresh process)."""

    warm_max_jobs: int = 20
    """A warm worker is replaced by a fresh one after this many jobs (also after a failed job, on SIGHUP and
    after 10 minutes idle), so that whatever a backend leaks per job stays bounded."""

    warm_max_rss_mb: int = 8192
    """A warm worker still holding more than this many MiB of memory after a job is replaced. A worker with torch,
    transformers and lm-eval imported holds 1-2 GiB between jobs; 8 GiB leaves room for what the allocator keeps
    of a large model's load, while eight slots' workers together stay within a GPU server's memory."""

    warm_max_gpu_mb: int = 256
    """A warm worker whose torch still reserves more than this many MiB of GPU memory after a job (its cache is
    emptied first, so a clean job leaves 0) is replaced: a tensor leaked. Kept low so that an idle worker (its
    CUDA context, about 600 MiB, plus this) stays below `gpu_busy_mib` and its GPU is still offered."""

    gpu_busy_mib: int = 1024
    """A GPU of the pool on which processes other than our jobs use more than this many MiB is not offered (an
    idle GPU shows 0-600 MiB of driver reservations; see watcher/pool.py)."""

    policy: str = "all"
    """`all`: every checkpoint in step order. `latest`: always the newest complete checkpoint, skipping the ones
    overtaken while busy (the newest, and so the run's final checkpoint, is never skipped)."""

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Weight variants to evaluate when a checkpoint has them: `regular`, `ema`."""

    results_dir: Path | None = None
    """Where results, logs and the journal go. Default: OUTPUT_DIR/ckpt-watch (a name no trainer globs)."""

    journal_dir: Path | None = None
    """Where the SQLite journal lives. Default: the results dir, or a local state dir when the results dir is on a
    network filesystem (SQLite locking is unreliable there)."""

    scratch_dir: Path | None = None
    """Where sharded checkpoints are merged for evaluation (needs room for one merged model). Default:
    RESULTS_DIR/.work. A fast local disk (NVMe) makes merges faster."""

    keep_merged: int = 0
    """Keep the merged models of the newest K checkpoints (per variant) under SCRATCH_DIR/merged/; 0 deletes each
    merged copy once it is evaluated."""

    keep_best: list[KeepBestRule] = field(default_factory=list)
    """Rules that keep the best checkpoints by an eval metric, safe from the trainer's rotation (see `KeepBestRule`
    and watcher/retention.py): `keep_best = [{ metric = "ckpt_watch_smoke_mc/acc", mode = "max", k = 3 }]`, or
    `[[keep_best]]` tables. Kept by hard links under RESULTS_DIR/best/<metric>/checkpoint-N/ (no extra space
    while the original exists); every complete checkpoint is held (hard links under best/.held/) until its results
    decide, and evaluated from there if the trainer deletes it first."""

    keep_best_copy: bool = True
    """When RESULTS_DIR is on another filesystem than the checkpoints (no hard links across them): copy the best
    checkpoints into best/ (a warning once; nothing is held early). `false`: a warning, and nothing is kept."""

    keep_merged_best: bool = False
    """Also keep the merged model of each kept checkpoint that needed merging (sharded ones), as
    best/<metric>/checkpoint-N/merged/."""

    base_model: Path | None = None
    """A Hugging Face model folder whose config and tokenizer files are used when a checkpoint lacks them
    (torchtitan saves weights only)."""

    poll: float | None = None
    """Poll the output dir every this many seconds instead of using inotify. Default: inotify on local disks,
    polling every 10 s on network filesystems (NFS, Lustre, GPFS, CIFS, FUSE), where inotify sees nothing. At least
    0.1 s."""

    settle: float | None = None
    """Seconds nothing in a complete checkpoint may be written (any file's size, mtime or ctime) before it becomes a
    job. Default: 1 s on local disks, 30 s on network filesystems (attribute caches lag there)."""

    sentinel: str | None = None
    """If set, a checkpoint is complete exactly when this file exists in it; no other rule applies."""

    checkpoint_pattern: str = DEFAULT_CHECKPOINT_PATTERN
    """Regular expression for checkpoint folder names; its group `step` (or first group) is the training step, and
    it must have one. A name it admits whose step is not ASCII digits within SQLite's 64-bit range, or that has
    control characters, is logged once and ignored."""

    rescan_interval: float = 30.0
    """Seconds between reconciliation scans under inotify (at least 1 s); an inotify queue overflow triggers one at
    once."""

    job_timeout: float = 6 * 3600.0
    """Seconds a job may run before it is stopped and marked failed (a preset's own budget, if set, wins)."""

    stop_grace: float = 60.0
    """Seconds a running job may still take to finish when the daemon is asked to stop (SIGTERM, SIGINT); then
    its process group is stopped and the job is pending again for the next start. A second signal stops it at once."""

    max_attempts: int = 3
    """Attempts per job before it stays failed (until `--retry-failed`)."""

    retry_backoff: float = 60.0
    """Seconds before the first retry of a failed job; doubles with each further attempt."""

    verbosity: int = 0
    """-1 quiet, 0 normal, 1 verbose (debug)."""

    log_format: str = "auto"
    """How the daemon reports: `auto` (the live view when stdout is a terminal and not under systemd, i.e. neither
    JOURNAL_STREAM nor INVOCATION_ID is set and TERM is not `dumb`; else `plain`), `plain` (one line per log
    record, no colour or escape codes; under systemd without the timestamp, which journald adds, and with a `<N>`
    priority prefix journald turns into the record's level) or `json` (one JSON object per line: time, level,
    message, and any structured extras). The live view shows the watched dir and mode, the queue, the running
    job's stage with a progress bar, and the latest results; log records scroll above it."""

    presets: dict[str, Any] = field(default_factory=dict)
    """Extra or overriding presets, as `[presets.NAME]` tables with the same shape as the bundled ones."""

    wandb: str = "auto"
    """Which W&B run gets the results, at each checkpoint's step: `auto` (the run our trainer callback recorded, else
    WANDB_RUN_ID/WANDB_PROJECT, else the newest run in the trainer's local `wandb/` folder), `off`, or
    `[ENTITY/]PROJECT/RUN_ID`. Results wait in the journal until they are delivered."""

    wandb_live: str = "defer"
    """While the training run is still being written: `defer` (default; results wait until it has finished, then
    the run is resumed and they are replayed in step order) or `shared` (attach as a non-primary writer in W&B's
    shared mode; the trainer must run in shared mode too)."""

    tensorboard: str = "auto"
    """TensorBoard event files for the results, as a run of their own next to the trainer's: `auto` (in
    OUTPUT_DIR/runs/ckpt-watch-eval when the trainer logs TensorBoard under OUTPUT_DIR/runs; in
    `<logging_dir>/ckpt-watch-eval` for another logging dir our callback recorded), `off`, or a folder (relative
    to OUTPUT_DIR) that the trainer does not write into."""

    backends: dict[str, Any] = field(default_factory=dict)
    """Settings for every evaluator of one backend, as `[backends.NAME]` tables, e.g. `[backends.lmms_eval]
    python = "/opt/lmms/bin/python"`: where a backend lives belongs to the machine, not to each preset. An
    evaluator entry's own option of the same name wins."""

    alerts: list[AlertRule] = field(default_factory=list)
    """`[[alerts]]` rules: what to do when a metric regresses (see `AlertRule` and watcher/alerts.py)."""

    # --- derived helpers -------------------------------------------------------------------------------------

    def schedule_entries(self) -> list[ScheduleEntry]:
        """The effective schedule: the `[[schedule]]` entries with their defaults filled in from the top-level
        `policy` and `variants`, or, when none is given, `preset` on every checkpoint (today's meaning)."""
        entries = self.schedule or [ScheduleEntry(self.preset)]
        return [dataclasses.replace(entry, policy=entry.policy or self.policy,
                                    variants=tuple(entry.variants or self.variants)) for entry in entries]  # fmt: skip

    def output_dirs(self) -> list[Path]:
        """The runs named by `output_dir` (one or a list); none for `runs_root` (found as they appear)."""
        if self.output_dir is None:
            return []
        return [Path(d) for d in self.output_dir] if isinstance(self.output_dir, list) else [Path(self.output_dir)]

    @property
    def several_runs(self) -> bool:
        return self.runs_root is not None or len(self.output_dirs()) > 1

    def for_run(self, output_dir: Path) -> "WatchConfig":
        """One run's configuration: its output_dir; with several runs, results, journal and scratch dirs set in
        the file get a subfolder per run (by default each is inside the run's own output dir anyway)."""
        name = Path(output_dir).name
        per_run = {key: Path(getattr(self, key)) / name for key in ("results_dir", "journal_dir", "scratch_dir")
                   if getattr(self, key) is not None and self.several_runs}  # fmt: skip
        slurm = self.slurm
        if isinstance(slurm, SlurmSettings) and slurm.job_dir is not None and self.several_runs:
            slurm = dataclasses.replace(slurm, job_dir=Path(slurm.job_dir) / name)
        return dataclasses.replace(self, output_dir=Path(output_dir), runs_root=None, slurm=slurm, **per_run)

    def resolved_results_dir(self) -> Path:
        assert self.output_dir is not None and not isinstance(self.output_dir, list)
        return Path(self.results_dir) if self.results_dir else Path(self.output_dir) / "ckpt-watch"

    def resolved_scratch_dir(self) -> Path:
        return Path(self.scratch_dir) if self.scratch_dir else self.resolved_results_dir() / ".work"

    def step_of(self, name: str) -> int | None:
        """The training step encoded in a checkpoint folder name, or None if the name is not a checkpoint, or is
        one the pattern admits but that cannot be used (see `checked_step`)."""
        try:
            return self.checked_step(name)
        except BadCheckpointName:
            return None

    def checked_step(self, name: str) -> int | None:
        """The step of a checkpoint folder name; None if the pattern does not match; raises BadCheckpointName
        for a name the pattern admits but that cannot be used. The one place where names become steps."""
        match = re.match(self.checkpoint_pattern, name)
        if not match:
            return None
        groups = match.groupdict()
        text = groups.get("step") if "step" in groups else (match.group(1) if match.groups() else None)
        if text is None:
            return None
        # `$` also matches before a trailing newline, so `checkpoint-30\n` matches the default pattern: a name
        # with control characters is someone else's folder, never checkpoint-30 again.
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
            raise BadCheckpointName(f"folder {name!r} has control characters in its name")
        if any("\udc80" <= char <= "\udcff" for char in name):  # os.listdir's surrogateescape of a bad byte
            raise BadCheckpointName(f"folder {name!r}: its name is not valid UTF-8")
        # \d also matches other scripts' digits, which int() would read as another checkpoint's step.
        if not (text.isascii() and text.isdigit()):
            raise BadCheckpointName(f"folder {name!r}: step {text!r} is not a number of ASCII digits")
        step = int(text)
        if step > MAX_STEP:  # the journal (SQLite) stores steps as signed 64-bit integers
            raise BadCheckpointName(f"folder {name!r}: step {text} is larger than {MAX_STEP}")
        return step


FIELD_NAMES = {f.name for f in dataclasses.fields(WatchConfig)}
_PATH_FIELDS = {"output_dir", "runs_root", "results_dir", "journal_dir", "scratch_dir", "base_model"}
_STRING_FIELDS = ("device", "preset", "policy", "log_format", "wandb", "wandb_live", "tensorboard", "sentinel",
                  "checkpoint_pattern")  # fmt: skip
_OPTIONAL = {"poll", "settle", "sentinel"}  # None: chosen from the filesystem (see watcher/setup.py) or unused
# Seconds settings and their smallest allowed value. A zero poll or rescan interval turns the idle daemon into a
# busy loop (it burnt half a core), so those have a floor; settle may be 0 (a sentinel-written run needs none).
_SECONDS_FIELDS = {"poll": 0.1, "settle": 0.0, "rescan_interval": 1.0, "job_timeout": 1.0, "retry_backoff": 0.0,
                   "stop_grace": 0.0}  # fmt: skip
_WHY_MINIMUM = {"poll": " (a shorter poll keeps a core busy listing the output dir)",
                "rescan_interval": " (a shorter rescan keeps a core busy listing the output dir)"}  # fmt: skip
# Evaluator options that name files or folders (lm_eval/lmms_eval include_path, the probes' text, lmms_eval's
# python): written relative in a config file, they mean relative to that file, like the top-level paths.
_OPTION_PATHS = {"include_path", "text", "python"}


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file into a dict of known keys; relative paths in it are relative to the file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:  # tomllib decodes the whole file first: random bytes fail there
        raise ConfigError(f"config file {path} is not valid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    for key in data:
        if key not in FIELD_NAMES:
            raise ConfigError(f"unknown key '{key}' in config file {path}")
    # Only values of the right type are resolved here; anything else is left for `validate` to report.
    base = Path(path).parent
    for key in _PATH_FIELDS & data.keys():
        if isinstance(data[key], str) and data[key]:
            data[key] = (base / Path(data[key]).expanduser()).resolve()
        elif key == "output_dir" and isinstance(data[key], list):  # several runs
            data[key] = [(base / Path(d).expanduser()).resolve() if isinstance(d, str) and d else d
                         for d in data[key]]  # fmt: skip
    slurm = data.get("slurm")
    if isinstance(slurm, dict) and isinstance(slurm.get("job_dir"), str) and slurm["job_dir"]:
        slurm["job_dir"] = (base / Path(slurm["job_dir"]).expanduser()).resolve()
    backends, presets = data.get("backends", {}), data.get("presets", {})
    tables = [*backends.values()] if isinstance(backends, dict) else []
    for preset in presets.values() if isinstance(presets, dict) else []:
        evaluators = preset.get("evaluators", []) if isinstance(preset, dict) else []
        tables += evaluators if isinstance(evaluators, list) else []
    for table in tables:
        if isinstance(table, dict):
            for key in _OPTION_PATHS & table.keys():
                table[key] = _relative_to(base, table[key])
            if "command" in table:  # the command backend's argument list: its script paths, not its options
                from watcher.evaluators.command import resolve_command_paths

                table["command"] = resolve_command_paths(base, table["command"])
    return data


def _relative_to(base: Path, value: Any) -> Any:
    """A relative path (or each of a list of them) made absolute against `base`; anything else unchanged, for the
    backend's own validation to report. A bare command name like "python" stays as it is (it is looked up on PATH)."""
    if isinstance(value, list):
        return [_relative_to(base, item) for item in value]
    if not isinstance(value, str) or not value or ("/" not in value and not (base / value).exists()):
        return value
    return str((base / Path(value).expanduser()).resolve())


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> WatchConfig:
    """Defaults, then the config file, then command-line overrides (None means 'not given')."""
    values = dict(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = WatchConfig(**values)
    validate(config)
    return config


def validate(config: WatchConfig) -> None:
    """Check types and ranges; every message names the option and is one line (the CLI exits 2 with it)."""
    for name in _STRING_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, str) and not (value is None and name in _OPTIONAL):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    for name, minimum in _SECONDS_FIELDS.items():
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        # nan compares false with everything, and inf would never end a wait: finite numbers only.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number of seconds, got {value!r}")
        if value < minimum:
            floor = f"at least {minimum:g} s" if minimum > 0 else "non-negative"
            raise ConfigError(f"{name} must be {floor}, got {value!r}{_WHY_MINIMUM.get(name, '')}")
        setattr(config, name, float(value))
    for name in _PATH_FIELDS:
        value = getattr(config, name)
        if value is not None and not isinstance(value, (Path, list)):  # a list of output dirs: _validate_runs
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a path, got {value!r}")
            setattr(config, name, Path(value).expanduser())
    _validate_runs(config)
    if type(config.verbosity) is not int or config.verbosity not in (-1, 0, 1):
        raise ConfigError(f"verbosity must be -1, 0 or 1, got {config.verbosity!r}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {config.log_format!r}")
    if config.policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {config.policy!r}")
    if not isinstance(config.variants, list) or not config.variants or any(v not in VARIANTS for v in config.variants):
        raise ConfigError(f"variants must be a non-empty list of {', '.join(VARIANTS)}, got {config.variants!r}")
    if isinstance(config.keep_merged, bool) or not isinstance(config.keep_merged, int) or config.keep_merged < 0:
        raise ConfigError(f"keep_merged must be a non-negative integer, got {config.keep_merged!r}")
    if isinstance(config.max_attempts, bool) or not isinstance(config.max_attempts, int) or config.max_attempts < 1:
        raise ConfigError(f"max_attempts must be a positive integer, got {config.max_attempts!r}")
    if not isinstance(config.preset, str) or not config.preset:
        raise ConfigError(f"preset must be a name, got {config.preset!r}")
    if not isinstance(config.presets, dict):
        raise ConfigError("presets must be a table of [presets.NAME] tables")
    if not isinstance(config.wandb, str):
        raise ConfigError(f"wandb must be auto, off or [ENTITY/]PROJECT/RUN_ID, got {config.wandb!r}")
    from watcher.sinks.wandb_run import LIVE_MODES, parse_setting  # no wandb import: only names and parsing

    try:
        parse_setting(config.wandb)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(config.tensorboard, str) or not config.tensorboard:
        raise ConfigError(f"tensorboard must be auto, off or a folder, got {config.tensorboard!r}")
    if config.wandb_live not in LIVE_MODES:
        raise ConfigError(f"wandb_live must be one of {', '.join(LIVE_MODES)}, got {config.wandb_live!r}")
    if not isinstance(config.backends, dict) or not all(isinstance(v, dict) for v in config.backends.values()):
        raise ConfigError("backends must be a table of [backends.NAME] tables")
    try:
        pattern = re.compile(config.checkpoint_pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"checkpoint_pattern is not a valid regular expression: {exc}") from None
    if "step" not in pattern.groupindex and pattern.groups == 0:
        raise ConfigError(f"checkpoint_pattern must capture the step, as (?P<step>\\d+) or a first group: "
                          f"{config.checkpoint_pattern!r} has no group")  # fmt: skip
    if config.sentinel is not None and (not isinstance(config.sentinel, str) or "/" in config.sentinel):
        raise ConfigError(f"sentinel must be a file name, got {config.sentinel!r}")
    if not isinstance(config.warm, bool):
        raise ConfigError(f"warm must be true or false, got {config.warm!r}")
    for name, minimum in (("warm_max_jobs", 1), ("warm_max_rss_mb", 1), ("warm_max_gpu_mb", 0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be a {'positive' if minimum else 'non-negative'} integer, got {value!r}")
    for name, minimum in (("cpu_jobs", 1), ("gpu_busy_mib", 0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum else "a non-negative integer (MiB)"
            raise ConfigError(f"{name} must be {kind}, got {value!r}")
    if not isinstance(config.schedule, list):
        raise ConfigError("schedule must be a list of [[schedule]] tables")
    config.schedule = [schedule_entry(i, entry) for i, entry in enumerate(config.schedule, 1)]
    if not isinstance(config.keep_best, list):
        raise ConfigError("keep_best must be a list of rules: keep_best = [{ metric = \"...\", k = 3 }] or [[keep_best]]")
    config.keep_best = [keep_best_rule(i, rule) for i, rule in enumerate(config.keep_best, 1)]
    kept = [(rule.metric, rule.variant) for rule in config.keep_best]
    twice = next((pair for i, pair in enumerate(kept) if pair in kept[:i]), None)
    if twice is not None:
        raise ConfigError(f"two keep_best rules for metric {twice[0]!r} ({twice[1]}): give one, with the k you want")
    for name in ("keep_best_copy", "keep_merged_best"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(config, name)!r}")
    if config.executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {config.executor!r}")
    config.slurm = slurm_settings(config.slurm)
    if not isinstance(config.alerts, list):
        raise ConfigError("alerts must be a list of [[alerts]] tables")
    config.alerts = [alert_rule(i, rule) for i, rule in enumerate(config.alerts, 1)]
    names = [rule.name for rule in config.alerts]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"two alert rules are named {twice[0]!r}: give each a unique name")


def _validate_runs(config: WatchConfig) -> None:
    """output_dir (one or a list) or runs_root; run names (folder names) unique; W&B not pinned to one run."""
    if isinstance(config.output_dir, list):
        if not config.output_dir or not all(isinstance(d, (str, Path)) and str(d) for d in config.output_dir):
            raise ConfigError(f"output_dir must be a folder or a non-empty list of folders, got {config.output_dir!r}")
        config.output_dir = [Path(d).expanduser() for d in config.output_dir]
        if len(config.output_dir) == 1:
            config.output_dir = config.output_dir[0]
    if config.runs_root is not None and config.output_dir is not None:
        raise ConfigError("give output_dir (one run or a list) or runs_root (a folder of runs), not both")
    names = [d.name for d in config.output_dirs()]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"two runs named {twice[0]!r} (runs are named by their folder): watch them from two "
                          "daemons, or rename one")  # fmt: skip
    if config.several_runs and isinstance(config.wandb, str) and config.wandb not in ("auto", "off"):
        raise ConfigError(f"wandb = {config.wandb!r} names one W&B run, but several training runs are watched: use "
                          "auto (each run's own) or off")  # fmt: skip
