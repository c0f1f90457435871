"""DcpSource on REAL DCP saves: FSDP2 checkpoints from torchrun (fp32 and bf16, Shard(0) uneven and Shard(1)),
single-process `dcp.save` state dicts, and corrupted or malicious copies of them."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

from merge.coverage import _find_overlap, check_coverage
from merge.dcp_metadata import read_dcp_metadata
from merge.dcp_source import DcpSource, _contiguous_box
from merge.source import MergeError

try:  # tests/ is on sys.path when pytest runs from the project root
    from factories import session_distributed_variants
except ModuleNotFoundError:
    from tests.factories import session_distributed_variants

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEP = 20
DTYPES = ("float32", "bfloat16")
# name -> (layout, DCP directory inside the checkpoint folder, reference file next to the folder)
DIRS = {
    "hf-model": ("hf-fsdp", "pytorch_model_fsdp_0", "reference.pt"),
    "hf-ema": ("hf-fsdp", "pytorch_ema_model_fsdp_0", "reference_ema.pt"),
    "torchtitan": ("torchtitan", "", "reference.pt"),
}


@pytest.fixture(scope="session", params=DTYPES)
def distributed(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    # Both dtypes from one torchrun, cached under the options tests/test_merge_sharded.py asks for too.
    dtype = request.param
    return dtype, session_distributed_variants(tmp_path_factory, DTYPES, STEP, shard_dim1=True)[dtype]


def dcp_dir(folders: dict[str, Path], name: str) -> Path:
    layout, sub, _ = DIRS[name]
    return folders[layout] / sub if sub else folders[layout]


def reference(folders: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    layout, _, ref = DIRS[name]
    return torch.load(folders[layout].parent / ref, weights_only=True)


def read_all(source: DcpSource) -> dict[str, torch.Tensor]:
    out = {}
    for name, spec in source.specs().items():
        buffer = bytearray(spec.nbytes)
        source.read(name, memoryview(buffer))
        tensor = torch.frombuffer(buffer, dtype=torch.uint8) if spec.nbytes else torch.empty(0, dtype=torch.uint8)
        out[name] = tensor.view(getattr(torch, spec.dtype)).reshape(spec.shape)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so -0.0 / NaN payloads compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


# ---------------------------------------------------------------------------------------------------
# Faithfulness on real FSDP2 checkpoints


@pytest.mark.parametrize("name", sorted(DIRS))
def test_every_tensor_bit_identical_to_the_gathered_reference(distributed, name):
    dtype, folders = distributed
    directory = dcp_dir(folders, name)
    expected = reference(folders, name)
    with DcpSource(directory, verify_crc=True) as source:
        got = read_all(source)
    assert {t.dtype for t in got.values()} == {getattr(torch, dtype)}
    assert_bit_identical(got, expected)

    # The layouts this test is meant to cover really are in the checkpoint.
    meta = read_dcp_metadata(directory)
    chunks = {fqn: [(c.offsets, c.sizes) for c in info.chunks] for fqn, info in meta.tensors.items()}
    embed = next(c for fqn, c in chunks.items() if fqn.endswith("embed_tokens.weight"))
    assert sorted(size[0] for _, size in embed) == [129, 130]  # uneven Shard(0)
    column_split = [fqn for fqn, c in chunks.items() if len(c) == 2 and c[1][0][0] == 0 and c[1][0][1] > 0]
    assert any("layers.0.mlp.down_proj" in fqn for fqn in column_split)  # Shard(1)


@pytest.fixture(scope="module")
def hf_names() -> set[str]:
    from watcher.tiny import build_model, build_tokenizer

    return set(build_model(build_tokenizer()).state_dict())


@pytest.mark.parametrize("name", sorted(DIRS))
def test_names_are_the_hf_model_state_dict_names(distributed, name, hf_names):
    expected = hf_names
    with DcpSource(dcp_dir(distributed[1], name)) as source:
        names = set(source.specs())
    assert names - {"lm_head.weight"} == expected - {"lm_head.weight"}  # the tied head may be saved or not


def test_torchtitan_trainer_state_is_skipped(distributed):
    directory = dcp_dir(distributed[1], "torchtitan")
    meta = read_dcp_metadata(directory)
    assert any(fqn.startswith("optimizer.") for fqn in meta.tensors)  # present in the save ...
    assert {"train_state.step", "dataloader.dp_rank_0"} <= set(meta.bytes_entries)
    with DcpSource(directory) as source:
        specs = source.specs()
    assert not [n for n in specs if n.split(".")[0] in {"optimizer", "lr_scheduler", "dataloader", "train_state"}]
    assert len(specs) == 21  # ... but only the model's tensors come out


@pytest.mark.parametrize("name", ["hf-model", "torchtitan"])
def test_agrees_with_torch_dcp_to_torch_save(distributed, name, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = dcp_dir(distributed[1], name)
    dcp_to_torch_save(directory, tmp_path / "full.pt")
    theirs = torch.load(tmp_path / "full.pt", weights_only=False)
    if name == "hf-model":
        theirs = theirs["model"]
    else:
        theirs = {k: v for k, v in theirs.items() if k not in {"optimizer", "lr_scheduler", "dataloader", "train_state"}}
    with DcpSource(directory) as source:
        assert_bit_identical(read_all(source), theirs)


@pytest.mark.parametrize("buffer_bytes", [1, 100, 4096])
def test_tiny_read_buffers_split_column_chunks_correctly(distributed, buffer_bytes):
    """The bounded-buffer path (Shard(1) chunks) in pieces down to a single element."""
    folders = distributed[1]
    with DcpSource(dcp_dir(folders, "hf-model"), read_buffer_bytes=buffer_bytes, verify_crc=True) as source:
        assert_bit_identical(read_all(source), reference(folders, "hf-model"))


def test_out_buffers(distributed):
    with DcpSource(dcp_dir(distributed[1], "hf-model")) as source:
        spec = source.specs()["model.layers.1.mlp.down_proj.weight"]
        as_numpy = np.empty(spec.numel, dtype=np.uint16 if spec.dtype == "bfloat16" else np.float32)
        source.read("model.layers.1.mlp.down_proj.weight", memoryview(as_numpy))  # typed, not bytes
        as_bytes = bytearray(spec.nbytes)
        source.read("model.layers.1.mlp.down_proj.weight", memoryview(as_bytes))
        assert as_numpy.tobytes() == bytes(as_bytes)
        with pytest.raises(ValueError, match="bytes"):
            source.read("model.layers.1.mlp.down_proj.weight", memoryview(bytearray(spec.nbytes - 1)))
        with pytest.raises(ValueError, match="writable"):
            source.read("model.layers.1.mlp.down_proj.weight", memoryview(bytes(spec.nbytes)))
        with pytest.raises(KeyError):
            source.read("nope", memoryview(bytearray(4)))


# ---------------------------------------------------------------------------------------------------
# Single-process DCP saves: every dtype, odd strides, scalars, empty tensors, safetensors format


def single_process_save(directory: Path, state: dict, writer=None) -> Path:
    if writer is None:
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    else:
        dcp.save(state, storage_writer=writer, no_dist=True)
    return directory


def mixed_state() -> dict:
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 5, 4, generator=g)
    return {
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(5, generator=g).to(torch.float16),
        "f64": torch.randn(2, 3, dtype=torch.float64, generator=g),
        "i64": torch.arange(-3, 7),
        "u8": torch.arange(6, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),  # pickled with _rebuild_tensor_v3
        "scalar": torch.tensor(-1.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(4, 9, generator=g).t(),  # saved as is: permuted strides (9 x 4, stride (1, 9))
        "permuted": wide.permute(2, 0, 1),  # 3-D permutation
        "sliced": torch.randn(8, 8, generator=g)[2:5, 1:7],  # a view into a larger storage: DCP clones it
        "nested": {"deep": torch.randn(3, generator=g)},
        "step": 5,  # a bytes entry: skipped
    }


def expected_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(expected_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("buffer_bytes", [3, 64 << 20])
def test_mixed_dtypes_and_strides(tmp_path, buffer_bytes):
    state = mixed_state()
    directory = single_process_save(tmp_path / "ckpt", state)
    with DcpSource(directory, read_buffer_bytes=buffer_bytes, verify_crc=True) as source:
        assert_bit_identical(read_all(source), expected_tensors(state))


def test_safetensors_serialization_format(tmp_path):
    # what safetensors can hold: contiguous tensors (and DCP passes them on as they are)
    state = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in mixed_state().items()}
    writer = FileSystemWriter(str(tmp_path / "ckpt"), serialization_format=SerializationFormat.SAFETENSORS)
    directory = single_process_save(tmp_path / "ckpt", state, writer)
    with DcpSource(directory) as source:
        assert_bit_identical(read_all(source), expected_tensors(state))


def test_container_and_wrappers(tmp_path):
    """{"model": sd} with compile/DDP wrapper names: container and wrappers stripped, siblings dropped."""
    w, b = torch.randn(3, 2), torch.randn(3)
    state = {"model": {"module._orig_mod.layer.weight": w, "layer.bias": b}, "optimizer": {"state": torch.ones(2)}}
    directory = single_process_save(tmp_path / "ckpt", state)
    with DcpSource(directory) as source:
        assert_bit_identical(read_all(source), {"layer.weight": w, "layer.bias": b})


def test_two_fqns_for_one_name(tmp_path):
    directory = single_process_save(tmp_path / "ckpt", {"w": torch.randn(2), "module.w": torch.randn(2)})
    with pytest.raises(MergeError, match=r"module\.w.*w|w.*module\.w"):
        DcpSource(directory)


def test_no_model_tensors(distributed):
    with pytest.raises(MergeError, match="no model tensors.*optimizer"):
        DcpSource(distributed[1]["hf-fsdp"] / "optimizer_0")


# ---------------------------------------------------------------------------------------------------
# Coverage and corruption: a one-line MergeError naming the file or tensor, never a wrong tensor


@pytest.fixture
def hf_copy(distributed, tmp_path) -> Path:
    directory = tmp_path / "pytorch_model_fsdp_0"
    shutil.copytree(dcp_dir(distributed[1], "hf-model"), directory)
    return directory


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_distcp(hf_copy):
    (hf_copy / "__1_0.distcp").unlink()
    with pytest.raises(MergeError) as err:
        DcpSource(hf_copy)
    assert "__1_0.distcp" in one_line(err) and "missing" in str(err.value)


def test_truncated_distcp(hf_copy):
    path = hf_copy / "__0_0.distcp"
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(MergeError) as err:
        DcpSource(hf_copy)
    assert "__0_0.distcp" in one_line(err) and "truncated" in str(err.value)


def storage_ref(directory: Path, fqn: str, rank_file: str):
    meta = read_dcp_metadata(directory)
    return next(r for r in meta.storage if r.fqn == fqn and r.relative_path == rank_file)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


# what to clobber inside the chunk's zip: (where, relative to the chunk's range, how many bytes)
CORRUPTIONS = {
    "local-header": lambda length: (0, 4),  # PK\x03\x04 of data.pkl
    "pickle": lambda length: (64, 40),  # inside data.pkl (its data starts at byte 64, 64-byte aligned)
    "central-directory": lambda length: (length - 200, 120),
    "end-record": lambda length: (length - 22, 22),
}


@pytest.mark.parametrize("where", sorted(CORRUPTIONS))
def test_corrupted_chunk(hf_copy, where):
    fqn, name = "model.model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"
    ref = storage_ref(hf_copy, fqn, "__1_0.distcp")
    start, count = CORRUPTIONS[where](ref.length)
    overwrite(hf_copy / "__1_0.distcp", ref.offset + start, b"\xa5" * count)
    with DcpSource(hf_copy) as source:
        spec = source.specs()[name]
        out = bytearray(spec.nbytes)
        with pytest.raises(MergeError) as err:
            source.read(name, memoryview(out))
        assert "__1_0.distcp" in one_line(err) and fqn in str(err.value)
        other = bytearray(source.specs()["model.norm.weight"].nbytes)
        source.read("model.norm.weight", memoryview(other))  # the rest stays readable


def test_metadata_disagrees_with_the_stored_chunk(tmp_path):
    """A .metadata claiming another dtype (same byte length) than the chunk holds: refused, not reinterpreted."""
    directory = single_process_save(tmp_path / "ckpt", {"w": torch.randn(4, 4)})
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    meta.state_dict_metadata["w"].properties.dtype = torch.int32
    (directory / ".metadata").write_bytes(pickle.dumps(meta))
    with DcpSource(directory) as source, pytest.raises(MergeError, match=r"__0_0\.distcp: w: .*float32.*int32"):
        source.read("w", memoryview(bytearray(64)))


@pytest.mark.parametrize("change", ["drop-chunk", "overlap", "out-of-bounds", "no-byte-range", "transform"])
def test_chunks_must_tile_the_tensor(distributed, change):
    directory = dcp_dir(distributed[1], "hf-model")
    meta = read_dcp_metadata(directory)
    fqn = "model.model.layers.0.self_attn.q_proj.weight"
    info = meta.tensors[fqn]
    first, second = info.chunks
    if change == "drop-chunk":
        info.chunks = [first]
    elif change == "overlap":  # same total volume, but two chunks claim the same columns
        second.offsets = (0, second.offsets[1] - 1)
    elif change == "out-of-bounds":
        second.offsets = (0, second.offsets[1] + 1)
    elif change == "no-byte-range":
        meta.storage = [r for r in meta.storage if (r.fqn, r.offset_in_tensor) != (fqn, second.offsets)]
    else:
        next(r for r in meta.storage if r.fqn == fqn).transform_descriptors = ("zstd",)
    with pytest.raises(MergeError) as err:
        check_coverage(meta, directory)
    assert fqn in one_line(err)


def test_overlap_sweep_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ndim = int(rng.integers(1, 4))
        boxes = [
            (tuple(int(v) for v in rng.integers(0, 6, ndim)), tuple(int(v) for v in rng.integers(1, 4, ndim)))
            for _ in range(int(rng.integers(2, 7)))
        ]
        brute = any(
            all(o1 < o2 + s2 and o2 < o1 + s1 for o1, s1, o2, s2 in zip(*a, *b))
            for i, a in enumerate(boxes)
            for b in boxes[i + 1 :]
        )
        assert (_find_overlap(boxes) is not None) == brute, boxes


@pytest.mark.parametrize(
    "sizes, contiguous",
    [
        ((4, 6, 8), True), ((2, 6, 8), True), ((1, 3, 8), True), ((1, 1, 5), True), ((1, 1, 1), True),
        ((2, 3, 8), False), ((4, 6, 4), False), ((1, 6, 1), False), ((4, 1, 8), False),
    ],
)  # fmt: skip
def test_contiguous_box(sizes, contiguous):
    """Which chunks of a (4, 6, 8) tensor may be read straight into `out`."""
    assert _contiguous_box((4, 6, 8), sizes) is contiguous
    assert _contiguous_box((), ()) is True


@pytest.mark.parametrize("shard", ["row-chunk", "column-chunk"])
def test_crc_catches_a_flipped_bit_in_the_tensor_data(hf_copy, shard):
    """Zip and pickle stay valid, only the payload rots: verify_crc=True catches it (torch.load would)."""
    fqn = "model.model.embed_tokens.weight" if shard == "row-chunk" else "model.model.layers.0.mlp.up_proj.weight"
    name = fqn.removeprefix("model.")
    ref = storage_ref(hf_copy, fqn, "__1_0.distcp")
    data = (hf_copy / "__1_0.distcp").read_bytes()[ref.offset : ref.offset + ref.length]
    payload = zipfile.ZipFile(io.BytesIO(data)).read("archive/data/0")
    at = data.index(payload) + len(payload) // 2
    overwrite(hf_copy / "__1_0.distcp", ref.offset + at, bytes([data[at] ^ 0x10]))
    with DcpSource(hf_copy, verify_crc=True) as source:
        out = memoryview(bytearray(source.specs()[name].nbytes))
        with pytest.raises(MergeError, match=r"__1_0\.distcp.*CRC-32"):
            source.read(name, out)
        source.read("model.norm.weight", memoryview(bytearray(source.specs()["model.norm.weight"].nbytes)))
    with DcpSource(hf_copy) as source:  # the default trusts the payload, as the format cannot flag it
        source.read(name, out)


# ---------------------------------------------------------------------------------------------------
# Malicious chunk pickles: refused, and nothing runs


class _Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def with_chunk_pickle(tmp_path: Path, pkl: bytes) -> Path:
    """A genuine single-tensor DCP save whose chunk is replaced by a zip (Python's zipfile, not torch's
    writer) holding `pkl` as data.pkl; `.metadata` is updated to the new byte length."""
    tensor = torch.arange(4, dtype=torch.float32)
    directory = single_process_save(tmp_path / "ckpt", {"w": tensor})
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", sys.byteorder)
        archive.writestr("archive/data/0", tensor.numpy().tobytes())
    (directory / "__0_0.distcp").write_bytes(stream.getvalue())
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    (info,) = meta.storage_data.values()
    info.offset, info.length = 0, len(stream.getvalue())
    (directory / ".metadata").write_bytes(pickle.dumps(meta))
    return directory


def genuine_pickle() -> bytes:
    stream = io.BytesIO()
    torch.save(torch.arange(4, dtype=torch.float32), stream)
    return zipfile.ZipFile(stream).read("archive/data.pkl")


def test_hand_built_zip_with_a_genuine_pickle_reads(tmp_path):
    """The control for the next test: the replacement itself is readable, so a refusal is the pickle's."""
    with DcpSource(with_chunk_pickle(tmp_path, genuine_pickle())) as source:
        assert read_all(source)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_zip64_records_are_followed(tmp_path, monkeypatch):
    """Past 4 GiB torch.save's zip turns zip64 (sizes and offsets move into extra fields and a zip64
    end record). Python's zipfile does the same for everything once its limit is lowered."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 8)
    directory = with_chunk_pickle(tmp_path, genuine_pickle())
    data = (directory / "__0_0.distcp").read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # zip64 end record and locator
    with DcpSource(directory, verify_crc=True) as source:
        assert read_all(source)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "pkl",
    [
        pytest.param(lambda marker: pickle.dumps(_Shell(f"touch {marker}"), protocol=2), id="os.system"),
        pytest.param(lambda marker: f"cbuiltins\neval\n(Vopen({str(marker)!r}, 'w')\ntR.".encode(), id="eval"),
        pytest.param(lambda marker: genuine_pickle().replace(b"torch._utils", b"torch.utils_"), id="lookalike"),
        pytest.param(lambda marker: pickle.dumps({"not": "a tensor"}), id="dict"),
    ],
)
def test_malicious_chunk_pickle_is_refused(tmp_path, pkl):
    marker = tmp_path / "pwned"
    with DcpSource(with_chunk_pickle(tmp_path, pkl(marker))) as source, pytest.raises(MergeError) as err:
        source.read("w", memoryview(bytearray(16)))
    assert "__0_0.distcp" in one_line(err) and "w" in str(err.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Memory: bounded by the tensor being read plus the read buffer, not by the checkpoint

MEMORY_PROBE = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    from merge.dcp_source import DcpSource

    # Not getrusage's ru_maxrss: Linux carries the pre-exec peak over into it (fs/exec.c saves the old mm's
    # hiwater into signal->maxrss), so a child of a large pytest process starts with pytest's peak.
    # VmHWM is this process's own mm; writing 5 to clear_refs resets it to the current RSS (Linux >= 4.0).
    def status_mib(field):
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # then the import peak counts too: the measure can only come out higher, never lower
    baseline = status_mib("VmRSS")

    def peak_mib():
        return status_mib("VmHWM")

    directory, buffer_bytes = sys.argv[1], int(sys.argv[2])
    source = DcpSource(directory, read_buffer_bytes=buffer_bytes)
    specs = source.specs()
    out = np.empty(max(s.nbytes for s in specs.values()), dtype=np.uint8)  # one buffer, reused
    digests = {}
    for name, spec in specs.items():
        view = memoryview(out)[: spec.nbytes]
        source.read(name, view)
        digests[name] = hashlib.sha256(view).hexdigest()
    source.close()
    print(json.dumps({"peak_mib": peak_mib() - baseline, "digests": digests}))
    """
)


def test_peak_memory_is_one_tensor_plus_the_buffer(tmp_path):
    tensors, shape = 12, (2500, 5000)  # 12 x 50 MB of fp32
    largest_mib = math.prod(shape) * 4 / 2**20
    directory = tmp_path / "big"
    expected = {}
    try:
        g = torch.Generator().manual_seed(0)
        state = {}
        for i in range(tensors):
            data = torch.randn(shape[::-1] if i % 3 == 2 else shape, generator=g)
            state[f"layers.{i}.weight"] = data.t() if i % 3 == 2 else data  # every third: permuted strides
            expected[f"layers.{i}.weight"] = hashlib.sha256(state[f"layers.{i}.weight"].contiguous().numpy()).hexdigest()
        single_process_save(directory, state)
        del state, data
        peaks = {}
        for buffer_mib in (8, 64):
            proc = subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, str(directory), str(buffer_mib << 20)],
                capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert result["digests"] == expected
            peaks[buffer_mib] = result["peak_mib"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"peak RSS above the post-import baseline: {peaks} MiB (largest tensor {largest_mib:.1f} MiB)")
    assert peaks[64] < 64 + 2 * largest_mib
    # Shard(0)-like chunks go straight into `out`; permuted ones through the buffer: one tensor + the buffer.
    assert peaks[8] < largest_mib + 8 + 16
    assert peaks[64] < largest_mib + min(64, largest_mib) + 16
