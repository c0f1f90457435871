"""The pool of device slots over fake GPUs (the inventory's one test seam, CKPT_WATCH_FAKE_GPUS) and cpu slots."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from watcher.devices import parse_device
from watcher.gpu_inventory import FAKE_GPUS_ENV, GpuInventory, parse_query_output, query_gpus
from watcher.pool import Pool

FOUR_IDLE = "0:81000:0,1:81000:4,2:81000:500,3:81000:0"  # 4 and 500 MiB: an idle GPU's driver reservations


def _pool(fake: str = FOUR_IDLE, device: str = "cuda:0,1,2,3", **kwargs) -> Pool:
    spec = parse_device(device)
    inventory = GpuInventory(lambda: query_gpus({FAKE_GPUS_ENV: fake}))
    return Pool.for_device(spec, [str(i) for i in spec.indices], inventory, **kwargs)


def test_four_one_gpu_jobs_run_at_once_each_pinned_to_its_own_gpu():
    pool = _pool()
    allocations = [pool.offer(1) for _ in range(4)]
    assert [a.gpus for a in allocations] == [(0,), (1,), (2,), (3,)]
    assert [a.cuda_visible_devices for a in allocations] == ["0", "1", "2", "3"]
    assert all(a.child_devices == ("cuda:0",) for a in allocations)  # renumbered from 0 inside each child
    assert pool.offer(1) is None and pool.free() == 0
    assert pool.why_waiting(1) == ("no free slot: needs 1 GPU, none free; cuda:0 runs a job; cuda:1 runs a job; "
                                   "cuda:2 runs a job; cuda:3 runs a job")  # fmt: skip


def test_a_two_gpu_preset_takes_pairs_of_neighbours():
    pool = _pool()
    first, second = pool.offer(2), pool.offer(2)
    assert (first.gpus, second.gpus) == ((0, 1), (2, 3))
    assert first.child_devices == ("cuda:0", "cuda:1") and second.cuda_visible_devices == "2,3"
    assert str(second) == "cuda:2,3"
    assert pool.offer(2) is None
    pool.release(first)
    single = pool.offer(1)  # GPU 0: the lowest free one
    assert single.gpus == (0,)
    assert pool.offer(2) is None and "needs 2 GPUs, 1 free (cuda:1)" in pool.why_waiting(2)


def test_a_pair_takes_neighbours_when_it_can_and_any_two_otherwise():
    pool = _pool()
    zero, _one = pool.offer(1), pool.offer(1)
    pool.release(zero)  # free: 0, 2, 3; the lowest two (0, 2) are not neighbours
    assert pool.offer(2).gpus == (2, 3)
    assert pool.offer(1).gpus == (0,)
    spread = _pool(device="cuda:0,2")
    assert spread.offer(2).gpus == (0, 2)  # no neighbours in this pool: the two it has


def test_a_gpu_another_process_uses_is_skipped_and_the_reason_named():
    pool = _pool("0:81000:0,1:81000:30000,2:81000:0,3:81000:0")
    assert [pool.offer(1).gpus for _ in range(3)] == [(0,), (2,), (3,)]
    assert pool.offer(1) is None
    assert "cuda:1 busy: 30000 of 81000 MiB used by another process" in pool.why_waiting(1)
    states = {slot.name: slot for slot in pool.slots()}
    assert states["cuda:1"].busy and not states["cuda:1"].held and states["cuda:0"].held


def test_the_busy_threshold_is_configurable():
    assert _pool("0:81000:2000", device="cuda:0").offer(1) is None  # default 1024 MiB
    assert _pool("0:81000:2000", device="cuda:0", busy_mib=4096).offer(1) is not None


def test_release_gives_the_gpus_back_and_reads_the_memory_again():
    readings = iter(["0:81000:0", "0:81000:0", "0:81000:20000"])
    inventory = GpuInventory(lambda: query_gpus({FAKE_GPUS_ENV: next(readings)}), max_age=3600)
    pool = Pool([0], ["0"], inventory)
    allocation = pool.offer(1)
    assert pool.offer(1) is None and inventory.queries == 1  # cached: one nvidia-smi per tick, not one per offer
    pool.release(allocation)
    assert pool.offer(1) is not None  # read again after the release (second reading: free)
    pool.release(pool.held()[0])
    assert pool.offer(1) is None and "20000 of 81000 MiB" in pool.why_waiting()  # third reading: someone came
    with pytest.raises(ValueError):
        pool.release(allocation)  # twice: a bug, not silently ignored


def test_the_reading_is_cached_for_a_moment():
    now = [0.0]
    inventory = GpuInventory(lambda: (), max_age=1.5, clock=lambda: now[0])
    inventory.readings(), inventory.readings()
    now[0] = 1.0
    inventory.readings()
    assert inventory.queries == 1
    now[0] = 1.6
    inventory.readings()
    assert inventory.queries == 2


def test_cpu_jobs_slots():
    pool = _pool(device="cpu")
    single = pool.offer(2)  # a cpu pool runs any preset in one slot
    assert single.child_devices == ("cpu",) and single.visible_devices == () and str(single) == "cpu#0"
    assert pool.offer(1) is None and pool.why_waiting() == "no free slot: cpu#0 runs a job (cpu_jobs = 1)"
    three = _pool(device="cpu", cpu_jobs=3)
    held = [three.offer(1) for _ in range(3)]
    assert [a.cpu_slot for a in held] == [0, 1, 2] and three.offer(1) is None
    three.release(held[1])
    assert three.offer(1).cpu_slot == 1


def test_a_job_larger_than_the_pool_is_said_to_never_fit():
    pool = _pool(device="cuda:2")
    assert not pool.fits(2) and pool.offer(2) is None
    assert pool.why_waiting(2) == "needs 2 GPUs, the pool has 1 (cuda:2)"


def test_pool_indices_go_through_the_daemons_visible_devices_to_the_inventory():
    # The daemon runs with CUDA_VISIBLE_DEVICES=4,6: its cuda:1 is the machine's GPU 6, busy here.
    inventory = GpuInventory(lambda: query_gpus({FAKE_GPUS_ENV: "4:81000:0,6:81000:9000"}))
    pool = Pool.for_device(parse_device("cuda:0,1"), ["4", "6"], inventory)
    assert pool.offer(1).visible_devices == ("4",) and pool.offer(1) is None
    assert "cuda:1 busy: 9000 of 81000 MiB" in pool.why_waiting()


def test_unknown_memory_is_offered():
    # nvidia-smi did not answer (None), or the entry is a MIG instance it reports no memory for.
    pool = Pool([0, 1], ["0", "MIG-abc"], GpuInventory(lambda: None))
    assert pool.offer(1).gpus == (0,) and pool.offer(1).gpus == (1,)


def test_nvidia_smi_output_is_parsed():
    # The first line as an H100 printed it; the second as a GPU in MIG mode does.
    text = "0, GPU-d59012fe-2f76-32bd-4722-fe39807779df, 3599, 81559\n1, GPU-bbb, [N/A], [N/A]\nWARNING: x\n"
    readings = parse_query_output(text)
    assert [(r.index, r.uuid, r.used_mib, r.total_mib) for r in readings] == [
        (0, "GPU-d59012fe-2f76-32bd-4722-fe39807779df", 3599, 81559), (1, "GPU-bbb", None, None)]  # fmt: skip


def test_the_seam_rejects_a_malformed_value_and_is_off_by_default():
    with pytest.raises(ValueError, match=FAKE_GPUS_ENV):
        query_gpus({FAKE_GPUS_ENV: "0:81000"})
    assert query_gpus({FAKE_GPUS_ENV: ""}) == ()
    # Without the variable the real nvidia-smi answers (or, on a machine with none, nothing does).
    code = ("from watcher.gpu_inventory import query_gpus; r = query_gpus()\n"
            "print(r is None or all(g.uuid.startswith('GPU-') and 'fake' not in g.uuid for g in r))")
    env = {k: v for k, v in os.environ.items() if k != FAKE_GPUS_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
