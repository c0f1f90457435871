"""Configuration: one typed dataclass, loadable from TOML, overridable from the command line.

Every field is documented where it is declared. A TOML file may set any field by its name; command-line flags
override the file. Unknown keys are an error naming the key, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A usage or configuration problem: reported as one line, exit status 2."""


class BadCheckpointName(ValueError):
    """A folder name the checkpoint pattern admits that cannot be a checkpoint (the message says why)."""


MAX_STEP = 2**63 - 1  # SQLite's INTEGER


# HF Trainer and LMMs-Engine: checkpoint-N; torchtitan: step-N; veRL: global_step_N.
DEFAULT_CHECKPOINT_PATTERN = r"^(?:checkpoint-|step-|global_step_)(?P<step>\d+)$"
POLICIES = ("all", "latest")
LOG_FORMATS = ("auto", "plain", "json")
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
    config.schedule = [_schedule_entry(i, entry) for i, entry in enumerate(config.schedule, 1)]
    if not isinstance(config.keep_best, list):
        raise ConfigError("keep_best must be a list of rules: keep_best = [{ metric = \"...\", k = 3 }] or [[keep_best]]")
    config.keep_best = [_keep_best_rule(i, rule) for i, rule in enumerate(config.keep_best, 1)]
    kept = [(rule.metric, rule.variant) for rule in config.keep_best]
    twice = next((pair for i, pair in enumerate(kept) if pair in kept[:i]), None)
    if twice is not None:
        raise ConfigError(f"two keep_best rules for metric {twice[0]!r} ({twice[1]}): give one, with the k you want")
    for name in ("keep_best_copy", "keep_merged_best"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(config, name)!r}")
    if config.executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {config.executor!r}")
    config.slurm = _slurm_settings(config.slurm)
    if not isinstance(config.alerts, list):
        raise ConfigError("alerts must be a list of [[alerts]] tables")
    config.alerts = [_alert_rule(i, rule) for i, rule in enumerate(config.alerts, 1)]
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


def _schedule_entry(number: int, entry: Any) -> ScheduleEntry:
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


def _keep_best_rule(number: int, rule: Any) -> KeepBestRule:
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


def _slurm_settings(table: Any) -> SlurmSettings:
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


def _alert_rule(number: int, rule: Any) -> AlertRule:
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
