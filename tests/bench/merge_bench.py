#!/usr/bin/env python3
"""Benchmark `ckpt-watch merge` against the usual ways of consolidating an FSDP2 DCP checkpoint.

    python tests/bench/merge_bench.py --size-gb 4 --workdir /some/dir [--dtype bf16|fp32]
        [--tools ckpt-watch,dcp_to_torch_save,accelerate,cp] [--ranks 2|1] [--cache auto|cold|warm]
        [--repeat N] [--timeout S] [--keep] [--json OUT.json] [--build-only]

1. Builds WORKDIR/ckpt/checkpoint-1/ shaped like an accelerate / HF Trainer FSDP2 checkpoint:
   `pytorch_model_fsdp_0/` (a DCP save of `{"model": state_dict}`: `.metadata` + `__R_0.distcp`), `config.json`
   (a Llama config whose shapes match) and `trainer_state.json`. With `--ranks 2` (default) the save is a real
   2-process DCP save under torchrun (gloo, CPU): every tensor is a DTensor sharded `Shard(0)` over a 2-rank
   mesh, exactly the chunk layout FSDP2 writes, one `.distcp` file per rank. Tensor data is `torch.randn` in the
   chosen dtype, seeded per chunk, and generated lazily inside DCP's writer (a planner's `resolve_data`), so one
   chunk at a time is in memory however large the checkpoint. `--ranks 1` saves whole tensors from one process.
   A checkpoint that matches the request (size, dtype, ranks, seed) is reused when `--keep` left one behind
   (`--build-only` builds it and stops).
2. Runs each tool as a child process, measuring wall time (until the output is on disk: the tool, then `sync`),
   peak RSS (`ru_maxrss` from `os.wait4` in a tiny launcher process, which covers the tool's waited-for
   descendants too and not this process's memory) and peak anonymous RSS (sampled from /proc every 50 ms).
   Before each tool the page cache is dropped when this process may (`--cache cold`, the default where it
   works) and the tools' libraries are read back, so only the source is cold; otherwise the source is read
   once before each tool so every tool finds it in page cache alike (`--cache warm`). Tools:
     ckpt-watch         python -m watcher merge CKPT -o OUT (sharded safetensors, 5 GB shards, fsync'ed)
     dcp_to_torch_save  one child: dcp_to_torch_save(DCP, tmp.pt); torch.load(tmp.pt);
                        safetensors.torch.save_file(sd, OUT/model.safetensors) (ONE file); rm tmp.pt
     accelerate         accelerate merge-weights DCP OUT (its CLI, via python -m; one model.safetensors)
     cp                 cp -r DCP OUT: the disk floor (every byte read once and written once)
   Each output is checked (names, shapes and dtypes against the synthetic state dict; a few tensors hashed and
   compared with the regenerated originals and across tools) and deleted before the next tool. With `--repeat N`
   the tools run N rounds, round-robin, and each tool's median run is reported (peak RSS: the largest).
3. Prints a table and whether the targets are met: ckpt-watch within 1.5x of cp, at least 2x faster than the
   fastest other merging tool, and peak RSS under 1 GB + the largest tensor.

Dependencies: torch, safetensors, transformers, accelerate and the standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # for find_spec("watcher"); children get it on PYTHONPATH
ALL_TOOLS = ("ckpt-watch", "dcp_to_torch_save", "accelerate", "cp")
DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4)}
MANIFEST = "bench_manifest.json"
FORMAT = 1  # bump when the synthetic layout changes so old kept checkpoints are rebuilt
# Llama shapes, largest first: the largest whose embeddings + 2 layers fit the requested size is used.
LADDER = (
    ("llama3-8b", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256)),
    ("llama3.2-1b", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256)),
    ("small", dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4,
                   vocab_size=32000)),
    ("tiny", dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=8000)),
)  # fmt: skip

# The common recipe, run as one child process: argv = DCP_DIR TMP_PT OUT_DIR.
DCP_RECIPE = r"""
import json, os, sys, time
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
src, pt, out = sys.argv[1:4]
t = [time.perf_counter()]
dcp_to_torch_save(src, pt)
t.append(time.perf_counter())
sd = torch.load(pt, weights_only=True)
if isinstance(sd.get("model"), dict) and len(sd) == 1:
    sd = sd["model"]
t.append(time.perf_counter())
os.makedirs(out, exist_ok=True)
save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
t.append(time.perf_counter())
os.remove(pt)
print("PHASES " + json.dumps({"dcp_to_torch_save": t[1] - t[0], "torch.load": t[2] - t[1], "save_file": t[3] - t[2]}))
"""


# ----------------------------------------------------------------------------------------------------- the model


def row_splits(rows: int, world: int) -> list[tuple[int, int]]:
    """(offset, length) of each rank's Shard(0) chunk: torch.chunk semantics, as FSDP2 / DTensor split."""
    if world == 1 or rows == 0:
        return [(0, rows)]
    step = -(-rows // world)
    return [(o, min(step, rows - o)) for o in range(0, rows, step)]


def plan_model(size_bytes: int, itemsize: int) -> tuple[str, dict, list[tuple[str, tuple[int, ...]]]]:
    """Pick Llama dims and a layer count so the state dict is about `size_bytes`; names/shapes from transformers."""

    def counts(dims: dict) -> tuple[int, int]:
        h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
        kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
        fixed = 2 * v * h + h  # embed_tokens, lm_head (untied), final norm
        layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
        return fixed * itemsize, layer * itemsize

    for label, dims in LADDER:
        fixed, layer = counts(dims)
        if fixed + 2 * layer <= size_bytes or label == LADDER[-1][0]:
            break
    layers = max(1, round((size_bytes - fixed) / layer))
    config = dict(dims, num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=8192,
                  rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                  bos_token_id=min(128000, dims["vocab_size"] - 2), eos_token_id=min(128001, dims["vocab_size"] - 1))  # fmt: skip
    return label, config, model_specs(config)


def model_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """LlamaForCausalLM's state-dict names and shapes, in order, from a meta-device instance (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def config_json(config: dict, dtype: str) -> dict:
    from transformers import LlamaConfig

    data = LlamaConfig(**config).to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype" if "dtype" in data else "torch_dtype"] = dtype
    data.pop("transformers_version", None)
    return data


def chunk_tensor(seed: int, index: int, row_offset: int, shape: tuple[int, ...], dtype: str):
    """The synthetic data of one chunk: randn, seeded by (seed, tensor index, first row); never zeros."""
    import torch

    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_000_033 + row_offset)
    return torch.randn(shape, dtype=getattr(torch, dtype), generator=gen)


def full_tensor(manifest: dict, name: str):
    """Regenerate a whole tensor of the synthetic checkpoint, chunk by chunk, as the ranks wrote it."""
    import torch

    index = [n for n, _ in manifest["specs"]].index(name)
    shape = tuple(manifest["specs"][index][1])
    parts = [chunk_tensor(manifest["seed"], index, off, (rows, *shape[1:]), manifest["dtype"])
             for off, rows in row_splits(shape[0], manifest["ranks"]) if rows]  # fmt: skip
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------------------------- the builder


def build_rank(workdir: Path) -> None:
    """One rank of the DCP save (under torchrun, or alone with --ranks 1). Reads the manifest the parent wrote."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    manifest = json.loads((workdir / "ckpt" / MANIFEST).read_text())
    dtype = getattr(torch, manifest["dtype"])
    specs = [(n, tuple(s)) for n, s in manifest["specs"]]
    order = {f"model.{n}": i for i, (n, _) in enumerate(specs)}
    world = manifest["ranks"]
    torch.set_num_threads(1)

    class LazyPlanner(DefaultSavePlanner):
        """The state dict holds meta tensors; each chunk's data is made when DCP's writer asks for it."""

        def resolve_data(self, write_item):
            if write_item.tensor_data is None:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            index = order[write_item.index.fqn]
            return chunk_tensor(manifest["seed"], index, chunk.offsets[0] if chunk.offsets else 0,
                                tuple(chunk.sizes), manifest["dtype"])  # fmt: skip

    state: dict = {}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        assert dist.get_world_size() == world, (dist.get_world_size(), world)
        mesh = init_device_mesh("cpu", (world,))
        for name, shape in specs:
            splits = row_splits(shape[0], world) + [(shape[0], 0)] * world
            local = torch.empty((splits[rank][1], *shape[1:]), dtype=dtype, device="meta")
            full = torch.empty(shape, dtype=dtype, device="meta")
            state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape,
                                             stride=full.stride())  # fmt: skip
    else:
        rank = 0
        state = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in specs}
    folder = workdir / "ckpt" / "checkpoint-1" / "pytorch_model_fsdp_0"
    dcp.save({"model": state}, checkpoint_id=str(folder), planner=LazyPlanner(), no_dist=world == 1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"rank 0: saved {folder}", flush=True)


def build(workdir: Path, size_gb: float, dtype_key: str, ranks: int, seed: int, timeout: float) -> tuple[dict, float]:
    """Build (or reuse) the synthetic checkpoint; return its manifest and the build seconds (0 when reused)."""
    dtype, itemsize = DTYPES[dtype_key]
    root = workdir / "ckpt"
    ckpt = root / "checkpoint-1"
    label, config, specs = plan_model(int(size_gb * 1e9), itemsize)
    manifest = {"format": FORMAT, "size_gb": size_gb, "dtype": dtype, "itemsize": itemsize, "ranks": ranks,
                "seed": seed, "shape_family": label, "config": config, "specs": [[n, list(s)] for n, s in specs],
                "total_bytes": sum(math.prod(s) for _, s in specs) * itemsize}  # fmt: skip
    old = root / MANIFEST
    if old.is_file() and (ckpt / "trainer_state.json").is_file():
        try:
            if json.loads(old.read_text()) == manifest:
                print(f"reusing the synthetic checkpoint in {ckpt}", flush=True)
                return manifest, 0.0
        except ValueError:
            pass
    shutil.rmtree(root, ignore_errors=True)
    ckpt.mkdir(parents=True)
    (root / MANIFEST).write_text(json.dumps(manifest))
    print(f"building {manifest['total_bytes'] / 1e9:.2f} GB {dtype} checkpoint ({label} dims, "
          f"{config['num_hidden_layers']} layers, {len(specs)} tensors, {ranks} rank(s)) in {ckpt}", flush=True)  # fmt: skip
    start = time.perf_counter()
    env = child_env()
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(Path(__file__).resolve()), "--_build-rank", "--workdir", str(workdir)]  # fmt: skip
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_build-rank", "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        sys.exit(f"building the checkpoint failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    (ckpt / "config.json").write_text(json.dumps(config_json(config, dtype), indent=2) + "\n")
    state = {"global_step": 1, "max_steps": 1, "epoch": 1.0, "log_history": [], "best_global_step": None}
    (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")  # the Trainer writes it last
    os.sync()
    return manifest, time.perf_counter() - start


# ------------------------------------------------------------------------------------------- measuring a child


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo += [int(c) for c in handle.read().split()]
        except OSError:
            pass
    return pids


def _anon_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


# The tools are started from this tiny launcher, not from the benchmark process itself: at exec the kernel
# folds the pre-exec memory image's high-water RSS into the child's ru_maxrss (fs/exec.c exec_mmap), so a
# child forked straight from a process holding torch would report that process's ~0.5 GB as its own peak.
LAUNCHER = r"""
import json, os, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(report, "w") as handle:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "tool_s": wall, "maxrss_kb": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime}, handle)
"""


def measure(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run `cmd`: wall seconds, ru_maxrss, sampled peak anonymous RSS of its process tree, CPU seconds, rc."""
    report = log.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(report), *cmd]
        proc = subprocess.Popen(launcher, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)  # fmt: skip
        peak_anon = [0]
        done = threading.Event()
        timed_out = [False]

        def sample() -> None:
            while not done.wait(0.05):
                peak_anon[0] = max(peak_anon[0], _anon_kb(_tree(proc.pid)[1:]))  # the tool's tree, not the launcher
                if time.perf_counter() - start > timeout and not timed_out[0]:
                    timed_out[0] = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    try:
        row = json.loads(report.read_text())
        report.unlink()
    except (OSError, ValueError):  # killed before it could report
        row = {"rc": proc.returncode, "tool_s": wall, "maxrss_kb": 0, "cpu_s": 0.0}
    return {"rc": row["rc"], "timed_out": timed_out[0], "tool_s": row["tool_s"], "maxrss_mb": row["maxrss_kb"] / 1024,
            "peak_anon_mb": peak_anon[0] / 1024, "cpu_s": row["cpu_s"]}  # fmt: skip


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def cached_kb() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return -1


def warm(folder: Path) -> None:
    buf = bytearray(16 << 20)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buf):
                    pass


def warm_software() -> None:
    """Read the libraries the tools import back into page cache (a drop evicts them along with the source)."""
    imports = (
        "import torch, safetensors.torch, torch.distributed.checkpoint.format_utils\n"
        "for m in ('accelerate.commands.accelerate_cli', 'watcher.cli.merge', 'merge.dcp_source', 'numpy'):\n"
        "    try: __import__(m)\n"
        "    except Exception: pass\n"
    )
    subprocess.run([sys.executable, "-c", imports], env=child_env(), check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for tool in ("cp", "sync"):
        path = shutil.which(tool)
        if path:
            Path(path).read_bytes()


def cache_works(probe_dir: Path) -> bool:
    """Whether dropping the page cache takes effect here (root in a VM: yes; a container: usually not)."""
    probe = probe_dir / ".cache-probe"
    probe.write_bytes(os.urandom(64 << 20))
    os.sync()
    with open(probe, "rb") as handle:
        handle.read()
    before = cached_kb()
    ok = drop_caches() and cached_kb() < before - 32 * 1024
    probe.unlink()
    return ok


# ---------------------------------------------------------------------------------------- checking the outputs


def safetensors_headers(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """name -> (file, safetensors dtype, shape) over every .safetensors file under `folder` (headers only)."""
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                found[name] = (path, entry["dtype"], tuple(entry["shape"]))
    return found


def tensor_digest(tensor) -> str:
    import torch

    data = tensor.contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()[:16]


def check_output(folder: Path, manifest: dict, picks: list[str]) -> dict:
    """Names/shapes/dtypes against the synthetic specs; sha256 prefixes of the picked tensors."""
    from safetensors import safe_open

    headers = safetensors_headers(folder)
    code = {"bfloat16": "BF16", "float32": "F32"}[manifest["dtype"]]
    expected = {n: tuple(s) for n, s in manifest["specs"]}
    problems = []
    if set(headers) != set(expected):
        missing, extra = sorted(set(expected) - set(headers)), sorted(set(headers) - set(expected))
        problems.append(f"names differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                        f"extra {extra[:3]}{'...' if len(extra) > 3 else ''}")  # fmt: skip
    for name, shape in expected.items():
        if name in headers and (headers[name][2] != shape or headers[name][1] != code):
            problems.append(f"{name}: {headers[name][1]} {headers[name][2]}, expected {code} {shape}")
            break
    digests = {}
    for name in picks:
        if name in headers:
            with safe_open(str(headers[name][0]), framework="pt") as handle:
                digests[name] = tensor_digest(handle.get_tensor(name))
    return {"tensors": len(headers), "problems": problems, "digests": digests}


def pick_tensors(manifest: dict) -> list[str]:
    """First, last, biggest, a middle layer's down_proj and the last layer's post-attention norm."""
    specs = [(n, math.prod(s)) for n, s in manifest["specs"]]
    layers = manifest["config"]["num_hidden_layers"]
    names = [specs[0][0], specs[-1][0], max(specs, key=lambda x: x[1])[0],
             f"model.layers.{layers // 2}.mlp.down_proj.weight", f"model.layers.{layers - 1}.post_attention_layernorm.weight"]  # fmt: skip
    known = {n for n, _ in specs}
    return [n for i, n in enumerate(names) if n in known and n not in names[:i]]


# ------------------------------------------------------------------------------------------------- the tools


def tool_command(tool: str, dcp_dir: Path, ckpt: Path, out: Path, scratch: Path) -> list[str] | None:
    if tool == "ckpt-watch":
        return [sys.executable, "-m", "watcher", "merge", str(ckpt), "-o", str(out)]
    if tool == "dcp_to_torch_save":
        return [sys.executable, "-c", DCP_RECIPE, str(dcp_dir), str(scratch / "dcp_to_torch_save.pt"), str(out)]
    if tool == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "merge-weights", str(dcp_dir), str(out)]
    if tool == "cp":
        return ["cp", "-r", str(dcp_dir), str(out)] if shutil.which("cp") else None
    raise ValueError(tool)


def tool_available(tool: str) -> str | None:
    """None if the tool can run here, else why not."""
    import importlib.util

    needs = {"ckpt-watch": "watcher", "dcp_to_torch_save": "torch.distributed.checkpoint.format_utils",
             "accelerate": "accelerate.commands.accelerate_cli"}  # fmt: skip
    if tool == "cp":
        return None if shutil.which("cp") else "cp not found"
    try:
        if importlib.util.find_spec(needs[tool]) is None:
            return f"{needs[tool]} not importable"
    except ImportError as exc:
        return f"{needs[tool]} not importable ({exc})"
    if tool == "ckpt-watch" and importlib.util.find_spec("merge.dcp_source") is None:
        return "merge/dcp_source.py not found (the DCP reader is not written yet)"
    return None


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_once(tool: str, args, manifest: dict, workdir: Path, cache_mode: str, picks: list[str], check: bool) -> dict:
    ckpt = workdir / "ckpt" / "checkpoint-1"
    dcp_dir = ckpt / "pytorch_model_fsdp_0"
    outs, logs = workdir / "out", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir(parents=True)
    out = outs / tool
    if cache_mode == "cold":
        drop_caches()
        warm_software()  # the source stays cold; torch & co. are read back so no tool pays for its imports
    else:
        warm(dcp_dir)
        os.sync()
    log = logs / f"{tool}.log"
    row = measure(tool_command(tool, dcp_dir, ckpt, out, outs), args.timeout, log)
    start = time.perf_counter()
    os.sync()  # the tools differ in fsync; time them all until the bytes are on disk
    row["sync_s"] = time.perf_counter() - start
    row["wall_s"] = row["tool_s"] + row["sync_s"]
    row["gb_per_s"] = manifest["total_bytes"] / 1e9 / row["wall_s"]
    row["log"] = str(log)
    if row["timed_out"]:
        row.update(status="timeout", error=f"killed after {args.timeout:.0f} s")
    elif row["rc"] != 0:
        row.update(status="failed", error=f"exit {row['rc']}: {log_tail(log)}")
    else:
        row["status"] = "ok"
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("PHASES "):
            row["phases_s"] = json.loads(line[7:])
    row["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    if check and row["status"] == "ok" and tool != "cp":
        row["check"] = check_output(out, manifest, picks)
    if args.keep and tool == "ckpt-watch" and row["status"] == "ok":
        kept = workdir / "kept-ckpt-watch-output"
        shutil.rmtree(kept, ignore_errors=True)
        out.rename(kept)
    shutil.rmtree(outs, ignore_errors=True)
    return row


def run_tools(args, manifest: dict, workdir: Path, cache_mode: str) -> dict:
    """Every tool `--repeat` times, round-robin (each round starts one tool later); per tool, the median run."""
    picks = pick_tensors(manifest)
    runs: dict[str, list[dict]] = {}
    results: dict[str, dict] = {}
    ready = []
    for tool in args.tools:
        why = tool_available(tool)
        if why:
            print(f"{tool}: skipped: {why}", flush=True)
            results[tool] = {"status": "unavailable", "error": why}
        else:
            ready.append(tool)
    for round_ in range(args.repeat):
        order = ready[round_ % len(ready):] + ready[: round_ % len(ready)] if ready else []
        for tool in order:
            print(f"{tool}: running ({cache_mode} page cache{f', round {round_ + 1}/{args.repeat}' if args.repeat > 1 else ''})"
                  " ...", flush=True)  # fmt: skip
            first_ok = not any(r["status"] == "ok" for r in runs.get(tool, []))
            row = run_once(tool, args, manifest, workdir, cache_mode, picks, check=first_ok)
            runs.setdefault(tool, []).append(row)
            print(f"{tool}: {row['status']}, {row['wall_s']:.1f} s (sync {row['sync_s']:.1f} s), "
                  f"peak RSS {row['maxrss_mb']:.0f} MB" + (f" -- {row.get('error')}" if row["status"] != "ok" else ""),
                  flush=True)  # fmt: skip
    for tool in args.tools:
        if tool not in runs:
            continue
        rows = runs[tool]
        good = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["wall_s"])
        if not good:
            results[tool] = dict(rows[-1])
        else:
            results[tool] = dict(good[(len(good) - 1) // 2])  # the median run (the lower one of an even count)
            results[tool]["maxrss_mb"] = max(r["maxrss_mb"] for r in good)
            results[tool]["peak_anon_mb"] = max(r["peak_anon_mb"] for r in good)
            check = next((r["check"] for r in good if "check" in r), None)
            if check:
                results[tool]["check"] = check
            if len(rows) != len(good):
                results[tool]["failed_runs"] = len(rows) - len(good)
        results[tool]["runs_wall_s"] = [round(r["wall_s"], 3) for r in rows]
        results[tool]["runs"] = [{k: v for k, v in r.items() if k != "check"} for r in rows]
    return {t: results[t] for t in args.tools}


# ---------------------------------------------------------------------------------------------------- report


def verify(results: dict, manifest: dict) -> dict:
    """Reference digests (regenerated from the seeds) and every tool's agreement with them and with each other."""
    picks = pick_tensors(manifest)
    reference = {name: tensor_digest(full_tensor(manifest, name)) for name in picks}
    report = {"picked": picks, "reference": reference, "tools": {}}
    for tool, row in results.items():
        check = row.get("check")
        if not check:
            continue
        same = all(check["digests"].get(n) == d for n, d in reference.items())
        report["tools"][tool] = {"names_shapes_ok": not check["problems"], "problems": check["problems"],
                                 "picked_identical_to_reference": same}  # fmt: skip
        row["check_ok"] = same and not check["problems"]
    cw, rec = results.get("ckpt-watch", {}).get("check"), results.get("dcp_to_torch_save", {}).get("check")
    if cw and rec:
        report["ckpt_watch_vs_dcp_to_torch_save_identical"] = all(
            cw["digests"].get(n) == rec["digests"].get(n) is not None for n in picks)
    return report


def targets(results: dict, largest: int) -> list[tuple[str, bool | None, str]]:
    cw = results.get("ckpt-watch", {})
    out: list[tuple[str, bool | None, str]] = []
    if cw.get("status") != "ok":
        return [("ckpt-watch ran", False, cw.get("error", "not run"))]
    cp = results.get("cp", {})
    if cp.get("status") == "ok":
        ratio = cw["wall_s"] / cp["wall_s"]
        out.append(("within 1.5x of cp", ratio <= 1.5, f"{ratio:.2f}x cp"))
    else:
        out.append(("within 1.5x of cp", None, "cp did not run"))
    others = {t: r["wall_s"] for t, r in results.items() if t not in ("ckpt-watch", "cp") and r.get("status") == "ok"}
    if others:
        best = min(others, key=others.get)
        speedup = others[best] / cw["wall_s"]
        out.append(("2x faster than the fastest other tool", speedup >= 2, f"{speedup:.2f}x faster than {best}"))
    else:
        out.append(("2x faster than the fastest other tool", None, "no other merging tool ran"))
    limit = (1e9 + largest) / 2**20
    out.append(("peak RSS < 1 GB + largest tensor", cw["maxrss_mb"] < limit,
                f"{cw['maxrss_mb']:.0f} MB vs limit {limit:.0f} MB"))  # fmt: skip
    return out


def print_report(results: dict, manifest: dict, meta: dict, checks: dict, goals: list) -> None:
    total = manifest["total_bytes"]
    largest_name, largest = max(((n, math.prod(s) * manifest["itemsize"]) for n, s in manifest["specs"]),
                                key=lambda x: x[1])  # fmt: skip
    cp = results.get("cp", {})
    cp_wall = cp["wall_s"] if cp.get("status") == "ok" else None
    print()
    print(f"checkpoint: {total / 1e9:.3f} GB {manifest['dtype']}, {len(manifest['specs'])} tensors, "
          f"{manifest['shape_family']} dims x {manifest['config']['num_hidden_layers']} layers, "
          f"{meta['build']}; largest tensor {largest_name} {largest / 1e6:.0f} MB")  # fmt: skip
    print(f"page cache: {meta['cache_note']}")
    head = f"{'tool':<18} {'status':<11} {'wall s':>8} {'sync s':>7} {'GB/s':>6} {'peak RSS MB':>11} " \
           f"{'anon MB':>8} {'cpu s':>7} {'x cp':>6}  check"
    print(head)
    print("-" * len(head))
    for tool, row in results.items():
        if row.get("status") in ("unavailable",):
            print(f"{tool:<18} {'n/a':<11} {row.get('error', '')}")
            continue
        ratio = f"{row['wall_s'] / cp_wall:.2f}" if cp_wall and row["status"] == "ok" else "-"
        check = "-" if "check_ok" not in row else ("ok" if row["check_ok"] else "MISMATCH")
        rate = f"{row['gb_per_s']:.2f}" if row["status"] == "ok" else "-"
        print(f"{tool:<18} {row['status']:<11} {row['wall_s']:>8.1f} {row['sync_s']:>7.1f} {rate:>6} "
              f"{row['maxrss_mb']:>11.0f} {row['peak_anon_mb']:>8.0f} {row['cpu_s']:>7.1f} {ratio:>6}  {check}")  # fmt: skip
        if len(row.get("runs_wall_s", ())) > 1:
            print(f"{'':<18} runs (wall s): " + ", ".join(f"{w:.1f}" for w in row["runs_wall_s"]) + "; the median is shown")
        if row.get("phases_s"):
            print(f"{'':<18} phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in row["phases_s"].items()))
        if row["status"] != "ok":
            print(f"{'':<18} {row.get('error', '')}")
    print("wall = the tool + a `sync` after it (until its output is on disk); GB/s = checkpoint bytes / wall;")
    print("peak RSS = ru_maxrss (includes file pages a tool maps); anon MB = sampled peak RssAnon of its process tree")
    for tool, info in checks.get("tools", {}).items():
        if info["problems"] or not info["picked_identical_to_reference"]:
            print(f"CHECK {tool}: {'; '.join(info['problems']) or 'picked tensors differ from the originals'}")
    if "ckpt_watch_vs_dcp_to_torch_save_identical" in checks:
        print(f"ckpt-watch vs dcp_to_torch_save on {', '.join(checks['picked'])}: "
              f"{'bit-identical' if checks['ckpt_watch_vs_dcp_to_torch_save_identical'] else 'DIFFERENT'}")
    print()
    for label, met, detail in goals:
        print(f"target {label:<40} {'MET' if met else ('n/a' if met is None else 'MISSED')}  ({detail})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=4.0, help="total size of the synthetic state dict (GB, 1e9)")
    p.add_argument("--workdir", type=Path, required=True, help="where the checkpoint and the outputs go")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"comma-separated, in order (default {','.join(ALL_TOOLS)})")
    p.add_argument("--ranks", type=int, default=2, help="2: real 2-rank DCP save of Shard(0) DTensors (torchrun, "
                   "gloo); 1: whole tensors from one process")  # fmt: skip
    p.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto",
                   help="cold: drop the page cache before each tool; warm: read the source before each tool; "
                   "auto: cold where dropping works")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None, help="seconds per tool (default 300 + 150 per GB)")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool, round-robin; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (reused next time) and ckpt-watch's output")
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--build-only", action="store_true", help="build the checkpoint and stop")
    p.add_argument("--_build-rank", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    if args._build_rank:
        build_rank(workdir)
        return 0
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in ALL_TOOLS]
    if unknown:
        p.error(f"unknown tool(s) {unknown}; choose from {','.join(ALL_TOOLS)}")
    args.tools = tools
    args.timeout = args.timeout or 300 + 150 * args.size_gb
    workdir.mkdir(parents=True, exist_ok=True)

    need = args.size_gb * 1e9 * (3.1 if "dcp_to_torch_save" in tools else 2.1)
    existing = sum(f.stat().st_size for f in (workdir / "ckpt").rglob("*") if f.is_file()) if (workdir / "ckpt").exists() else 0
    free = shutil.disk_usage(workdir).free + existing  # a checkpoint there is reused or rebuilt in place
    if free < need:
        sys.exit(f"not enough disk in {workdir}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")

    manifest, build_s = build(workdir, args.size_gb, args.dtype, args.ranks, args.seed, args.timeout * 4)
    build_note = (f"real {manifest['ranks']}-rank DCP save (torchrun, gloo, Shard(0) DTensors)" if manifest["ranks"] > 1
                  else "single-process DCP save of whole tensors")  # fmt: skip
    if build_s:
        print(f"built in {build_s:.1f} s ({build_note})", flush=True)
    if args.build_only:
        return 0

    works = cache_works(workdir)
    cache_mode = args.cache if args.cache != "auto" else ("cold" if works else "warm")
    if cache_mode == "cold" and not works:
        sys.exit("--cache cold: the page cache cannot be dropped here (needs root outside a container)")
    cache_note = ("dropped before each tool (sync; echo 3 > /proc/sys/vm/drop_caches), then the tools' libraries re-read: "
                  "every tool read the source cold"
                  if cache_mode == "cold" else
                  "NOT dropped" + ("" if works else " (not permitted here)") +
                  ": the source was read once before each tool, so every tool found it in page cache alike")  # fmt: skip

    results = run_tools(args, manifest, workdir, cache_mode)
    print("verifying (regenerating the picked tensors) ...", flush=True)
    checks = verify(results, manifest)
    largest = max(math.prod(s) for _, s in manifest["specs"]) * manifest["itemsize"]
    goals = targets(results, largest)
    meta = {"build": build_note, "cache_note": cache_note}
    print_report(results, manifest, meta, checks, goals)

    if args.json:
        import torch

        data = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "checkpoint": {
                **{k: manifest[k] for k in ("size_gb", "dtype", "ranks", "seed", "shape_family", "config", "total_bytes")},
                "tensors": len(manifest["specs"]),
                "largest_tensor_bytes": largest,
                "build": build_note,
                "build_s": build_s,
            },
            "cache": {"mode": cache_mode, "drop_works": works, "note": cache_note},
            "results": results,
            "verification": checks,
            "targets": [{"target": label, "met": met, "detail": detail} for label, met, detail in goals],
            "host": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(workdir / "ckpt", ignore_errors=True)
        shutil.rmtree(workdir / "out", ignore_errors=True)
    failed_goal = any(met is False for _, met, _ in goals)
    return 1 if failed_goal else 0


if __name__ == "__main__":
    sys.exit(main())
