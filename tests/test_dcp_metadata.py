"""The safe `.metadata` reader, checked against REAL DCP saves and torch's own (unsafe) reader."""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from merge.dcp_metadata import (
    DTYPE_ITEMSIZE,
    DcpMetadata,
    DcpMetadataError,
    UnsafeCheckpointError,
    read_dcp_metadata,
    required_file_sizes,
)

try:  # tests/ is a package (tests/__init__.py) in the project tree; without it, tests/ itself is on sys.path
    from tests.factories import session_distributed_checkpoints
except ModuleNotFoundError:
    from factories import session_distributed_checkpoints

STEP = 20


@pytest.fixture(scope="session")
def distributed(tmp_path_factory) -> dict[str, Path]:
    return session_distributed_checkpoints(tmp_path_factory, STEP)


@pytest.fixture(scope="session")
def dcp_dirs(distributed) -> dict[str, Path]:
    """Every real DCP directory the factories wrote: name -> directory holding .metadata."""
    hf = distributed["hf-fsdp"]
    return {
        "torchtitan": distributed["torchtitan"],
        "hf-model": hf / "pytorch_model_fsdp_0",
        "hf-ema": hf / "pytorch_ema_model_fsdp_0",
        "hf-optimizer": hf / "optimizer_0",
    }


# name -> (prefix the factory puts before each model key, reference file next to the checkpoint)
MODEL_DIRS = {
    "torchtitan": ("", "reference.pt"),
    "hf-model": ("model.", "reference.pt"),
    "hf-ema": ("model.", "reference_ema.pt"),
}


def reference_for(dcp_dirs, name: str) -> dict[str, torch.Tensor]:
    directory = dcp_dirs[name]
    out_dir = directory.parent if name == "torchtitan" else directory.parent.parent
    return torch.load(out_dir / MODEL_DIRS[name][1], weights_only=True)


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_reader_metadata(directory: Path):
    """torch's own reader: plain pickle. Fine here, on files our own test just made."""
    return dcp.FileSystemReader(str(directory)).read_metadata()


# ---------------------------------------------------------------------------------------------------
# Faithfulness on real saves


@pytest.mark.parametrize("name", sorted(MODEL_DIRS))
def test_every_model_tensor_with_shape_and_dtype(dcp_dirs, name):
    meta = read_dcp_metadata(dcp_dirs[name])
    prefix = MODEL_DIRS[name][0]
    reference = reference_for(dcp_dirs, name)
    assert len(reference) > 10
    for key, tensor in reference.items():
        info = meta.tensors[prefix + key]
        assert info.fqn == prefix + key
        assert info.shape == tuple(tensor.shape), key
        assert info.dtype == torch_dtype_name(tensor.dtype) == "float32", key
        # FSDP2 over 2 ranks: every tensor is split in 2 row chunks (uneven for the 259-row embedding)
        assert len(info.chunks) == 2, key
    if name == "torchtitan":
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(meta.tensors)
        assert any(fqn.startswith("optimizer.state.") for fqn in meta.tensors)
        assert {"dataloader.dp_rank_0", "dataloader.dp_rank_1", "train_state.step"} <= set(meta.bytes_entries)
    else:
        assert set(meta.tensors) == {prefix + key for key in reference}
        assert meta.planner_data["model.lm_head.weight"] == ("model", "lm_head.weight")


@pytest.mark.parametrize("name", ["torchtitan", "hf-model", "hf-ema", "hf-optimizer"])
def test_matches_torch_own_reader(dcp_dirs, name):
    ours = read_dcp_metadata(dcp_dirs[name] / ".metadata")
    theirs = torch_reader_metadata(dcp_dirs[name])

    expected_tensors, expected_bytes = {}, []
    for fqn, entry in theirs.state_dict_metadata.items():
        if isinstance(entry, dcp.metadata.TensorStorageMetadata):
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
            expected_tensors[fqn] = (torch_dtype_name(entry.properties.dtype), tuple(entry.size), chunks)
        else:
            expected_bytes.append(fqn)
    assert {
        fqn: (t.dtype, t.shape, [(c.offsets, c.sizes) for c in t.chunks]) for fqn, t in ours.tensors.items()
    } == expected_tensors
    assert ours.bytes_entries == expected_bytes

    expected_storage = sorted(
        (
            index.fqn,
            None if index.offset is None else tuple(index.offset),
            info.relative_path,
            info.offset,
            info.length,
        )
        for index, info in theirs.storage_data.items()
    )
    assert sorted((s.fqn, s.offset_in_tensor, s.relative_path, s.offset, s.length) for s in ours.storage) == (
        expected_storage
    )
    assert ours.planner_data == theirs.planner_data
    assert ours.version == theirs.version


@pytest.mark.parametrize("name", ["torchtitan", "hf-model", "hf-ema", "hf-optimizer"])
def test_storage_refs_cover_every_chunk_once(dcp_dirs, name):
    meta = read_dcp_metadata(dcp_dirs[name])
    refs = {}
    for ref in meta.storage:
        key = (ref.fqn, ref.offset_in_tensor)
        assert key not in refs, f"two storage entries for {key}"
        refs[key] = ref
    for fqn, info in meta.tensors.items():
        for chunk in info.chunks:
            assert (fqn, chunk.offsets) in refs, (fqn, chunk)
        # the chunks tile the tensor exactly (Shard(0): disjoint row blocks)
        assert sum(math.prod(c.sizes) for c in info.chunks) == math.prod(info.shape), fqn
    for fqn in meta.bytes_entries:
        assert (fqn, None) in refs, fqn
    expected_keys = {(f, c.offsets) for f, t in meta.tensors.items() for c in t.chunks}
    assert set(refs) == expected_keys | {(f, None) for f in meta.bytes_entries}
    # within each file the byte ranges are disjoint and in order
    for ref, following in zip(meta.storage, meta.storage[1:]):
        if ref.relative_path == following.relative_path:
            assert ref.offset + ref.length <= following.offset
    assert meta.storage == sorted(meta.storage, key=lambda r: (r.relative_path, r.offset))


@pytest.mark.parametrize("name", ["torchtitan", "hf-model", "hf-ema", "hf-optimizer"])
def test_required_file_sizes_match_the_files(dcp_dirs, name):
    directory = dcp_dirs[name]
    sizes = required_file_sizes(read_dcp_metadata(directory))
    on_disk = {p.name: p.stat().st_size for p in directory.glob("*.distcp")}
    assert sizes == on_disk  # DCP writes nothing after the last range


@pytest.mark.parametrize("name", sorted(MODEL_DIRS))
def test_byte_ranges_hold_exactly_the_reference_chunks(dcp_dirs, name):
    """What the future streaming merger will do: read each byte range and place it in the full tensor."""
    directory = dcp_dirs[name]
    meta = read_dcp_metadata(directory)
    prefix = MODEL_DIRS[name][0]
    reference = reference_for(dcp_dirs, name)
    files = {rel: (directory / rel).read_bytes() for rel in required_file_sizes(meta)}
    by_key = {(r.fqn, r.offset_in_tensor): r for r in meta.storage}
    for key, full in reference.items():
        rebuilt = torch.empty_like(full)
        for chunk in meta.tensors[prefix + key].chunks:
            ref = by_key[(prefix + key, chunk.offsets)]
            assert ref.transform_descriptors == ()
            piece = torch.load(io.BytesIO(files[ref.relative_path][ref.offset : ref.offset + ref.length]))
            assert tuple(piece.shape) == chunk.sizes
            region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            rebuilt[region] = piece
        assert torch.equal(rebuilt, full), key


def test_bytes_entries_point_at_the_saved_objects(dcp_dirs):
    directory = dcp_dirs["torchtitan"]
    meta = read_dcp_metadata(directory)
    by_fqn = {r.fqn: r for r in meta.storage if r.offset_in_tensor is None}

    def load(fqn):
        ref = by_fqn[fqn]
        data = (directory / ref.relative_path).read_bytes()[ref.offset : ref.offset + ref.length]
        return torch.load(io.BytesIO(data), weights_only=False)

    assert load("dataloader.dp_rank_0") == b"sampler-state-of-rank-0"
    assert load("dataloader.dp_rank_1") == b"sampler-state-of-rank-1"
    assert load("train_state.step") == STEP


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dtypes_of_a_mixed_state_dict(tmp_path):
    """A single-process DCP save (torch's no-dist mode) with many dtypes and a non-tensor entry."""
    state = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "fp16": torch.randn(5).to(torch.float16),
        "f64": torch.randn(2, 2, 2, dtype=torch.float64),
        "i64": torch.arange(7),
        "u8": torch.arange(6, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.5),
        "nested": {"step": 3, "name": "hello"},
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    meta = read_dcp_metadata(tmp_path / "ckpt")
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            info = meta.tensors[key]
            assert (info.dtype, info.shape) == (torch_dtype_name(value.dtype), tuple(value.shape)), key
            assert DTYPE_ITEMSIZE[info.dtype] == value.element_size()
    assert meta.tensors["scalar"].shape == ()
    assert sorted(meta.bytes_entries) == ["nested.name", "nested.step"]
    assert meta.planner_data["nested.step"] == ("nested", "step")


def test_dtype_table_knows_every_torch_dtype():
    names = {n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    canonical = {torch_dtype_name(getattr(torch, n)) for n in names}
    assert canonical <= set(DTYPE_ITEMSIZE), canonical - set(DTYPE_ITEMSIZE)
    for name in canonical:
        assert DTYPE_ITEMSIZE[name] == getattr(torch, name).itemsize, name


def test_file_or_directory_path(dcp_dirs):
    directory = dcp_dirs["hf-model"]
    assert read_dcp_metadata(directory) == read_dcp_metadata(directory / ".metadata")
    assert isinstance(read_dcp_metadata(str(directory)), DcpMetadata)


def test_missing_metadata(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_dcp_metadata(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_dcp_metadata(tmp_path / "nope" / ".metadata")


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.999])
def test_truncated_metadata_is_malformed_not_unsafe(dcp_dirs, tmp_path, fraction):
    data = (dcp_dirs["torchtitan"] / ".metadata").read_bytes()
    cut = tmp_path / ".metadata"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DcpMetadataError) as excinfo:
        read_dcp_metadata(cut)
    assert not isinstance(excinfo.value, UnsafeCheckpointError)
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("payload", [{"a": 1}, [1, 2], "metadata", None])
def test_not_dcp_metadata(tmp_path, payload):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(DcpMetadataError):
        read_dcp_metadata(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Malicious pickles: refused, and nothing runs


class _Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _raw_global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle calling module.name(arg): what an attacker writes by hand."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


def test_malicious_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Shell(f"touch {marker}")))
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.system"):
        read_dcp_metadata(tmp_path)
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, ValueError)


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch.serialization", "load"),
        ("torch.distributed.checkpoint.metadata", "os"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
        ("pathlib", "Path"),
        ("copyreg", "_reconstructor"),
    ],
)
def test_hand_written_globals_are_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(_raw_global_call(module, name, f"open({str(marker)!r}, 'w')"))
    with pytest.raises(UnsafeCheckpointError, match=rf"{module}\.{name}"):
        read_dcp_metadata(tmp_path)
    assert not marker.exists()


def test_payload_hidden_inside_a_genuine_metadata(dcp_dirs, tmp_path):
    """A real .metadata with one extra object buried deep inside it."""
    marker = tmp_path / "pwned"
    metadata = torch_reader_metadata(dcp_dirs["hf-model"])
    metadata.storage_meta.modules = ["model", _Shell(f"touch {marker}")]
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_dcp_metadata(tmp_path)
    assert not marker.exists()


def test_relative_path_escaping_the_checkpoint_is_refused(dcp_dirs, tmp_path):
    metadata = torch_reader_metadata(dcp_dirs["hf-model"])
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint"):
        read_dcp_metadata(tmp_path)


def test_persistent_ids_are_refused(tmp_path):
    class PidPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage-0" if obj == "x" else None

    buffer = io.BytesIO()
    PidPickler(buffer).dump(["x"])
    (tmp_path / ".metadata").write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="persistent"):
        read_dcp_metadata(tmp_path)


def test_allowed_class_called_with_arguments_fails_cleanly(tmp_path):
    """Even an allow-listed global cannot be used to call something with attacker arguments."""
    (tmp_path / ".metadata").write_bytes(_raw_global_call("torch.distributed.checkpoint.metadata", "Metadata", "x"))
    with pytest.raises(DcpMetadataError):
        read_dcp_metadata(tmp_path)
