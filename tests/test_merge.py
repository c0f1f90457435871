"""merge/: the streaming writer, casting, averaging, the output folder and `ckpt-watch merge` (on real checkpoints)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge import MergeError, average_checkpoints, merge_checkpoint
from merge.source import TensorSpec
from merge.writer import plan_shards
from helpers import load_folder, logits


def test_plan_shards_is_greedy_in_order():
    assert plan_shards([("a", 4), ("b", 4), ("c", 3), ("d", 9), ("e", 1)], 8) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards([], 8) == []
    assert TensorSpec("bfloat16", (3, 5)).nbytes == 30


def test_a_sharded_merge_loads_and_reproduces_the_models_logits(tiny_model_dir, tmp_path):
    out = merge_checkpoint(tiny_model_dir, tmp_path / "merged", max_shard_bytes=150_000)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert shards == [f"model-0000{i}-of-0000{len(shards)}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left
    reference = load_file(tiny_model_dir / "model.safetensors")
    merged = load_folder(out)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    with safe_open(out / shards[0], "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert torch.equal(logits(out), logits(tiny_model_dir))


def test_cast_to_bf16_matches_torch(tiny_model_dir, tmp_path):
    out = merge_checkpoint(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16")
    reference = load_file(tiny_model_dir / "model.safetensors")
    merged = load_folder(out)
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], reference[k].bfloat16()) for k in merged)
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"


def test_average_is_the_fp32_mean(trainer_output, tmp_path):
    out = average_checkpoints([trainer_output / "checkpoint-10", trainer_output / "checkpoint-20",
                               trainer_output / "checkpoint-30"], tmp_path / "avg")  # fmt: skip
    parts = [load_file(trainer_output / f"checkpoint-{s}" / "model.safetensors") for s in (10, 20, 30)]
    merged = load_folder(out)
    for name, tensor in merged.items():
        assert torch.equal(tensor, (parts[0][name] + parts[1][name] + parts[2][name]) / 3), name


def test_tied_embeddings_follow_the_config(tiny_model_dir, tmp_path):
    from merge.consolidate import _output_names

    specs = {"model.embed_tokens.weight": TensorSpec("float32", (4, 2)), "lm_head.weight": TensorSpec("float32", (4, 2))}
    assert _output_names(specs, {"tie_word_embeddings": True}) == ["model.embed_tokens.weight"]
    assert _output_names(specs, {"tie_word_embeddings": False}) == list(specs)
    with pytest.raises(MergeError, match="lm_head.weight is missing"):
        _output_names({"model.embed_tokens.weight": specs["lm_head.weight"]},
                      {"tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]})  # fmt: skip


def test_config_comes_from_base_model_or_is_an_error(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(MergeError, match="no config.json"):
        merge_checkpoint(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = merge_checkpoint(bare, tmp_path / "out", base_model=tiny_model_dir)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_a_failure_mid_write_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    from merge import safetensors_source

    calls = {"n": 0}
    real_ranges = safetensors_source.SafetensorsSource.byte_ranges

    def failing_ranges(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MergeError("disk went away")
        return real_ranges(self, name)

    monkeypatch.setattr(safetensors_source.SafetensorsSource, "byte_ranges", failing_ranges)
    with pytest.raises(MergeError, match="disk went away"):
        merge_checkpoint(tiny_model_dir, tmp_path / "out", max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "watcher", "merge", *map(str, args)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_truncated_shard_is_a_one_line_error_with_status_1(tiny_model_dir, tmp_path):
    broken = tmp_path / "checkpoint-30"
    shutil.copytree(tiny_model_dir, broken)
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    result = _cli(broken, "-o", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "model.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_usage_errors(tiny_model_dir, tmp_path):
    assert _cli(tiny_model_dir).returncode == 2  # no -o
    assert _cli(tiny_model_dir, tiny_model_dir, "-o", tmp_path / "o").returncode == 2  # two without --average
    no_ema = _cli(tiny_model_dir, "--variant", "ema", "-o", tmp_path / "o")
    assert no_ema.returncode == 1 and "no EMA weights" in no_ema.stderr
    ok = _cli(tiny_model_dir, "--dtype", "bf16", "-o", tmp_path / "o")
    assert ok.returncode == 0, ok.stderr
    again = _cli(tiny_model_dir, "-o", tmp_path / "o")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_kernel_copy_and_buffered_paths_write_identical_files(tiny_model_dir, tmp_path, monkeypatch):
    from merge import safetensors_source

    fast = merge_checkpoint(tiny_model_dir, tmp_path / "fast", max_shard_bytes=150_000)
    monkeypatch.setattr(safetensors_source.SafetensorsSource, "byte_ranges", lambda self, name: None)
    slow = merge_checkpoint(tiny_model_dir, tmp_path / "slow", max_shard_bytes=150_000)
    files = sorted(p.name for p in fast.glob("*.safetensors"))
    assert files == sorted(p.name for p in slow.glob("*.safetensors"))
    assert all((fast / f).read_bytes() == (slow / f).read_bytes() for f in files)
