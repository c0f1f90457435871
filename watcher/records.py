"""The records that pass between the daemon's stages, as types; the one place that turns them into JSON and back.

    daemon --JobSpec--> worker --Outcome--> daemon --Result--> journal, results.jsonl, sinks, status, compare, plot

- `JobSpec`: what a job's worker is told (a JSON file in the job's folder; later a Slurm job's folder).
- `Outcome`: what the worker found (ok, or a failure that is transient, permanent or "gone"), written atomically
  by the worker and read back by the daemon.
- `Result`: the committed record of one finished job, exactly as the journal stores it and every reader sees it.
- `JobState`: the journal's job states (ACTIVE_STATES: a worker is on the job).

A leaf: imports nothing from the rest of ckpt-watch, so every stage may import it. Readers are tolerant of
records written by older versions (missing fields take their defaults) and keep fields they do not know, so
a newer record read by an older reader loses nothing when it is written again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any


def iso_time(timestamp: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds, the one format for times in records."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def device_text(devices: tuple[str, ...] | list[str]) -> str:
    """Torch devices as one string: ("cuda:0", "cuda:1") -> "cuda:0,1", ("cuda:0",) -> "cuda:0", ("cpu",) -> "cpu"."""
    if len(devices) > 1:
        return devices[0].split(":")[0] + ":" + ",".join(d.split(":")[1] for d in devices)
    return devices[0]


class JobState(str, Enum):
    """A job's state in the journal (see the transition diagram in watcher/journal.py).

    A `str` enum: stored in SQLite as its value, and equal to it (`JobState.DONE == "done"`).
    """

    PENDING = "pending"
    PREPARING = "preparing"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"
    GONE = "gone"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = (JobState.PREPARING, JobState.EVALUATING)  # a worker is (or was, before a crash) on it


# --- presets (what a job runs) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluatorStep:
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    time_budget: float | None
    evaluators: tuple[EvaluatorStep, ...]
    # GPUs one job of this preset takes from the pool (data-parallel lm-eval / tensor-parallel vLLM over them);
    # a cpu pool runs it in one cpu slot whatever this says.
    gpus: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "time_budget": self.time_budget,
                "evaluators": [{"backend": e.backend, "options": e.options} for e in self.evaluators],
                "gpus": self.gpus}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preset":
        steps = tuple(EvaluatorStep(e["backend"], dict(e.get("options", {}))) for e in data.get("evaluators", []))
        return cls(data["name"], data.get("description", ""), data.get("time_budget"), steps,
                   int(data.get("gpus", 1)))  # a spec written before presets had `gpus`: one GPU


# --- daemon -> worker --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to run one job; the journal's facts, never read again from the checkpoint."""

    job_id: int
    checkpoint_name: str
    checkpoint_path: Path
    step: int
    generation: int
    layout: str  # as the detector decided it (watcher/completion.py); merge/ is told, it does not guess again
    variants: tuple[str, ...]  # the weight variants the checkpoint holds
    variant: str  # the one this job evaluates
    preset: Preset
    # The torch devices the job uses, as the worker sees them after pinning (CUDA_VISIBLE_DEVICES renumbers
    # from 0): ("cpu",), ("cuda:0",), ("cuda:0", "cuda:1"). Parsed once, by the daemon.
    devices: tuple[str, ...]
    base_model: Path | None  # config/tokenizer for a checkpoint that has none (watcher/prepare.py)
    scratch_dir: Path  # the job's private folder for merged weights and evaluator files, removed afterwards
    outcome_path: Path  # where the worker writes its Outcome
    parent_pid: int  # the daemon: the worker goes with it (watcher/processes.guard)
    # The daemon keeps merged copies (keep_merged): a sharded checkpoint is merged even when every evaluator could
    # load it straight from its shards.
    keep_merged: bool = False

    @property
    def device(self) -> str:
        """The devices as one string for logs and evaluators that take one: "cuda:0,1", "cuda:0", "cpu"."""
        return device_text(self.devices)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["preset"] = self.preset.to_dict()
        data["variants"] = list(self.variants)
        data["devices"] = list(self.devices)
        for key in ("checkpoint_path", "base_model", "scratch_dir", "outcome_path"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        return cls(
            job_id=int(data["job_id"]),
            checkpoint_name=data["checkpoint_name"],
            checkpoint_path=Path(data["checkpoint_path"]),
            step=int(data["step"]),
            generation=int(data["generation"]),
            layout=data["layout"],
            variants=tuple(data["variants"]),
            variant=data["variant"],
            preset=Preset.from_dict(data["preset"]),
            devices=tuple(data["devices"]),
            base_model=Path(data["base_model"]) if data.get("base_model") else None,
            scratch_dir=Path(data["scratch_dir"]),
            outcome_path=Path(data["outcome_path"]),
            parent_pid=int(data["parent_pid"]),
            keep_merged=bool(data.get("keep_merged", False)),
        )

    def write(self, path: Path) -> None:
        from watcher.atomic import write_json_atomic  # a leaf itself (stdlib only)

        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> "JobSpec":
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


# --- worker -> daemon --------------------------------------------------------------------------------------------


class OutcomeKind(str, Enum):
    OK = "ok"
    TRANSIENT = "transient"  # the moment was wrong (a crash, a timeout, a vanished file): retried with backoff
    PERMANENT = "permanent"  # the checkpoint or the preset is wrong: retrying would fail the same way
    GONE = "gone"  # the checkpoint was deleted or re-saved under the job: nothing to record

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Outcome:
    """What a job produced. Failures carry one line in `error`; successes carry the measurements."""

    kind: OutcomeKind
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # per backend, JSON-serialisable
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # prepare_s, evaluate_s
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: walltime, peak memory
    merged_model: str | None = None  # a merged folder in the job's scratch dir, which the daemon may keep
    nonfinite: dict[str, str] = field(default_factory=dict)  # metrics reported as NaN/inf (EvalOutput.nonfinite)

    @property
    def ok(self) -> bool:
        return self.kind is OutcomeKind.OK

    @classmethod
    def failure(cls, error: str, kind: OutcomeKind = OutcomeKind.TRANSIENT) -> "Outcome":
        return cls(kind=kind, error=error)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Outcome":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["kind"] = OutcomeKind(data.get("kind", "transient"))
        return cls(**values)

    def write(self, path: Path) -> None:
        from watcher.atomic import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> "Outcome":
        """Raises OSError/ValueError when the worker wrote none (it crashed first): the caller builds the failure."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not an outcome")
        return cls.from_dict(data)


# --- the committed record ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One finished job as committed to the journal and delivered to every sink. `status` is "ok" or "failed"."""

    result_id: str
    step: int
    checkpoint: str
    variant: str
    preset: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    checkpoint_path: str = ""
    generation: int = 1
    layout: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    device: str = ""
    cuda_visible_devices: str = ""
    attempt: int = 1
    started_at: str = ""  # iso_time()
    finished_at: str = ""
    walltime_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    progress: dict[str, float] = field(default_factory=dict)  # train/epoch, train/tokens: read at detection
    log: str = ""  # the job's log, relative to the results dir
    nonfinite: dict[str, str] = field(default_factory=dict)  # metrics reported as NaN/inf: name -> "nan"/"inf"
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know, kept as they were

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        """Raises ValueError when `data` is not a result record (see `is_record`)."""
        if not cls.is_record(data):
            raise ValueError("not a result record")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("result_id", "")
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @staticmethod
    def is_record(value: Any) -> bool:
        """A JSON object with the fields every reader relies on."""
        return (
            isinstance(value, dict)
            and type(value.get("step")) is int
            and all(isinstance(value.get(key), str) for key in ("checkpoint", "variant", "preset", "status"))
            and isinstance(value.get("metrics", {}), dict)
        )
