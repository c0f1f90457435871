"""Peak memory of a whole `ckpt-watch merge` stays near a fixed budget plus the largest tensor, not the model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

TENSORS = 12
ROWS, COLS = 3200, 4096  # 50 MiB of fp32 each: 600 MiB in all, several times the budget below
READ_BUFFER = 64 << 20  # DcpSource's read buffer: the fixed part of the budget


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    import torch
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("big")
    checkpoint = root / "checkpoint-1"
    generator = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.mlp.weight": torch.randn(ROWS, COLS, generator=generator) for i in range(TENSORS)}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=checkpoint / "pytorch_model_fsdp_0", no_dist=True)
    del state
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}))
    yield checkpoint
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("extra", [[], ["--dtype", "fp16"]], ids=["kernel-copy", "cast-through-buffer"])
def test_peak_rss_of_a_merge_is_budget_plus_largest_tensor(big_checkpoint, tmp_path, extra):
    # The child measures itself: VmHWM (peak resident) after the merge minus VmRSS once everything is imported.
    # (ru_maxrss would be wrong here: Linux carries the parent's peak into a forked child across exec.)
    script = textwrap.dedent(f"""
        import sys
        from watcher import cli
        import merge.dcp_source, merge.writer, numpy, torch  # import first, so the baseline holds the code

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS")
        code = cli.main(["merge", {str(big_checkpoint)!r}, "-o", {str(tmp_path / "out")!r}, *{extra!r}])
        print("PEAK", status("VmHWM") - base, code)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak, code = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("PEAK"))
    largest = ROWS * COLS * 4
    total = largest * TENSORS
    print(f"\nmerge of {total >> 20} MiB {extra}: peak RSS growth {int(peak) >> 20} MiB (largest tensor {largest >> 20} MiB)")
    assert code == "0"
    assert int(peak) < READ_BUFFER + largest + (32 << 20)
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert written > (total // 2 if extra else total)
