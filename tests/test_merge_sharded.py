"""Merging real FSDP2 checkpoints (torchrun, gloo) end to end: every layout, regular and EMA, into loadable models."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from factories import session_distributed_variants
from merge import merge_checkpoint
from helpers import load_folder, logits

IDS = torch.tensor([[5, 77, 130, 200, 31, 9, 254]])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def checkpoints(request, tmp_path_factory):
    # Both dtypes come from one torchrun (shared with test_dcp_source.py through the session cache).
    built = session_distributed_variants(tmp_path_factory, ("float32", "bfloat16"), shard_dim1=True)
    return request.param, built[request.param]


def _reference_logits(config_dir, state_dict, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("layout", ["hf-fsdp", "rank-shards", "torchtitan"])
@pytest.mark.parametrize("variant", ["regular", "ema"])
def test_merged_model_matches_the_training_weights_bit_for_bit(checkpoints, layout, variant, tiny_model_dir, tmp_path):
    dtype, folders = checkpoints
    checkpoint = folders[layout]
    if variant == "ema" and layout == "torchtitan":
        pytest.skip("torchtitan saves no EMA twin")
    reference = torch.load(checkpoint.parent / ("reference_ema.pt" if variant == "ema" else "reference.pt"))
    base = tiny_model_dir if layout == "torchtitan" else None  # torchtitan saves weights only
    out = merge_checkpoint(checkpoint, tmp_path / "out", variant, base_model=base)
    merged = load_folder(out)
    expected = {k: v for k, v in reference.items() if k in merged}
    assert set(merged) == set(expected) and set(reference) - set(merged) <= {"lm_head.weight"}
    for name, tensor in merged.items():
        assert tensor.dtype == getattr(torch, dtype) and torch.equal(tensor, expected[name]), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    with torch.no_grad():
        got = model(IDS).logits
    assert torch.equal(got, _reference_logits(out, reference, dtype))


def test_ema_falls_back_to_regular_for_untracked_tensors(checkpoints, tmp_path):
    _, folders = checkpoints
    checkpoint = tmp_path / "checkpoint-20"
    shutil.copytree(folders["rank-shards"], checkpoint)
    from merge import open_weights

    regular, ema = open_weights(checkpoint, "regular"), open_weights(checkpoint, "ema")
    try:
        assert ema.specs().keys() >= regular.specs().keys()
    finally:
        regular.close()
        ema.close()


def test_cli_merges_all_variants(checkpoints, tmp_path):
    _, folders = checkpoints
    result = subprocess.run([sys.executable, "-m", "watcher", "merge", str(folders["hf-fsdp"]), "--variant", "all",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ema", "regular"]
    assert not torch.equal(logits(tmp_path / "out" / "regular"), logits(tmp_path / "out" / "ema"))


def test_a_missing_shard_is_an_error_naming_it_and_leaves_no_output(checkpoints, tmp_path):
    _, folders = checkpoints
    checkpoint = tmp_path / "checkpoint-20"
    shutil.copytree(folders["hf-fsdp"], checkpoint)
    victim = sorted((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))[-1]
    victim.unlink()
    result = subprocess.run([sys.executable, "-m", "watcher", "merge", str(checkpoint), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and victim.name in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_byte_ranges_concatenate_to_exactly_what_read_gives(checkpoints):
    from merge.dcp_source import DcpSource

    _, folders = checkpoints
    source = DcpSource(folders["hf-fsdp"] / "pytorch_model_fsdp_0")
    kinds = {"kernel copy": 0, "buffered": 0}
    try:
        for name, spec in source.specs().items():
            expected = bytearray(spec.nbytes)
            source.read(name, memoryview(expected))
            runs = source.byte_ranges(name)
            if runs is None:  # Shard(1): chunks are column blocks, not runs of the tensor
                kinds["buffered"] += 1
                continue
            kinds["kernel copy"] += 1
            got = b"".join(path.read_bytes()[offset : offset + length] for path, offset, length in runs)
            assert got == bytes(expected), name
    finally:
        source.close()
    assert kinds["kernel copy"] and kinds["buffered"], kinds
