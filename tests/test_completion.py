"""Completion rules and fingerprint, on REAL checkpoints: the Trainer's, and torchrun FSDP2 saves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

import watcher.completion as completion
import watcher.fingerprint as fingerprints
from watcher.completion import DEFAULT_SENTINEL, Verdict, check_checkpoint
from watcher.fingerprint import fingerprint

try:  # tests/ is a package (tests/__init__.py) in the project tree; without it, tests/ itself is on sys.path
    from tests.factories import WORLD_SIZE, session_distributed_checkpoints
except ModuleNotFoundError:
    from factories import WORLD_SIZE, session_distributed_checkpoints

STEP = 20  # the step the distributed factories save at


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def distributed(tmp_path_factory) -> dict[str, Path]:
    """layout -> real checkpoint folder, built by one torchrun per session. Read-only."""
    return session_distributed_checkpoints(tmp_path_factory, STEP)


@pytest.fixture
def copy_distributed(distributed, tmp_path):
    def _copy(layout: str) -> Path:
        src = distributed[layout]
        dest = tmp_path / layout / src.name
        shutil.copytree(src, dest)
        return dest

    return _copy


@pytest.fixture(scope="session")
def sharded_hf(trainer_output, tmp_path_factory) -> Path:
    """checkpoint-30 re-saved by save_pretrained as 3 safetensors shards + index, then trainer_state.json."""
    from transformers import AutoModelForCausalLM

    source = trainer_output / "checkpoint-30"
    dest = tmp_path_factory.mktemp("sharded") / "checkpoint-30"
    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(dest, max_shard_size="150KB")
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / tokenizer_file, dest / tokenizer_file)
    shutil.copy2(source / "trainer_state.json", dest / "trainer_state.json")
    assert len(list(dest.glob("model-*-of-*.safetensors"))) >= 2
    return dest


@pytest.fixture
def copy_sharded(sharded_hf, tmp_path) -> Path:
    dest = tmp_path / "checkpoint-30"
    shutil.copytree(sharded_hf, dest)
    return dest


def truncate(path: Path, remove: int = 3) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, path.stat().st_size - remove))


def incomplete(verdict: Verdict, *fragments: str) -> None:
    assert not verdict.complete, verdict
    assert verdict.reason, verdict
    for fragment in fragments:
        assert fragment in verdict.reason, verdict


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file AND directory below root with (size, mtime_ns): any write would show up."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.stat(os.path.join(dirpath, name))
            snap[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return snap


# ---------------------------------------------------------------------------------------------------
# HF Trainer checkpoints


@pytest.mark.parametrize("step", [10, 20, 30])
def test_real_trainer_checkpoints_are_complete(trainer_output, step):
    verdict = check_checkpoint(trainer_output / f"checkpoint-{step}", step)
    assert verdict == Verdict(complete=True, layout="hf", reason="", variants=("regular",))


def test_trainer_state_missing(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-20"
    (folder / "trainer_state.json").unlink()
    verdict = check_checkpoint(folder, 20)
    incomplete(verdict, "trainer_state.json missing")
    assert verdict.layout == "hf"


def test_trainer_state_half_written(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-20"
    state = folder / "trainer_state.json"
    truncate(state, remove=state.stat().st_size // 2)
    incomplete(check_checkpoint(folder, 20), "trainer_state.json", "not valid JSON")


def test_trainer_state_global_step_mismatch(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-30"
    state = json.loads((folder / "trainer_state.json").read_text())
    state["global_step"] = 20
    (folder / "trainer_state.json").write_text(json.dumps(state))
    assert check_checkpoint(folder, 30).reason == "trainer_state.json: global_step 20, folder says 30"


@pytest.mark.parametrize(
    "content",
    ['{"epoch": 1.0}', "[30]", '{"global_step": "30"}', '{"global_step": true}', "[" * 100_000, "\xff\xfe"],
)
def test_trainer_state_odd_content(copy_trainer_output, content):
    folder = copy_trainer_output() / "checkpoint-30"
    (folder / "trainer_state.json").write_bytes(content.encode("latin-1"))
    incomplete(check_checkpoint(folder, 30), "trainer_state.json")


def test_model_safetensors_truncated(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-10"
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    truncate(weights, remove=3)
    assert check_checkpoint(folder, 10).reason == (
        f"model.safetensors: {size - 3} bytes on disk, header says {size}"
    )


@pytest.mark.parametrize("keep", [0, 5, 8, 100])
def test_model_safetensors_cut_inside_its_header(copy_trainer_output, keep):
    folder = copy_trainer_output() / "checkpoint-10"
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(keep)
    incomplete(check_checkpoint(folder, 10), "model.safetensors")


def test_model_safetensors_longer_than_its_header(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-10"
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    incomplete(check_checkpoint(folder, 10), "model.safetensors", "header says")


def test_no_weights_at_all(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-10"
    (folder / "model.safetensors").unlink()
    verdict = check_checkpoint(folder, 10)
    incomplete(verdict, "no model weights")
    assert verdict.layout == "hf"


def test_empty_folder_is_unknown_and_incomplete(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    verdict = check_checkpoint(folder, 5)
    incomplete(verdict, "no recognised weights")
    assert (verdict.layout, verdict.variants) == ("unknown", ())


def test_sharded_safetensors_complete(sharded_hf):
    assert check_checkpoint(sharded_hf, 30) == Verdict(True, "hf", "", ("regular",))


def test_sharded_safetensors_one_shard_missing(copy_sharded):
    (copy_sharded / "model-00002-of-00003.safetensors").unlink()
    assert check_checkpoint(copy_sharded, 30).reason == "model-00002-of-00003.safetensors missing"


def test_sharded_safetensors_one_shard_truncated(copy_sharded):
    shard = copy_sharded / "model-00003-of-00003.safetensors"
    size = shard.stat().st_size
    truncate(shard, remove=size // 2)
    assert check_checkpoint(copy_sharded, 30).reason == (
        f"model-00003-of-00003.safetensors: {size - size // 2} bytes on disk, header says {size}"
    )


def test_sharded_safetensors_index_missing_or_half_written(copy_sharded):
    index = copy_sharded / "model.safetensors.index.json"
    truncate(index, remove=index.stat().st_size // 2)
    incomplete(check_checkpoint(copy_sharded, 30), "model.safetensors.index.json", "half-written")
    index.unlink()
    incomplete(check_checkpoint(copy_sharded, 30), "model.safetensors.index.json missing")


def test_pytorch_model_bin(copy_trainer_output):
    """A real torch.save zip as pytorch_model.bin: whole is complete, truncated is not."""
    import torch
    from safetensors.torch import load_file

    folder = copy_trainer_output() / "checkpoint-10"
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert check_checkpoint(folder, 10) == Verdict(True, "hf", "", ("regular",))
    truncate(folder / "pytorch_model.bin", remove=10)
    incomplete(check_checkpoint(folder, 10), "pytorch_model.bin", "not a complete zip")


def test_sharded_pytorch_model_bin(sharded_hf, tmp_path):
    """Older transformers wrote pytorch_model-0000K-of-0000N.bin (torch.save zips) + an index."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "checkpoint-30"
    folder.mkdir()
    index = json.loads((sharded_hf / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(sharded_hf / shard), folder / name)
        renamed[shard] = name
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for model_file in ("config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json"):
        shutil.copy2(sharded_hf / model_file, folder)
    assert check_checkpoint(folder, 30) == Verdict(True, "hf", "", ("regular",))
    last = folder / sorted(renamed.values())[-1]
    truncate(last, remove=50)
    incomplete(check_checkpoint(folder, 30), last.name, "not a complete zip")
    last.unlink()
    assert check_checkpoint(folder, 30).reason == f"{last.name} missing"
    (folder / "pytorch_model.bin.index.json").unlink()
    incomplete(check_checkpoint(folder, 30), "pytorch_model.bin.index.json missing")


def test_adapter_weights_count_as_weights(copy_trainer_output):
    from safetensors.torch import load_file, save_file

    folder = copy_trainer_output() / "checkpoint-10"
    tensors = load_file(folder / "model.safetensors")
    adapter = {k: v for k, v in list(tensors.items())[:2]}
    save_file(adapter, folder / "adapter_model.safetensors")
    (folder / "model.safetensors").unlink()
    assert check_checkpoint(folder, 10) == Verdict(True, "hf", "", ("regular",))
    truncate(folder / "adapter_model.safetensors", remove=1)
    incomplete(check_checkpoint(folder, 10), "adapter_model.safetensors")


def test_slow_writer_in_trainer_order(trainer_output, tmp_path):
    """Copy a real checkpoint file by file, in the order the Trainer wrote it, each file in steps.

    At every intermediate point the folder must be incomplete; it becomes complete only once the
    JSON of trainer_state.json is whole (the Trainer's trailing newline carries no information).
    """
    source = trainer_output / "checkpoint-20"
    order = sorted(source.iterdir(), key=lambda p: (p.name == "trainer_state.json", p.stat().st_mtime_ns))
    assert order[-1].name == "trainer_state.json"
    # The Trainer itself wrote trainer_state.json last: that is what the HF rule relies on.
    assert max(source.iterdir(), key=lambda p: p.stat().st_mtime_ns).name == "trainer_state.json"

    dest = tmp_path / "checkpoint-20"
    dest.mkdir()
    verdicts = [("nothing yet", check_checkpoint(dest, 20))]
    for src in order:
        data = src.read_bytes()
        json_end = len(data.rstrip())
        cuts = sorted({0, 1, len(data) // 3, len(data) // 2, json_end - 1, json_end, len(data)})
        with open(dest / src.name, "wb") as out:
            written = 0
            for cut in cuts:
                out.write(data[written:cut])
                out.flush()
                written = cut
                verdicts.append((f"{src.name}[:{cut}]", check_checkpoint(dest, 20)))
    state = (source / "trainer_state.json").read_bytes()
    final = {f"trainer_state.json[:{len(state.rstrip())}]", f"trainer_state.json[:{len(state)}]"}
    for point, verdict in verdicts:
        if point in final:
            assert verdict == Verdict(True, "hf", "", ("regular",)), point
        else:
            assert not verdict.complete and verdict.reason, (point, verdict)


# ---------------------------------------------------------------------------------------------------
# DCP: torchtitan step-N/ and accelerate pytorch_model_fsdp_0/ (+ EMA)


def test_torchtitan_complete(distributed, tiny_model_dir):
    # torchtitan writes no config.json: base_model supplies it, and without one the folder can never be used.
    assert check_checkpoint(distributed["torchtitan"], STEP, base_model=tiny_model_dir) == Verdict(
        True, "dcp", "", ("regular",)
    )
    verdict = check_checkpoint(distributed["torchtitan"], STEP)
    assert not verdict.complete and verdict.final, verdict
    assert "set base_model" in verdict.reason and "torchtitan" in verdict.reason, verdict


def test_hf_fsdp_complete_with_ema(distributed):
    assert check_checkpoint(distributed["hf-fsdp"], STEP) == Verdict(True, "hf-fsdp-dcp", "", ("regular", "ema"))


def test_dcp_metadata_missing(copy_distributed):
    folder = copy_distributed("torchtitan")
    (folder / ".metadata").unlink()
    verdict = check_checkpoint(folder, STEP)
    incomplete(verdict, ".metadata missing")
    assert verdict.layout == "dcp"


def test_dcp_metadata_being_renamed(copy_distributed):
    """DCP writes .metadata.tmp and renames it: until the rename, the checkpoint is not done."""
    folder = copy_distributed("torchtitan")
    (folder / ".metadata").rename(folder / ".metadata.tmp")
    incomplete(check_checkpoint(folder, STEP), ".metadata missing")


def test_dcp_metadata_half_written(copy_distributed):
    folder = copy_distributed("torchtitan")
    truncate(folder / ".metadata", remove=(folder / ".metadata").stat().st_size // 2)
    incomplete(check_checkpoint(folder, STEP), ".metadata: unreadable")


@pytest.mark.parametrize("layout, sub", [("torchtitan", ""), ("hf-fsdp", "pytorch_model_fsdp_0/")])
def test_dcp_data_file_truncated(copy_distributed, layout, sub):
    folder = copy_distributed(layout)
    data = folder / sub / "__1_0.distcp"
    size = data.stat().st_size
    truncate(data, remove=1)
    assert check_checkpoint(folder, STEP).reason == (
        f"{sub}__1_0.distcp: {size - 1} bytes on disk, .metadata says at least {size}"
    )


@pytest.mark.parametrize("layout, sub", [("torchtitan", ""), ("hf-fsdp", "pytorch_model_fsdp_0/")])
def test_dcp_data_file_missing(copy_distributed, layout, sub):
    folder = copy_distributed(layout)
    (folder / sub / "__0_0.distcp").unlink()
    assert check_checkpoint(folder, STEP).reason == f"{sub}__0_0.distcp missing"


def test_hf_fsdp_ema_incomplete(copy_distributed):
    folder = copy_distributed("hf-fsdp")
    truncate(folder / "pytorch_ema_model_fsdp_0" / "__0_0.distcp", remove=100)
    verdict = check_checkpoint(folder, STEP)
    incomplete(verdict, "pytorch_ema_model_fsdp_0/__0_0.distcp")
    assert verdict.variants == ("regular", "ema")
    (folder / "pytorch_ema_model_fsdp_0" / ".metadata").unlink()
    incomplete(check_checkpoint(folder, STEP), "pytorch_ema_model_fsdp_0/.metadata missing")


def test_hf_fsdp_without_ema_is_regular_only(copy_distributed):
    folder = copy_distributed("hf-fsdp")
    shutil.rmtree(folder / "pytorch_ema_model_fsdp_0")
    assert check_checkpoint(folder, STEP) == Verdict(True, "hf-fsdp-dcp", "", ("regular",))


def test_hf_fsdp_model_dir_still_empty(copy_distributed):
    folder = copy_distributed("hf-fsdp")
    for sub in ("pytorch_model_fsdp_0", "pytorch_ema_model_fsdp_0"):
        shutil.rmtree(folder / sub)
    (folder / "pytorch_model_fsdp_0").mkdir()
    incomplete(check_checkpoint(folder, STEP), "pytorch_model_fsdp_0/.metadata missing")


def test_hf_fsdp_requires_trainer_state(copy_distributed):
    folder = copy_distributed("hf-fsdp")
    (folder / "trainer_state.json").unlink()
    incomplete(check_checkpoint(folder, STEP), "trainer_state.json missing")


def test_dcp_trainer_state_checked_when_present(copy_distributed):
    folder = copy_distributed("torchtitan")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": STEP - 1}))
    assert check_checkpoint(folder, STEP).reason == f"trainer_state.json: global_step {STEP - 1}, folder says {STEP}"


def test_dcp_malicious_metadata_is_never_complete(copy_distributed, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = copy_distributed("torchtitan")
    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    incomplete(check_checkpoint(folder, STEP), ".metadata", "system")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Per-rank shards (veRL / LMMs-Engine)


def test_rank_shards_complete(distributed):
    assert check_checkpoint(distributed["rank-shards"], STEP) == Verdict(True, "rank-shards", "", ("regular", "ema"))


def test_rank_shards_one_rank_missing(copy_distributed):
    folder = copy_distributed("rank-shards")
    (folder / "pytorch_model_fsdp_0" / "model_world_size_2_rank_1.pt").unlink()
    assert check_checkpoint(folder, STEP).reason == "pytorch_model_fsdp_0/model_world_size_2_rank_1.pt missing"


@pytest.mark.parametrize("remove", [1, 22, 5000])
def test_rank_shards_one_rank_truncated(copy_distributed, remove):
    folder = copy_distributed("rank-shards")
    truncate(folder / "pytorch_ema_model_fsdp_0" / "model_world_size_2_rank_0.pt", remove=remove)
    incomplete(check_checkpoint(folder, STEP), "pytorch_ema_model_fsdp_0/model_world_size_2_rank_0.pt", "zip")


def test_rank_shard_cut_right_after_a_stray_end_record(copy_distributed):
    """A torch.save cut short just after tensor bytes that happen to look like a zip end record.

    zipfile.is_zipfile is fooled by it; the rule must not be.
    """
    import torch

    folder = copy_distributed("rank-shards")
    shard = folder / "pytorch_model_fsdp_0" / "model_world_size_2_rank_1.pt"
    fake_end = b"PK\x05\x06" + bytes(18)  # an end-of-central-directory record of an empty archive
    payload = torch.frombuffer(bytearray(b"\x11" * 4096 + fake_end + b"\x22" * 4096), dtype=torch.uint8)
    torch.save({"weight": payload}, shard)
    data = shard.read_bytes()
    shard.write_bytes(data[: data.index(fake_end) + len(fake_end)])
    assert zipfile.is_zipfile(shard)
    incomplete(check_checkpoint(folder, STEP), "model_world_size_2_rank_1.pt", "not a complete zip")


def test_rank_shards_disagreeing_world_sizes(copy_distributed):
    folder = copy_distributed("rank-shards")
    shards = folder / "pytorch_model_fsdp_0"
    shutil.copy2(shards / "model_world_size_2_rank_0.pt", shards / "model_world_size_4_rank_0.pt")
    incomplete(check_checkpoint(folder, STEP), "world size", "[2, 4]")


def test_rank_shards_rank_out_of_range(copy_distributed):
    folder = copy_distributed("rank-shards")
    shards = folder / "pytorch_model_fsdp_0"
    shutil.copy2(shards / "model_world_size_2_rank_0.pt", shards / "model_world_size_2_rank_2.pt")
    incomplete(check_checkpoint(folder, STEP), "model_world_size_2_rank_2.pt", "out of range")


def test_rank_shards_directly_in_the_folder(copy_distributed, tmp_path, tiny_model_dir):
    """The .pt files sit in the step folder itself, no trainer_state.json."""
    source = copy_distributed("rank-shards")
    folder = tmp_path / "global_step_20"
    shutil.copytree(source / "pytorch_model_fsdp_0", folder)
    # Its writer may still put config.json down: without base_model, that is a wait (not a failure).
    waiting = check_checkpoint(folder, STEP)
    assert not waiting.complete and not waiting.final and "config.json not written yet" in waiting.reason, waiting
    assert check_checkpoint(folder, STEP, base_model=tiny_model_dir) == Verdict(True, "rank-shards", "", ("regular",))
    (folder / f"model_world_size_{WORLD_SIZE}_rank_0.pt").unlink()
    assert check_checkpoint(folder, STEP, base_model=tiny_model_dir).reason == "model_world_size_2_rank_0.pt missing"


# ---------------------------------------------------------------------------------------------------
# Sentinel


def test_explicit_sentinel_is_the_only_rule(trainer_output, tmp_path):
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    (folder / "DONE").touch()
    assert check_checkpoint(folder, 7, sentinel="DONE") == Verdict(True, "sentinel", "", ())
    # A folder complete by every layout rule still waits for the sentinel.
    verdict = check_checkpoint(trainer_output / "checkpoint-10", 10, sentinel="DONE")
    assert verdict == Verdict(False, "sentinel", "DONE missing", ("regular",))


def test_default_sentinel_overrides_layout_rules(copy_trainer_output):
    folder = copy_trainer_output() / "checkpoint-10"
    truncate(folder / "model.safetensors", remove=100)
    (folder / "trainer_state.json").unlink()
    assert not check_checkpoint(folder, 10).complete
    (folder / DEFAULT_SENTINEL).write_text("{}")
    assert check_checkpoint(folder, 10) == Verdict(True, "sentinel", "", ("regular",))


def test_sentinel_reports_ema_variant(copy_distributed):
    folder = copy_distributed("hf-fsdp")
    (folder / DEFAULT_SENTINEL).write_text("{}")
    assert check_checkpoint(folder, STEP) == Verdict(True, "sentinel", "", ("regular", "ema"))
    assert check_checkpoint(folder, STEP, sentinel="DONE") == Verdict(
        False, "sentinel", "DONE missing", ("regular", "ema")
    )


def test_manifest_sentinel_is_verified_and_keeps_the_layout(copy_trainer_output):
    from watcher.integrations.sentinel import write_sentinel

    folder = copy_trainer_output() / "checkpoint-10"
    written = write_sentinel(folder, 10)
    assert written["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert check_checkpoint(folder, 10) == Verdict(True, "hf", "", ("regular",))
    size = written["files"]["model.safetensors"]
    truncate(folder / "model.safetensors", remove=100)
    assert check_checkpoint(folder, 10) == Verdict(
        False, "hf", f"{DEFAULT_SENTINEL} lists model.safetensors ({size} bytes) but it has {size - 100}", ("regular",)
    )
    (folder / "model.safetensors").unlink()
    incomplete(check_checkpoint(folder, 10), "lists model.safetensors", "but it is missing")
    (folder / "model.safetensors").mkdir()
    incomplete(check_checkpoint(folder, 10), "lists model.safetensors", "not a regular file")


def test_manifest_sentinel_in_subfolders_of_a_real_fsdp_checkpoint(copy_distributed):
    from watcher.integrations.sentinel import write_sentinel

    folder = copy_distributed("hf-fsdp")
    files = write_sentinel(folder, STEP)["files"]
    assert "pytorch_ema_model_fsdp_0/.metadata" in files and "pytorch_model_fsdp_0/__0_0.distcp" in files
    assert check_checkpoint(folder, STEP) == Verdict(True, "hf-fsdp-dcp", "", ("regular", "ema"))
    truncate(folder / "pytorch_ema_model_fsdp_0" / "__1_0.distcp", remove=1)
    incomplete(check_checkpoint(folder, STEP), f"{DEFAULT_SENTINEL} lists pytorch_ema_model_fsdp_0/__1_0.distcp")


def test_manifest_sentinel_for_an_unknown_layout(tmp_path):
    from watcher.integrations.sentinel import write_sentinel

    folder = tmp_path / "checkpoint-3"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "part.bin").write_bytes(b"x" * 10)
    write_sentinel(folder, 3)
    assert check_checkpoint(folder, 3) == Verdict(True, "sentinel", "", ())
    (folder / "shards" / "part.bin").write_bytes(b"x" * 9)
    assert check_checkpoint(folder, 3).reason == f"{DEFAULT_SENTINEL} lists shards/part.bin (10 bytes) but it has 9"


@pytest.mark.parametrize(
    "sentinel, fragment",
    [
        ({"files": {}, "step": 11}, "step 11, folder says 10"),
        ({"files": {}, "step": "10"}, "step '10', folder says 10"),
        ({"files": ["model.safetensors"]}, '"files" is not an object'),
        ({"files": {"model.safetensors": "493384"}}, "size of model.safetensors is not a byte count"),
        ({"files": {"model.safetensors": -1}}, "size of model.safetensors is not a byte count"),
        ({"files": {"../checkpoint-20/model.safetensors": 1}}, "is not inside the folder"),
        ({"files": {"/etc/hostname": 1}}, "is not inside the folder"),
        ({"files": {"a//b": 1}}, "is not inside the folder"),
        ({"files": {"": 1}}, "is not inside the folder"),
        ({"files": {"x\u0000y": 1}}, "is not inside the folder"),
    ],
)
def test_malformed_manifest_is_never_complete(copy_trainer_output, sentinel, fragment):
    folder = copy_trainer_output() / "checkpoint-10"
    (folder / DEFAULT_SENTINEL).write_text(json.dumps(sentinel))
    incomplete(check_checkpoint(folder, 10), DEFAULT_SENTINEL, fragment)


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"format": 1, "step": 10}', '{"files'])
def test_sentinel_without_a_manifest_counts_by_presence(copy_trainer_output, content):
    """An older ckpt-watch sentinel or a user's `touch`: presence is the rule, the layout is "sentinel"."""
    folder = copy_trainer_output() / "checkpoint-10"
    truncate(folder / "model.safetensors", remove=100)
    (folder / DEFAULT_SENTINEL).write_text(content)
    assert check_checkpoint(folder, 10) == Verdict(True, "sentinel", "", ("regular",))


def test_named_sentinel_ignores_our_manifest(copy_trainer_output):
    from watcher.integrations.sentinel import write_sentinel

    folder = copy_trainer_output() / "checkpoint-10"
    write_sentinel(folder, 10)
    (folder / "optimizer.pt").unlink()
    incomplete(check_checkpoint(folder, 10), "lists optimizer.pt")
    assert check_checkpoint(folder, 10, sentinel="DONE") == Verdict(False, "sentinel", "DONE missing", ("regular",))
    (folder / "DONE").touch()
    assert check_checkpoint(folder, 10, sentinel="DONE") == Verdict(True, "sentinel", "", ("regular",))
    # Naming our own file keeps the manifest rule.
    incomplete(check_checkpoint(folder, 10, sentinel=DEFAULT_SENTINEL), "lists optimizer.pt")
    (folder / DEFAULT_SENTINEL).unlink()
    assert check_checkpoint(folder, 10, sentinel=DEFAULT_SENTINEL).reason == f"{DEFAULT_SENTINEL} missing"


# ---------------------------------------------------------------------------------------------------
# Vanishing folders, changing files, read-only behaviour


def test_missing_folder_is_gone(tmp_path):
    assert check_checkpoint(tmp_path / "checkpoint-1", 1) == Verdict(False, "unknown", "folder is gone", ())
    assert check_checkpoint(tmp_path / "checkpoint-1", 1, sentinel="DONE").reason == "folder is gone"


@pytest.mark.parametrize("layout", ["trainer", "torchtitan", "hf-fsdp", "rank-shards"])
def test_folder_vanishing_mid_check(copy_trainer_output, copy_distributed, monkeypatch, layout):
    """The folder disappears right after being listed (save_total_limit rotation, say)."""
    folder = copy_trainer_output() / "checkpoint-20" if layout == "trainer" else copy_distributed(layout)
    real_listdir = completion.list_names

    def listdir_then_vanish(directory):
        names = real_listdir(directory)
        shutil.rmtree(folder, ignore_errors=True)
        return names

    monkeypatch.setattr(completion, "list_names", listdir_then_vanish)
    assert check_checkpoint(folder, STEP).reason == "folder is gone"


def test_data_file_truncated_between_metadata_and_size_check(copy_distributed, monkeypatch):
    folder = copy_distributed("torchtitan")
    real_read = completion.read_dcp_metadata

    def read_then_truncate(path):
        meta = real_read(path)
        truncate(folder / "__0_0.distcp", remove=7)
        return meta

    monkeypatch.setattr(completion, "read_dcp_metadata", read_then_truncate)
    incomplete(check_checkpoint(folder, STEP), "__0_0.distcp", "bytes on disk")


def test_never_raises_while_a_checkpoint_is_deleted_and_rewritten(trainer_output, distributed, tmp_path):
    """A real race: another thread keeps deleting and re-copying the folders being checked."""
    targets = {
        tmp_path / "checkpoint-20": trainer_output / "checkpoint-20",
        tmp_path / "hf" / "checkpoint-20": distributed["hf-fsdp"],
        tmp_path / "rs" / "checkpoint-20": distributed["rank-shards"],
        tmp_path / "tt" / "step-20": distributed["torchtitan"],
    }
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for dest, src in targets.items():
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(src, dest, dirs_exist_ok=True)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    seen = set()
    deadline = time.monotonic() + 20
    try:
        # Run until the race has really been observed: complete, gone, and half-copied folders.
        while time.monotonic() < deadline and not {"complete", "gone", "partial"} <= seen:
            for dest in targets:
                verdict = check_checkpoint(dest, STEP)
                assert verdict.complete or verdict.reason
                gone = verdict.reason == "folder is gone"
                seen.add("complete" if verdict.complete else "gone" if gone else "partial")
                try:
                    fingerprint(dest)
                except FileNotFoundError:
                    pass  # only the folder itself being gone may raise
    finally:
        stop.set()
        thread.join()
    assert {"complete", "gone", "partial"} <= seen, seen


def test_check_never_writes(trainer_output, distributed, copy_distributed, tmp_path):
    broken = copy_distributed("hf-fsdp")
    (broken / "pytorch_model_fsdp_0" / ".metadata").unlink()
    roots = [trainer_output, *(p.parent for p in distributed.values()), broken.parent]
    before = [tree_snapshot(root) for root in roots]
    for step in (10, 20, 30):
        check_checkpoint(trainer_output / f"checkpoint-{step}", step)
    for folder in [*distributed.values(), broken]:
        check_checkpoint(folder, STEP)
        check_checkpoint(folder, STEP, sentinel="DONE")
        fingerprint(folder)
    assert [tree_snapshot(root) for root in roots] == before


def test_daemon_modules_do_not_import_torch(distributed, tiny_model_dir):
    """The daemon imports these modules; importing and using them must not drag torch in."""
    code = (
        "import sys; from pathlib import Path\n"
        "from watcher.completion import check_checkpoint\nfrom watcher.fingerprint import fingerprint\n"
        "from merge.dcp_metadata import read_dcp_metadata\n"
        f"for p in {[str(p) for p in distributed.values()]!r}:\n"
        f"    assert check_checkpoint(Path(p), {STEP}, base_model=Path({str(tiny_model_dir)!r})).complete, p\n"
        "    fingerprint(Path(p))\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_stable_and_sensitive(copy_distributed):
    folder = copy_distributed("hf-fsdp")
    first = fingerprint(folder)
    assert fingerprint(folder) == first
    assert len(first) == 64 and int(first, 16) >= 0

    data = folder / "pytorch_model_fsdp_0" / "__0_0.distcp"
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # mtime only, by one nanosecond
    touched = fingerprint(folder)
    assert touched != first

    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(folder) == first  # same stat again, same digest again

    with open(data, "r+b") as f:  # size only: mtime restored below
        f.truncate(st.st_size - 1)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    shrunk = fingerprint(folder)
    assert shrunk not in (first, touched)

    (folder / "pytorch_ema_model_fsdp_0" / "new-file").write_bytes(b"")  # an empty file in a subfolder
    added = fingerprint(folder)
    assert added not in (first, touched, shrunk)

    (folder / "pytorch_ema_model_fsdp_0" / "new-file").unlink()
    assert fingerprint(folder) == shrunk


def test_fingerprint_ignores_our_sentinel(copy_trainer_output):
    """The callback's sentinel arrives after the checkpoint: not a re-save, not a new generation."""
    from watcher.integrations.sentinel import write_sentinel

    folder = copy_trainer_output() / "checkpoint-10"
    before = fingerprints.snapshot(folder)
    (folder / f".{DEFAULT_SENTINEL}.tmp-123").write_text("{")
    write_sentinel(folder, 10)
    assert fingerprints.snapshot(folder) == before
    (folder / "DONE").touch()  # any other file still counts
    assert fingerprint(folder) != before.digest


def test_fingerprint_reads_no_file_contents(copy_distributed, monkeypatch):
    import builtins
    import io

    folder = copy_distributed("rank-shards")
    expected = fingerprint(folder)

    def no_open(*args, **kwargs):
        raise AssertionError(f"fingerprint opened {args[0]!r}")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(io, "open", no_open)
    assert fingerprint(folder) == expected


def test_fingerprint_independent_of_location(copy_distributed, tmp_path):
    folder = copy_distributed("torchtitan")
    moved = tmp_path / "elsewhere" / "step-20"
    moved.parent.mkdir()
    before = fingerprint(folder)
    folder.rename(moved)
    assert fingerprint(moved) == before


def test_fingerprint_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        fingerprint(tmp_path / "nope")


def test_fingerprint_subfolder_vanishing_mid_walk(copy_distributed, monkeypatch):
    folder = copy_distributed("hf-fsdp")
    real_scandir = os.scandir

    def scandir_then_vanish(path):
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "pytorch_ema_model_fsdp_0":
            shutil.rmtree(path)
        return real_scandir(path)

    monkeypatch.setattr(fingerprints.os, "scandir", scandir_then_vanish)
    fingerprint(folder)  # must not raise
    monkeypatch.undo()
    assert not (folder / "pytorch_ema_model_fsdp_0").exists()


def test_fingerprint_ignores_metadata_only_changes_and_training_state(copy_trainer_output):
    """`touch config.json` or deleting optimizer.pt re-ran the evaluation as a re-save; rewriting the weights
    under the same names still is one. The activity digest (the settle window's) sees every write."""
    folder = copy_trainer_output() / "checkpoint-10"
    first = fingerprints.snapshot(folder)
    later = time.time() + 10
    os.utime(folder / "config.json", (later, later))  # touch
    (folder / "optimizer.pt").unlink()  # space saved after the run
    (folder / "scheduler.pt").write_bytes((folder / "scheduler.pt").read_bytes() + b"x")
    touched = fingerprints.snapshot(folder)
    assert touched.digest == first.digest
    assert touched.activity != first.activity and touched.legacy_digest != first.legacy_digest
    config = folder / "config.json"
    config.write_text(config.read_text() + " ")  # a real edit changes the size
    assert fingerprint(folder) != first.digest
    config.write_text(config.read_text()[:-1])
    assert fingerprint(folder) == first.digest
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, written again: a re-save
    assert fingerprint(folder) != first.digest


# ---------------------------------------------------------------------------------------------------
# Model files: config.json and the tokenizer (issue 10 item 10, issue 18 item 3)


def test_missing_config_or_tokenizer_that_can_still_arrive_is_a_wait(trainer_output, tmp_path, tiny_model_dir):
    folder = tmp_path / "checkpoint-30"
    shutil.copytree(trainer_output / "checkpoint-30", folder)
    (folder / "config.json").unlink()  # trainer_state.json is there: a slow writer wrote it early
    waiting = check_checkpoint(folder, 30)
    assert not waiting.complete and not waiting.final and "config.json not written yet" in waiting.reason
    assert check_checkpoint(folder, 30, base_model=tiny_model_dir).complete  # base_model supplies it
    shutil.copy2(trainer_output / "checkpoint-30" / "config.json", folder)
    (folder / "tokenizer.json").unlink()  # tokenizer_config.json written, tokenizer.json not yet
    partial = check_checkpoint(folder, 30, base_model=tiny_model_dir)
    assert not partial.complete and not partial.final and "tokenizer files partly written" in partial.reason
    (folder / "tokenizer_config.json").unlink()
    assert "no tokenizer files yet" in check_checkpoint(folder, 30).reason
    assert check_checkpoint(folder, 30, base_model=tiny_model_dir).complete


def test_an_empty_folder_is_as_old_as_itself_not_1970(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    assert abs(fingerprints.snapshot(folder).newest_change - time.time()) < 60
