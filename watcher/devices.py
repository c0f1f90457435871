"""Device pinning: parse `--device`, check the GPUs exist, and build the child environment that pins a job.

The daemon never initialises CUDA (no torch import, no CUDA context): it counts GPUs through `nvidia-smi`
(NVML) or the driver's /proc entries, and every job runs in a child process whose CUDA_VISIBLE_DEVICES names
exactly the chosen GPUs, so the training GPUs are never touched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from watcher.config import ConfigError
from watcher.gpu_inventory import query_gpus


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "cpu" or "cuda"
    indices: tuple[int, ...] = ()  # GPU indices as the user numbers them (after the daemon's own CUDA_VISIBLE_DEVICES)

    def __str__(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        return "cuda:" + ",".join(str(i) for i in self.indices)

    @property
    def child_devices(self) -> tuple[str, ...]:
        """The torch devices a job uses inside its child, where the pinned GPUs are renumbered from 0:
        ("cpu",), ("cuda:0",), ("cuda:0", "cuda:1") for two GPUs (a JobSpec's `devices`)."""
        if self.kind == "cpu":
            return ("cpu",)
        return tuple(f"cuda:{i}" for i in range(len(self.indices)))


_DEVICE_RE = re.compile(r"^cuda(?::(\d+(?:,\d+)*))?$")


def parse_device(text: str) -> DeviceSpec:
    text = text.strip().lower()
    if text == "cpu":
        return DeviceSpec("cpu")
    match = _DEVICE_RE.match(text)
    if not match:
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or cuda:N,M..., got {text!r}")
    # Plain `cuda`: every visible GPU (resolved by `check_available`, which knows how many there are).
    indices = tuple(int(i) for i in match.group(1).split(",")) if match.group(1) else ()
    if len(set(indices)) != len(indices):
        raise ConfigError(f"--device lists a GPU twice: {text!r}")
    return DeviceSpec("cuda", indices)


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs), in CUDA order."""
    environ = os.environ if environ is None else environ
    inherited = environ.get("CUDA_VISIBLE_DEVICES")
    count = physical_gpu_count()
    if count == 0:
        return []
    if inherited is not None:
        # CUDA stops at the first entry it cannot resolve, so everything after it is hidden too.
        valid: list[str] = []
        for entry in (e.strip() for e in inherited.split(",")):
            if entry.isdigit() and int(entry) < count or entry.startswith(("GPU-", "MIG-")):
                valid.append(entry)
            else:
                break
        return valid
    return [str(i) for i in range(count)]


def physical_gpu_count() -> int:
    """How many NVIDIA GPUs the machine has, without touching CUDA: nvidia-smi's inventory (which also carries
    the tests' fake GPUs, see watcher/gpu_inventory.py), else the driver's /proc entries."""
    readings = query_gpus()
    if readings:
        return len(readings)
    proc = Path("/proc/driver/nvidia/gpus")
    return len(list(proc.iterdir())) if proc.is_dir() else 0


def check_available(spec: DeviceSpec, environ: dict[str, str] | None = None) -> list[str]:
    """Return the CUDA_VISIBLE_DEVICES entries for the spec, or raise ConfigError saying what is missing."""
    if spec.kind == "cpu":
        return []
    gpus = visible_gpus(environ)
    if not gpus:
        raise ConfigError(f"device {spec.kind if not spec.indices else spec} is not available: no NVIDIA GPU is "
                          "visible on this machine")  # fmt: skip
    if not spec.indices:
        return gpus
    missing = [i for i in spec.indices if i >= len(gpus)]
    if missing:
        have = "cuda:0" if len(gpus) == 1 else f"cuda:0..cuda:{len(gpus) - 1}"
        raise ConfigError(f"device {spec} is not available: this machine has {len(gpus)} visible GPU(s) ({have})")
    return [gpus[i] for i in spec.indices]


def resolve_device(text: str, environ: dict[str, str] | None = None) -> tuple[DeviceSpec, list[str]]:
    """`device` as the pool's GPUs (plain `cuda` becomes every visible one) and their CUDA_VISIBLE_DEVICES
    entries; a ConfigError saying what is missing otherwise."""
    spec = parse_device(text)
    entries = check_available(spec, environ)
    if spec.kind == "cuda" and not spec.indices:
        spec = DeviceSpec("cuda", tuple(range(len(entries))))
    return spec, entries


def child_environment(gpu_entries: list[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a job's child process: only the pinned GPUs are visible (none at all for cpu)."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_entries)  # "" hides every GPU from a cpu job
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # match nvidia-smi's numbering, which users read indices from
    return env
