"""`RankShardSource` on REAL per-rank DTensor saves: FSDP2 (2 ranks), a (2, 2) mesh (4 ranks), and 400 MB."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from merge.placements import Box, check_tiling, local_box
from merge.rank_shards_source import RankShardSource
from merge.source import MergeError

try:  # tests/ is a package (tests/__init__.py) in the project tree; without it, tests/ itself is on sys.path
    from tests.factories import session_distributed_checkpoints
    from tests.factories.save_rank_shards_2d import (
        PLACEMENTS,
        PLAIN_KEY,
        UNEVEN_KEY,
        make_big_checkpoint,
        session_mesh2d_checkpoint,
    )
except ModuleNotFoundError:
    from factories import session_distributed_checkpoints
    from factories.save_rank_shards_2d import (
        PLACEMENTS,
        PLAIN_KEY,
        UNEVEN_KEY,
        make_big_checkpoint,
        session_mesh2d_checkpoint,
    )

STEP = 20
VARIANTS = {
    "regular": ("pytorch_model_fsdp_0", "reference.pt"),
    "ema": ("pytorch_ema_model_fsdp_0", "reference_ema.pt"),
}
HAS_DTYPE_OPTIONS = {"dtype", "shard_dim1"} <= set(inspect.signature(session_distributed_checkpoints).parameters)


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def rank_shards_fp32(tmp_path_factory) -> Path:
    """checkpoint-20 of the 2-rank FSDP2 `rank-shards` layout (fp32, Shard(0)). Read-only."""
    return session_distributed_checkpoints(tmp_path_factory, STEP)["rank-shards"]


@pytest.fixture(scope="session")
def rank_shards_bf16_dim1(tmp_path_factory) -> Path:
    """The same layout in bfloat16, decoder matrices Shard(1) (column blocks). Read-only."""
    if not HAS_DTYPE_OPTIONS:
        pytest.skip("tests/factories has no dtype=/shard_dim1= options yet")
    return session_distributed_checkpoints(tmp_path_factory, STEP, dtype="bfloat16", shard_dim1=True)["rank-shards"]


@pytest.fixture(scope="session")
def mesh2d(tmp_path_factory) -> Path:
    """The 4 rank files of the tiny Llama on a (2, 2) mesh with mixed placements. Read-only."""
    return session_mesh2d_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_keys() -> set[str]:
    from watcher.tiny import build_model, build_tokenizer

    return set(build_model(build_tokenizer()).state_dict())


@pytest.fixture
def copy_fp32(rank_shards_fp32, tmp_path):
    """A private copy of the fp32 model rank-file folder, safe to modify."""
    dest = tmp_path / "pytorch_model_fsdp_0"
    shutil.copytree(rank_shards_fp32 / "pytorch_model_fsdp_0", dest)
    return dest


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    source = RankShardSource(directory)
    try:
        out = {}
        for name, spec in source.specs().items():
            buffer = bytearray(spec.nbytes)
            source.read(name, memoryview(buffer))
            out[name] = torch.frombuffer(buffer, dtype=getattr(torch, spec.dtype)).view(spec.shape) if buffer else (
                torch.empty(spec.shape, dtype=getattr(torch, spec.dtype)))  # fmt: skip
        return out
    finally:
        source.close()


def assert_bit_identical(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(reference)
    for name, tensor in got.items():
        expected = reference[name]
        assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)), (
            name
        )


def pieces(directory: Path) -> dict[str, list[Box]]:
    source = RankShardSource(directory)
    try:
        return {name: [piece.box for piece in tensor.pieces] for name, tensor in source._tensors.items()}
    finally:
        source.close()


def expect_error(directory: Path, *fragments: str) -> str:
    with pytest.raises(MergeError) as info:
        RankShardSource(directory)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# Real FSDP2 saves


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fsdp2_rank_shards_fp32_bit_identical(rank_shards_fp32, hf_keys, variant):
    sub, reference = VARIANTS[variant]
    got = read_all(rank_shards_fp32 / sub)
    assert set(got) - {"lm_head.weight"} == hf_keys - {"lm_head.weight"}  # the tied head may be absent
    assert_bit_identical(got, torch.load(rank_shards_fp32.parent / reference, weights_only=True))
    assert {t.dtype for t in got.values()} == {torch.float32}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fsdp2_rank_shards_bf16_shard_dim1_bit_identical(rank_shards_bf16_dim1, hf_keys, variant):
    sub, reference = VARIANTS[variant]
    got = read_all(rank_shards_bf16_dim1 / sub)
    assert set(got) - {"lm_head.weight"} == hf_keys - {"lm_head.weight"}
    assert_bit_identical(got, torch.load(rank_shards_bf16_dim1.parent / reference, weights_only=True))
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    boxes = pieces(rank_shards_bf16_dim1 / sub)
    # The column blocks really are column blocks, and the 259-row embedding an uneven row split.
    assert [b.offsets for b in boxes["model.layers.0.self_attn.q_proj.weight"]] == [(0, 0), (0, 32)]
    assert [b.sizes for b in boxes["model.embed_tokens.weight"]] == [(130, 64), (129, 64)]


def test_loading_keeps_torchs_own_safe_globals(rank_shards_fp32):
    # torch registers DTensor & co. process-wide; safe_globals() would remove them on exit if we passed them.
    from torch.distributed.tensor import DTensor

    RankShardSource(rank_shards_fp32 / "pytorch_model_fsdp_0").close()
    assert DTensor in torch.serialization.get_safe_globals()


# ---------------------------------------------------------------------------------------------------
# Multi-axis mesh


def test_mesh2d_bit_identical(mesh2d):
    reference = torch.load(mesh2d.parent.parent / "reference.pt", weights_only=True)
    got = read_all(mesh2d)
    assert_bit_identical(got, reference)
    boxes = pieces(mesh2d)
    # Every placement combination the factory used is present, each with the pieces it implies.
    assert set(PLACEMENTS.values()) >= {("S0", "S0"), ("S0", "S1"), ("S1", "S0"), ("S1", "R"), ("R", "R")}
    assert [b.sizes for b in boxes["model.embed_tokens.weight"]] == [(65, 64), (65, 64), (65, 64), (64, 64)]
    assert len(boxes["model.layers.0.self_attn.q_proj.weight"]) == 4  # (S0, S1): four 32x32 blocks
    assert len(boxes["model.layers.0.self_attn.k_proj.weight"]) == 1  # (R, R): one copy read
    assert len(boxes["model.layers.0.mlp.down_proj.weight"]) == 2  # (S1, R)
    assert len(boxes["model.layers.0.mlp.gate_proj.weight"]) == 2  # HSDP (R, S0)
    assert [b.sizes for b in boxes[UNEVEN_KEY]] == [(1, 2)] * 3  # the fourth rank's piece is empty
    assert torch.equal(got[PLAIN_KEY], torch.linspace(0, 1, 5))


# ---------------------------------------------------------------------------------------------------
# The box rule against torch's own


def _random_cases(rng: random.Random, count: int):
    from torch.distributed.tensor import Replicate, Shard

    for _ in range(count):
        ndim = rng.randint(0, 3)
        shape = tuple(rng.choice([0, 1, 2, 3, 5, 7, 8, 13, 64, 259]) for _ in range(ndim))
        mesh_shape = tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3)))
        placements = [Shard(rng.randrange(ndim)) if ndim and rng.random() < 0.7 else Replicate() for _ in mesh_shape]
        yield shape, mesh_shape, placements


def test_local_box_matches_torch():
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    # The public compute_local_shape_and_global_offset(shape, mesh, placements) needs a live DeviceMesh and
    # delegates to this plain-data version with mesh.shape and the rank's coordinate.
    rng = random.Random(0)
    checked = nonempty = 0
    for shape, mesh_shape, placements in _random_cases(rng, 400):
        boxes = []
        for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
            torch_shape, torch_offset = _compute_local_shape_and_global_offset(
                shape, mesh_shape, list(coordinate), placements
            )
            box = local_box(shape, mesh_shape, coordinate, placements)
            assert box.sizes == tuple(torch_shape), (shape, mesh_shape, placements, coordinate)
            if not box.empty:  # torch reports an empty piece's offset as the dim's size; any offset will do
                assert box.offsets == tuple(torch_offset), (shape, mesh_shape, placements, coordinate)
                nonempty += 1
            boxes.append(box)
            checked += 1
        assert check_tiling(shape, boxes) is None, (shape, mesh_shape, placements)
    assert checked > 2000 and nonempty > 1000


def test_local_box_refuses_partial():
    from torch.distributed.tensor import Partial

    with pytest.raises(ValueError, match="not supported"):
        local_box((4, 4), (2,), (0,), [Partial()])


def test_check_tiling_finds_gaps_and_overlaps():
    assert check_tiling((4,), [Box((0,), (2,)), Box((2,), (2,))]) is None
    assert "gap" in check_tiling((4,), [Box((0,), (1,)), Box((2,), (2,))])
    assert "overlap" in check_tiling((4,), [Box((0,), (3,)), Box((2,), (2,))])
    assert "cover 2 of 4" in check_tiling((4,), [Box((0,), (2,))])
    # Extents fine per dim, but a cell of the 2x2 grid missing.
    assert "grid" in check_tiling((2, 2), [Box((0, 0), (1, 1)), Box((1, 1), (1, 1)), Box((0, 1), (1, 1))])


# ---------------------------------------------------------------------------------------------------
# Errors


def test_missing_rank_file(copy_fp32):
    (copy_fp32 / "model_world_size_2_rank_1.pt").unlink()
    expect_error(copy_fp32, "model_world_size_2_rank_1.pt", "missing")


def test_truncated_rank_file(copy_fp32):
    path = copy_fp32 / "model_world_size_2_rank_1.pt"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    expect_error(copy_fp32, "model_world_size_2_rank_1.pt", "not a loadable torch.save file")


def test_empty_rank_file(copy_fp32):
    (copy_fp32 / "model_world_size_2_rank_0.pt").write_bytes(b"")
    expect_error(copy_fp32, "model_world_size_2_rank_0.pt", "empty file")


def test_rank_files_swapped(copy_fp32):
    a, b = copy_fp32 / "model_world_size_2_rank_0.pt", copy_fp32 / "model_world_size_2_rank_1.pt"
    a.rename(copy_fp32 / "tmp")
    b.rename(a)
    (copy_fp32 / "tmp").rename(b)
    expect_error(copy_fp32, "model_world_size_2_rank_0.pt", "written by rank 1")


def test_two_world_sizes(copy_fp32):
    shutil.copy(copy_fp32 / "model_world_size_2_rank_0.pt", copy_fp32 / "model_world_size_4_rank_0.pt")
    expect_error(copy_fp32, "several world sizes")


def test_key_missing_on_one_rank(copy_fp32):
    path = copy_fp32 / "model_world_size_2_rank_1.pt"
    state = torch.load(path, weights_only=True)  # real DTensors, re-saved without one key
    del state["model.norm.weight"]
    torch.save(state, path)
    expect_error(copy_fp32, "model_world_size_2_rank_1.pt", "lacks key model.norm.weight")


def test_disallowed_global_refused_without_running_it(copy_fp32, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = copy_fp32 / "model_world_size_2_rank_1.pt"
    torch.save({"model.norm.weight": torch.ones(64), "payload": Exploit()}, path)
    message = expect_error(copy_fp32, "model_world_size_2_rank_1.pt", "refused by weights_only", "system")
    assert not marker.exists(), message


def test_plain_tensors_equal_across_ranks_or_error(tmp_path):
    same, differ = tmp_path / "same", tmp_path / "differ"
    for folder, second in ((same, torch.arange(4.0)), (differ, torch.arange(4.0) + 1)):
        folder.mkdir()
        torch.save({"module.model.buf": torch.arange(4.0)}, folder / "model_world_size_2_rank_0.pt")
        torch.save({"module.model.buf": second}, folder / "model_world_size_2_rank_1.pt")
    assert torch.equal(read_all(same)["model.buf"], torch.arange(4.0))  # wrapper prefix stripped too
    with pytest.raises(MergeError, match="model_world_size_2_rank_1.pt: plain tensor model.buf differs"):
        read_all(differ)


CRAFT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta, ShardOrderEntry

    out = Path(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=0, world_size=1)
    mesh1, mesh2 = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1, 1))
    local = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    spec = DTensorSpec(mesh2, (Shard(0), Shard(0)), TensorMeta(local.shape, local.stride(), local.dtype),
                       shard_order=(ShardOrderEntry(tensor_dim=0, mesh_dims=(1, 0)),))
    cases = {
        "partial": DTensor.from_local(local, mesh1, [Partial()], run_check=False),
        "strided": DTensor.from_local(local, mesh2, [_StridedShard(0, split_factor=1), Shard(0)], run_check=False),
        "order": DTensor(local, spec, requires_grad=False),
    }
    for name, value in cases.items():
        (out / name).mkdir()
        torch.save({"model.w": value}, out / name / "model_world_size_1_rank_0.pt")
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    """Real DTensors with placements box copying cannot merge, from a 1-process gloo group (a subprocess:
    the test process never holds a process group)."""
    out = tmp_path_factory.mktemp("crafted")
    subprocess.run([sys.executable, "-c", CRAFT, str(out)], check=True, timeout=120, capture_output=True)
    return out


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("partial", "a partial sum cannot be merged"),
        ("strided", "_StridedShard"),
        ("order", "non-default order"),
    ],
)
def test_unmergeable_placements(crafted, case, fragment):
    expect_error(crafted / case, "model.w", fragment)


# ---------------------------------------------------------------------------------------------------
# Memory

MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed.tensor  # imported by RankShardSource on first use: ~45 MiB of code, not data
    from merge.rank_shards_source import RankShardSource

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))

    def rss():
        return status("VmRSS")

    folder = Path(sys.argv[1])
    sums = json.loads((folder / "sums.json").read_text())
    after_imports = rss()
    source = RankShardSource(folder)
    specs = source.specs()
    buffer = bytearray(max(spec.nbytes for spec in specs.values()))  # one buffer, reused for every tensor
    for name, spec in specs.items():
        view = memoryview(buffer)[: spec.nbytes]
        source.read(name, view)
        rows = torch.frombuffer(view, dtype=torch.float32).view(spec.shape)
        total = sum(rows[i : i + 256].sum(dtype=torch.float64).item() for i in range(0, spec.shape[0], 256))
        assert abs(total - sums[name]) <= 1e-9 * abs(sums[name]), (name, total, sums[name])
    source.close()
    # VmHWM, not getrusage().ru_maxrss: Linux carries ru_maxrss over from the parent across fork/vfork +
    # exec, so under a big pytest process it reports the parent's peak. VmHWM is this process's own.
    peak = status("VmHWM")
    print(json.dumps({"growth": peak - after_imports, "largest": max(s.nbytes for s in specs.values()),
                      "total": sum(s.nbytes for s in specs.values()), "count": len(specs)}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_memory_stays_bounded_on_400mb(tmp_path):
    folder = tmp_path / "big"
    try:
        make_big_checkpoint(folder, tensors=8, rows=12800)  # 8 x 50 MiB fp32, Shard(0) over 2 real ranks
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder)], check=False, capture_output=True, text=True, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["count"] == 8 and result["total"] >= 400 * 2**20
        limit = 64 * 2**20 + 2 * result["largest"]
        assert result["growth"] < limit, f"peak RSS grew {result['growth'] / 2**20:.0f} MiB (limit {limit / 2**20:.0f})"
        print(f"peak RSS growth {result['growth'] / 2**20:.1f} MiB for {result['total'] / 2**20:.0f} MiB read")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
