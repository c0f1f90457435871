"""REAL per-rank DTensor saves over multi-axis meshes and at scale, from torchrun jobs on the CPU (gloo).

Two modes, each run under torchrun (the helpers below do that for you):

* ``mesh2d`` (4 processes): the tiny Llama's state dict distributed over a (2, 2) DeviceMesh with mixed
  placements per tensor (see ``PLACEMENTS``): HSDP-style ``(Replicate(), Shard(0))``, 2-D
  ``(Shard(0), Shard(1))`` and ``(Shard(1), Shard(0))``, ``(Shard(1), Replicate())``, fully replicated, and
  nested ``(Shard(0), Shard(0))`` on the uneven 259-row embedding. Two extra test-only keys: a (3, 2)
  tensor nested-sharded so that one rank's piece is empty, and a plain (non-DTensor) tensor every rank
  holds identically. Each rank ``torch.save``s its DTensor state dict as
  ``checkpoint-N/pytorch_model_fsdp_0/model_world_size_4_rank_R.pt``; rank 0 writes ``reference.pt``
  (the full tensors, same keys) next to ``checkpoint-N``.

      python -m torch.distributed.run --standalone --nproc_per_node 4 save_rank_shards_2d.py \\
          --mode mesh2d --dest OUT

* ``big`` (2 processes): ``--tensors`` random fp32 tensors of ``--rows`` x 1024, each ``Shard(0)`` over
  2 ranks (made with ``DTensor.from_local``: every rank draws its own half), for memory tests. Rank 0
  writes ``sums.json``: each tensor's float64 sum, to check a read without keeping a reference copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__)
STEP = 20
COLUMNS = 1024

UNEVEN_KEY = "ckpt_watch_test.uneven"
# Tensor name (suffix match) -> placements over the (2, 2) mesh; everything else gets HSDP's.
HSDP = ("R", "S0")
PLACEMENTS = {
    "embed_tokens.weight": ("S0", "S0"),  # nested on one dim: 259 -> 130 | 129 -> 65, 65 | 65, 64
    "lm_head.weight": ("S0", "S0"),
    "self_attn.q_proj.weight": ("S0", "S1"),
    "self_attn.v_proj.weight": ("S1", "S0"),
    "mlp.down_proj.weight": ("S1", "R"),
    "self_attn.k_proj.weight": ("R", "R"),
    "input_layernorm.weight": ("S0", "R"),
    UNEVEN_KEY: ("S0", "S0"),  # (3, 2): 3 rows -> 2 | 1 -> 1, 1 | 1, 0: one rank's piece is empty
}
PLAIN_KEY = "ckpt_watch_test.plain"  # a plain tensor, identical on every rank


class RankShardsFactoryError(RuntimeError):
    """torchrun failed or timed out; the message carries its stderr."""


def run_factory(dest: Path, mode: str, nproc: int, *extra: str, timeout: float = 240) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        str(SCRIPT), "--mode", mode, "--dest", str(dest), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise RankShardsFactoryError(f"torchrun timed out after {timeout:.0f}s:\n{err.stderr or ''}") from err
    if proc.returncode != 0:
        raise RankShardsFactoryError(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-6000:]}")


def make_mesh2d_checkpoint(dest: Path, timeout: float = 240) -> Path:
    """The (2, 2)-mesh save of the tiny Llama; returns the folder holding the 4 rank files."""
    run_factory(Path(dest), "mesh2d", 4, timeout=timeout)
    return Path(dest) / f"checkpoint-{STEP}" / "pytorch_model_fsdp_0"


def make_big_checkpoint(dest: Path, tensors: int = 8, rows: int = 12800, timeout: float = 240) -> Path:
    """`tensors` x (rows, 1024) fp32 random tensors, Shard(0) over 2 ranks; returns the rank-file folder."""
    run_factory(Path(dest), "big", 2, "--tensors", str(tensors), "--rows", str(rows), timeout=timeout)
    return Path(dest)


_SESSION: dict[str, Path] = {}


def session_mesh2d_checkpoint(tmp_path_factory) -> Path:
    """`make_mesh2d_checkpoint`, built once per pytest process. Read-only."""
    if "mesh2d" not in _SESSION:
        _SESSION["mesh2d"] = make_mesh2d_checkpoint(tmp_path_factory.mktemp("rank-shards-2d"))
    return _SESSION["mesh2d"]


# ---------------------------------------------------------------------------------------------------
# What runs under torchrun


def _placements(code: tuple[str, ...]):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if c == "R" else Shard(int(c[1:])) for c in code]


def _save_mesh2d(dest: Path, rank: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    # Only rank 0 builds the model (importing transformers in 4 processes on a 2-core box costs ~10 s);
    # the others get the full state dict from it, as distribute_tensor needs a same-shaped tensor anyway.
    payload: list = [None]
    if rank == 0:
        from watcher.tiny import build_model, build_tokenizer

        payload = [{k: v.detach().clone() for k, v in build_model(build_tokenizer(), seed=0).state_dict().items()}]
    dist.broadcast_object_list(payload, src=0)
    full = payload[0]
    full[UNEVEN_KEY] = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    sharded = {}
    for key, tensor in full.items():
        code = next((p for suffix, p in PLACEMENTS.items() if key.endswith(suffix)), HSDP)
        # distribute_tensor scatters rank 0's copy; each rank keeps only its piece (plus placement info).
        sharded[key] = distribute_tensor(tensor, mesh, _placements(code))
    sharded[PLAIN_KEY] = full[PLAIN_KEY] = torch.linspace(0, 1, 5)
    folder = dest / f"checkpoint-{STEP}" / "pytorch_model_fsdp_0"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sharded, folder / f"model_world_size_4_rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        torch.save(full, dest / "reference.pt")


def _save_big(dest: Path, rank: int, tensors: int, rows: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(1000 + rank)
    state, sums = {}, {}
    for i in range(tensors):
        local = torch.rand((rows // world, COLUMNS), generator=generator)
        state[f"model.layers.{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        sums[f"model.layers.{i}.weight"] = local.double().sum().item()
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest / f"model_world_size_{world}_rank_{rank}.pt")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, sums)
    if rank == 0:
        total = {key: sum(part[key] for part in gathered) for key in sums}
        (dest / "sums.json").write_text(json.dumps(total))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("mesh2d", "big"), required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12800)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks on a small CPU box: avoid oversubscription
    dist.init_process_group("gloo")
    try:
        if args.mode == "mesh2d":
            _save_mesh2d(args.dest, dist.get_rank())
        else:
            _save_big(args.dest, dist.get_rank(), args.tensors, args.rows)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
