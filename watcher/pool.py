"""The pool of device slots: which GPUs (or cpu slots) are free for the next job, and why a job waits.

`device` names the pool: `cuda:1,2,3,4` (those GPUs), `cuda` (every visible GPU: the caller resolves it to their
indices), or `cpu` (`cpu_jobs` slots, default 1). A preset's `gpus` says how many GPUs one of its jobs takes.
`offer(gpus)` hands out an `Allocation` (the GPUs a job's child is pinned to) or None; `release` gives it back.

A GPU is offered only when no job of ours holds it and no other process uses more than `busy_mib` of its
memory (read through nvidia-smi by watcher/gpu_inventory.py; the daemon never initialises CUDA). Default 1024
MiB, measured on an H100: idle 0 MiB, a process holding only a torch CUDA context 621 MiB, one that holds a
3 GiB tensor 3599 MiB (and 0 again a second after it exits). So an idle GPU, a display server's few hundred MiB
or a notebook that merely touched CUDA do not block it, while anything with a model loaded does: work a job
would slow down, or run out of memory next to. A GPU whose reading is unknown (nvidia-smi did not answer, a MIG
entry) is offered: the pool never blocks on a tool failing, as the daemon did before it checked memory at all.

Which GPUs a multi-GPU job gets: a run of consecutive free indices when there is one (on PCIe machines
neighbouring indices usually share a PCIe switch or a CPU socket, which tensor-parallel vLLM's all-reduce feels;
on NVSwitch machines every pair is equal, so nothing is lost), else the lowest free ones. A one-GPU job takes the
lowest free GPU. No topology query: `nvidia-smi topo` adds a second tool for a gain only pairs on PCIe would see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from watcher.devices import DeviceSpec
from watcher.gpu_inventory import GpuInventory

DEFAULT_GPU_BUSY_MIB = 1024
DEFAULT_CPU_JOBS = 1


@dataclass(frozen=True)
class Allocation:
    """The slots one job holds. For GPUs: the user-numbered indices (as in `device`), the CUDA_VISIBLE_DEVICES
    entries its child gets, and the devices as the child sees them after pinning (renumbered from 0)."""

    gpus: tuple[int, ...]  # () for a cpu slot
    visible_devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES entries; () hides every GPU from a cpu job
    child_devices: tuple[str, ...]  # ("cuda:0", "cuda:1") for a pair, ("cpu",) for a cpu slot
    cpu_slot: int | None = None  # which of the `cpu_jobs` slots (so two cpu allocations differ)
    label: str = "cpu"  # what a slot of a pool without GPUs is: "cpu" (a local child), "slurm" (a Slurm job)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.visible_devices)

    @property
    def slot_names(self) -> tuple[str, ...]:
        """The slots it holds, named as `SlotState.name`: ("cuda:1", "cuda:2"), ("cpu#0",)."""
        return (_slot_name(self.label, self.cpu_slot),) if self.cpu_slot is not None else tuple(map(_gpu_slot_name, self.gpus))

    @property
    def device(self) -> str:
        """The job's device as logs and result records say it: "cuda:1,2" (user numbering), "cpu"."""
        return self.label if self.cpu_slot is not None else str(self)

    def __str__(self) -> str:
        """As the user names the slots: "cuda:1,2", "cpu#0"."""
        return _slot_name(self.label, self.cpu_slot) if self.cpu_slot is not None else "cuda:" + ",".join(map(str, self.gpus))


def _gpu_slot_name(gpu: int) -> str:
    return f"cuda:{gpu}"


def _slot_name(label: str, slot: int) -> str:
    return f"{label}#{slot}"


@dataclass(frozen=True)
class SlotState:
    """One slot as `status` and the live view show it."""

    name: str  # "cuda:1" (user numbering) or "cpu#0"
    held: bool  # one of our jobs holds it
    busy: str | None = None  # another process uses it: "30000 of 81000 MiB used by another process"
    gpu: int | None = None  # the user-numbered GPU index; None for a cpu slot

    @property
    def free(self) -> bool:
        return not self.held and self.busy is None


class Pool:
    def __init__(self, gpus: Sequence[int] = (), visible_devices: Sequence[str] = (),
                 inventory: GpuInventory | None = None, busy_mib: int = DEFAULT_GPU_BUSY_MIB,
                 cpu_jobs: int = DEFAULT_CPU_JOBS, label: str = "cpu") -> None:  # fmt: skip
        """A GPU pool when `gpus` (user-numbered indices) and their `visible_devices` entries are given (see
        watcher/devices.check_available), else a pool of `cpu_jobs` slots named `label`#N: local cpu jobs, or
        with label "slurm" the Slurm jobs in flight (`[slurm] max_jobs`; Slurm places them)."""
        if len(gpus) != len(visible_devices):
            raise ValueError("each GPU of the pool needs its CUDA_VISIBLE_DEVICES entry")
        if gpus and inventory is None:
            raise ValueError("a GPU pool needs an inventory")
        self._entry = dict(zip(gpus, visible_devices))
        self._gpus = tuple(gpus)
        self._inventory = inventory
        self._busy_mib = busy_mib
        self._cpu_jobs = cpu_jobs
        self._label = label
        self._held: list[Allocation] = []

    @classmethod
    def for_device(cls, device: DeviceSpec, visible_devices: Sequence[str], inventory: GpuInventory | None = None,
                   busy_mib: int = DEFAULT_GPU_BUSY_MIB, cpu_jobs: int = DEFAULT_CPU_JOBS) -> "Pool":  # fmt: skip
        """The pool `device` names; `visible_devices` as watcher/devices.check_available returns them."""
        if device.kind == "cpu":
            return cls(cpu_jobs=cpu_jobs)
        return cls(device.indices, visible_devices, inventory or GpuInventory(), busy_mib)

    @property
    def is_cpu(self) -> bool:
        return not self._gpus

    @property
    def size(self) -> int:
        """Slots in all: GPUs of the pool, or cpu_jobs."""
        return len(self._gpus) or self._cpu_jobs

    def held(self) -> tuple[Allocation, ...]:
        return tuple(self._held)

    def fits(self, gpus_needed: int) -> bool:
        """Whether a job of this size can ever run here (the daemon checks each scheduled preset at start)."""
        return self.is_cpu or gpus_needed <= len(self._gpus)

    # --- the state of each slot --------------------------------------------------------------------------------

    def slots(self) -> tuple[SlotState, ...]:
        if self.is_cpu:
            taken = {a.cpu_slot for a in self._held}
            return tuple(SlotState(_slot_name(self._label, i), i in taken) for i in range(self._cpu_jobs))
        held = {gpu for a in self._held for gpu in a.gpus}
        return tuple(SlotState(_gpu_slot_name(g), g in held, None if g in held else self._busy(g), g)
                     for g in self._gpus)  # fmt: skip

    def _busy(self, gpu: int) -> str | None:
        # Only asked for GPUs none of our jobs holds: memory on a held GPU is our own job's.
        assert self._inventory is not None
        reading = self._inventory.find(self._entry[gpu])
        if reading is None or reading.used_mib is None or reading.used_mib <= self._busy_mib:
            return None
        of_total = f" of {reading.total_mib}" if reading.total_mib else ""
        return f"{reading.used_mib}{of_total} MiB used by another process"

    def free(self) -> int:
        """How many slots a job could take now (free GPUs, or free cpu slots)."""
        free = sum(1 for slot in self.slots() if slot.free)
        return max(0, min(free, self._cpu_jobs - len(self._held))) if self.is_cpu else free

    # --- offer and release -------------------------------------------------------------------------------------

    def offer(self, gpus_needed: int = 1) -> Allocation | None:
        """Slots for a job of `gpus_needed` GPUs (one cpu slot in a cpu pool), now held; None when they are not
        free (see `why_waiting`)."""
        if gpus_needed < 1:
            raise ValueError(f"a job needs at least one GPU, got {gpus_needed}")
        if self.is_cpu:
            free_cpu = [i for i, slot in enumerate(self.slots()) if slot.free]
            if not free_cpu or len(self._held) >= self._cpu_jobs:  # held beyond: see `hold_beyond`
                return None
            allocation = Allocation((), (), ("cpu",), cpu_slot=free_cpu[0], label=self._label)
        else:
            chosen = _choose(self._free_gpus(), gpus_needed)
            if chosen is None:
                return None
            allocation = Allocation(chosen, tuple(self._entry[g] for g in chosen),
                                    tuple(f"cuda:{i}" for i in range(len(chosen))))  # fmt: skip
        self._held.append(allocation)
        return allocation

    def discount(self, pids: set[int]) -> None:
        """Memory these processes of ours hold (idle warm workers) does not make a GPU busy."""
        if self._inventory is not None:
            self._inventory.discount(pids)

    def hold_beyond(self) -> Allocation:
        """A slot past the pool's size, for a Slurm job adopted at start when `max_jobs` was lowered meanwhile:
        it is followed to its end, and no new job starts until the count is below `max_jobs` again."""
        allocation = Allocation((), (), ("cpu",), cpu_slot=self._cpu_jobs + len(self._held), label=self._label)
        self._held.append(allocation)
        return allocation

    def release(self, allocation: Allocation) -> None:
        """Give a finished (or stopped) job's slots back. Releasing what is not held is a bug, so it raises."""
        self._held.remove(allocation)  # ValueError if not held
        if self._inventory is not None:
            self._inventory.invalidate()  # the next offer reads the memory the job freed, not an older reading

    def _free_gpus(self) -> list[int]:
        return [slot.gpu for slot in self.slots() if slot.free and slot.gpu is not None]

    def why_waiting(self, gpus_needed: int = 1) -> str:
        """One line saying why a job of `gpus_needed` GPUs cannot start now ("" when it could)."""
        if not self.fits(gpus_needed):
            return f"needs {gpus_needed} GPUs, the pool has {len(self._gpus)} ({self.describe()})"
        slots = self.slots()
        free = [s.name for s in slots if s.free]
        wanted = 1 if self.is_cpu else gpus_needed
        if len(free) >= wanted:
            return ""
        reasons = [f"{s.name} runs a job" for s in slots if s.held] + [f"{s.name} busy: {s.busy}" for s in slots
                                                                        if s.busy]  # fmt: skip
        if self.is_cpu:
            setting = "slurm.max_jobs" if self._label == "slurm" else "cpu_jobs"
            return f"no free slot: {', '.join(reasons)} ({setting} = {self._cpu_jobs})"
        have = f"{len(free)} free ({', '.join(free)})" if free else "none free"
        return f"no free slot: needs {gpus_needed} GPU{'s' if gpus_needed > 1 else ''}, {have}; {'; '.join(reasons)}"

    def describe(self) -> str:
        return f"{self._label} x{self._cpu_jobs}" if self.is_cpu else "cuda:" + ",".join(map(str, self._gpus))


def _choose(free: list[int], needed: int) -> tuple[int, ...] | None:
    """`needed` GPUs of the free ones (in pool order): a consecutive run if any (see the module docstring), else
    the lowest."""
    if len(free) < needed:
        return None
    ordered = sorted(free)
    for start in range(len(ordered) - needed + 1):
        window = ordered[start : start + needed]
        if window[-1] - window[0] == needed - 1:
            return tuple(window)
    return tuple(ordered[:needed])
