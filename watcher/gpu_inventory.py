"""The GPU inventory: each GPU's index, UUID and memory in use, read through `nvidia-smi` (NVML), never CUDA.

The pool (watcher/pool.py) asks before it offers a GPU whether another process is using it. The daemon must never
initialise CUDA (it would hold a context, and memory, on a GPU that may be training), so the reading comes from
`nvidia-smi --query-gpu`, like the GPU count in watcher/devices.py. One query forks nvidia-smi for ~25 ms (22-25 ms
measured on an H100 host), so `GpuInventory` keeps a reading for a second and a half: one loop tick that offers
several slots forks it once.

Test seam (the only one): the environment variable CKPT_WATCH_FAKE_GPUS, read by `query_gpus` (and `query_process_usage`,
which then discounts nothing) and nowhere else,
replaces nvidia-smi with fake GPUs, so CPU-only CI can exercise a pool of four "GPUs" (jobs then run on the CPU
while pinned to the fake ids). Production never sets it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

FAKE_GPUS_ENV = "CKPT_WATCH_FAKE_GPUS"
_QUERY = ["--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"]
DEFAULT_MAX_AGE_S = 1.5


@dataclass(frozen=True)
class GpuReading:
    index: int  # nvidia-smi's index (PCI bus order), which CUDA_VISIBLE_DEVICES digits name under PCI_BUS_ID order
    uuid: str  # GPU-...; what CUDA_VISIBLE_DEVICES names when it lists UUIDs
    used_mib: int | None  # None where nvidia-smi cannot say ("[N/A]", e.g. a GPU in MIG mode)
    total_mib: int | None


def query_gpus(environ: Mapping[str, str] | None = None, timeout: float = 10.0) -> tuple[GpuReading, ...] | None:
    """Every GPU of the machine with its memory in use; () when there is no NVIDIA GPU (no nvidia-smi), None when
    nvidia-smi is there but did not answer (timed out, failed), so the caller can tell "none" from "unknown".

    CKPT_WATCH_FAKE_GPUS="INDEX:TOTAL_MIB:USED_MIB,..." (e.g. "0:81000:0,1:81000:30000") stands in for
    nvidia-smi in tests; production never sets it (see the module docstring).
    """
    environ = os.environ if environ is None else environ
    fake = environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        return parse_fake_gpus(fake)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, *_QUERY], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_query_output(out.stdout)


def parse_query_output(text: str) -> tuple[GpuReading, ...]:
    """nvidia-smi's CSV (index, uuid, memory.used, memory.total; no header, no units) as readings."""
    readings = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue  # a warning line nvidia-smi sometimes prints: not a GPU
        readings.append(GpuReading(int(cells[0]), cells[1], _mib(cells[2]), _mib(cells[3])))
    return tuple(readings)


def parse_fake_gpus(text: str) -> tuple[GpuReading, ...]:
    """The test seam's value: "INDEX:TOTAL_MIB:USED_MIB" entries separated by commas ("" = a machine with none)."""
    readings = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            index, total, used = (int(part) for part in entry.split(":"))
        except ValueError:
            raise ValueError(f"{FAKE_GPUS_ENV}: {entry!r} is not INDEX:TOTAL_MIB:USED_MIB") from None
        readings.append(GpuReading(index, f"GPU-fake-{index}", used, total))
    return tuple(readings)


def _mib(cell: str) -> int | None:
    return int(cell) if cell.isdigit() else None


def query_process_usage(timeout: float = 10.0) -> dict[tuple[str, int], int]:
    """MiB of GPU memory each process uses, by (GPU UUID, pid), from `nvidia-smi --query-compute-apps`; {} when
    it cannot say (no nvidia-smi, the fake GPUs of the test seam, a failure): nothing is then discounted."""
    if os.environ.get(FAKE_GPUS_ENV) is not None or shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    usage = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) == 3 and cells[1].isdigit() and _mib(cells[2]) is not None:
            usage[(cells[0], int(cells[1]))] = _mib(cells[2]) or 0
    return usage


class GpuInventory:
    """The latest reading, taken again when older than `max_age` seconds or after `invalidate()` (the pool calls
    it when a job releases its GPUs, so the next offer sees the memory that job freed, not a reading from before)."""

    def __init__(self, query: Callable[[], tuple[GpuReading, ...] | None] = query_gpus,
                 max_age: float = DEFAULT_MAX_AGE_S, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._query, self._max_age, self._clock = query, max_age, clock
        self._reading: tuple[GpuReading, ...] | None = None
        self._taken_at: float | None = None
        self.queries = 0  # how many times nvidia-smi ran: tests check the cache holds
        self._own: set[int] = set()  # our own processes (idle warm workers): their memory is not "another's"

    def discount(self, pids: set[int]) -> None:
        """Readings leave out what these processes of ours use (an idle warm worker's CUDA context and cache,
        ~1.3 GiB on an H100 after a 1.1B job: over gpu_busy_mib, it would make its own GPU look taken)."""
        if pids != self._own:
            self._own = set(pids)
            self._taken_at = None

    def readings(self) -> tuple[GpuReading, ...] | None:
        now = self._clock()
        if self._taken_at is None or now - self._taken_at >= self._max_age:
            self._reading, self._taken_at = self._query(), now
            self.queries += 1
            if self._own and self._reading:
                usage = query_process_usage()
                self._reading = tuple(replace(r, used_mib=max(0, r.used_mib - sum(
                    mib for (uuid, pid), mib in usage.items() if uuid == r.uuid and pid in self._own)))
                    if r.used_mib is not None else r for r in self._reading)  # fmt: skip
        return self._reading

    def invalidate(self) -> None:
        self._taken_at = None

    def find(self, entry: str) -> GpuReading | None:
        """The reading for one CUDA_VISIBLE_DEVICES entry (an index or a GPU UUID); None if unknown (a MIG entry,
        or nvidia-smi did not answer)."""
        for reading in self.readings() or ():
            if entry == str(reading.index) or entry == reading.uuid:
                return reading
        return None
