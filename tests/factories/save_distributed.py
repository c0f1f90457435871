"""Write a REAL sharded checkpoint of the tiny Llama from a 2-process FSDP2 job on the CPU.

Run it under torchrun (see `factories.make_distributed_checkpoint`, which does that for you):

    python -m torch.distributed.run --standalone --nproc_per_node 2 save_distributed.py \
        --dest OUT --layout hf-fsdp --step 20 [--dtype bfloat16] [--shard-dim1]

Options (the defaults reproduce the original checkpoints exactly):

* ``--dtype float32|bfloat16``: the parameters' own dtype when sharded and saved (the model is cast
  before ``fully_shard``, so the DTensors, the optimizer state and the saved chunks are all that dtype).
  Repeat it to write several variants from one job (one fresh model each); each then goes to OUT/<dtype>/.
* ``--shard-dim1``: every 2-D weight inside the decoder layers is sharded with ``Shard(1)`` (FSDP2's
  ``shard_placement_fn``), so its chunks are column blocks: each is contiguous in the file but not in
  the full row-major tensor. The embedding (259 rows) keeps ``Shard(0)`` and stays an uneven split.
  FSDP2 only allows even splits on dims other than 0 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py
  raises "FSDP does not support uneven sharding on dim 1"), so the column split needs an even world size.

Layouts (repeat `--layout` to write several from one job; each then goes to OUT/<layout>/):

* ``torchtitan``  -> ``step-N/``: one DCP save with flat model keys next to ``optimizer``,
  ``lr_scheduler``, ``dataloader`` and ``train_state`` entries, as torchtitan's CheckpointManager does.
* ``hf-fsdp``     -> ``checkpoint-N/pytorch_model_fsdp_0/`` (DCP of ``{"model": state_dict}``, what
  accelerate's FSDP SHARDED_STATE_DICT writes), an EMA twin ``pytorch_ema_model_fsdp_0/``, an
  ``optimizer_0/`` DCP dir, ``config.json`` and finally ``trainer_state.json``.
* ``rank-shards`` -> ``checkpoint-N/pytorch_model_fsdp_0/model_world_size_2_rank_R.pt``: every rank
  ``torch.save``s its own DTensor state dict (veRL / LMMs-Engine style), the EMA twin dir, ``config.json``
  and finally ``trainer_state.json``.

* ``lmms-engine`` -> ``checkpoint-N/``: what LMMs-Engine 0.1.4's ``save_checkpoints`` writes
  (lmms_engine/train/fsdp2/fsdp2_trainer.py), in its order: every rank's ``pytorch_model_fsdp_0/``,
  ``pytorch_ema_model_fsdp_0/``, ``optimizer/``, ``extra_state/`` and ``dataloader_state/`` files
  (``<kind>_world_size_W_rank_R.pt``), then rank 0's tokenizer and, last, ``config.json``.
* ``verl``        -> ``global_step_N/``: what veRL's FSDP checkpoint manager and PPO trainer write
  (verl/utils/checkpoint/fsdp_checkpoint_manager.py, verl/trainer/ppo/ray_trainer.py): ``actor/`` with
  every rank's ``model_/optim_/extra_state_world_size_W_rank_R.pt``, rank 0's ``actor/huggingface/``
  (config, tokenizer) and ``actor/fsdp_config.json``; the same for ``critic/``; ``data.pt`` last.

Next to each checkpoint folder, rank 0 writes ``reference.pt`` (the full, unsharded model state dict,
HF key names) and ``reference_ema.pt`` (the EMA weights), so merge tests can check exact reassembly.

The model is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) on a CPU DeviceMesh over gloo,
and takes one AdamW step first so that optimizer state exists and the weights are not the init values.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from watcher.tiny import build_model, build_tokenizer

LAYOUTS = ("torchtitan", "hf-fsdp", "rank-shards", "lmms-engine", "verl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EMA_FACTOR = 0.5  # EMA weights = weights * 0.5: different from the regular ones, trivially checkable


def _train_one_step(model, tokenizer) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([tokenizer("a tiny sharded checkpoint for ckpt-watch")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _ema_state_dict(state_dict: dict) -> dict:
    # DTensor arithmetic keeps placements, so the EMA copy is sharded exactly like the original. Tied
    # weights (embed_tokens / lm_head) stay one tensor, as they would in a real EMA of the parameters.
    # state_dict() wraps the same local shard in a fresh DTensor per key, so tie by local data pointer.
    by_data: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state_dict.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        tie = (local.data_ptr(), tuple(value.shape))
        if tie not in by_data:
            by_data[tie] = value.detach() * EMA_FACTOR
        out[key] = by_data[tie]
    return out


def _full(state_dict: dict) -> dict:
    """Gather DTensors into plain CPU tensors (a collective: every rank must call it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state_dict.items()}


def _write_trainer_files(folder: Path, model, step: int) -> None:
    model.config.save_pretrained(folder)
    state = {"global_step": step, "max_steps": step, "epoch": 1.0, "log_history": [], "best_global_step": None}
    # The Trainer writes trainer_state.json last; so do we.
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def save_torchtitan(out: Path, step: int, model, optimizer, rank: int) -> Path:
    folder = out / f"step-{step}"
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    state = dict(model_sd)  # torchtitan flattens the model keys into the top level
    state["optimizer"] = optim_sd
    state["lr_scheduler"] = {"last_epoch": step, "_step_count": step + 1, "base_lrs": [1e-2]}
    state["dataloader"] = {f"dp_rank_{rank}": f"sampler-state-of-rank-{rank}".encode()}  # rank-specific bytes
    state["train_state"] = {"step": step, "ntokens_seen": 1234 * step}
    dcp.save(state, checkpoint_id=str(folder))
    return folder


def save_hf_fsdp(out: Path, step: int, model, optimizer, rank: int) -> Path:
    folder = out / f"checkpoint-{step}"
    model_sd = get_model_state_dict(model)
    dcp.save({"model": model_sd}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
    dcp.save({"model": _ema_state_dict(model_sd)}, checkpoint_id=str(folder / "pytorch_ema_model_fsdp_0"))
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder / "optimizer_0"))
    dist.barrier()
    if rank == 0:
        _write_trainer_files(folder, model, step)
    return folder


def save_rank_shards(out: Path, step: int, model, optimizer, rank: int) -> Path:
    folder = out / f"checkpoint-{step}"
    world = dist.get_world_size()
    model_sd = model.state_dict()  # DTensors: each rank pickles its own local shard plus placement info
    for sub, sd in (("pytorch_model_fsdp_0", model_sd), ("pytorch_ema_model_fsdp_0", _ema_state_dict(model_sd))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        torch.save(sd, folder / sub / f"model_world_size_{world}_rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_trainer_files(folder, model, step)
    return folder


def _dim1_placement(param: torch.nn.Parameter) -> Shard | None:
    """shard_placement_fn for the decoder layers: column-shard every matrix, default for the rest."""
    return Shard(1) if param.ndim == 2 else None


def shard_model(model, mesh, shard_dim1: bool) -> None:
    placement_fn = _dim1_placement if shard_dim1 else None
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement_fn)
    fully_shard(model, mesh=mesh)  # the embedding / tied lm_head / final norm: Shard(0), 259 rows uneven


def save_lmms_engine(out: Path, step: int, model, optimizer, rank: int) -> Path:
    folder = out / f"checkpoint-{step}"
    world = dist.get_world_size()
    subs = ("pytorch_model_fsdp_0", "pytorch_ema_model_fsdp_0", "optimizer", "extra_state", "dataloader_state")
    for sub in subs:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_sd = model.state_dict()
    torch.save(model_sd, folder / "pytorch_model_fsdp_0" / f"model_world_size_{world}_rank_{rank}.pt")
    torch.save(_ema_state_dict(model_sd), folder / "pytorch_ema_model_fsdp_0" / f"model_world_size_{world}_rank_{rank}.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer" / f"optimizer_world_size_{world}_rank_{rank}.pt")
    extra = {"lr_scheduler_state": {"last_epoch": step}, "rng": torch.get_rng_state(), "total_tokens": 1234 * step}
    torch.save(extra, folder / "extra_state" / f"extra_state_world_size_{world}_rank_{rank}.pt")
    torch.save({"epoch": 0, "rank": rank}, folder / "dataloader_state" / f"dataloader_state_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        build_tokenizer().save_pretrained(folder)
        model.config.save_pretrained(folder)  # LMMs-Engine's last write
    dist.barrier()
    return folder


def save_verl(out: Path, step: int, model, optimizer, rank: int) -> Path:
    folder = out / f"global_step_{step}"
    world = dist.get_world_size()
    for role in ("actor", "critic"):
        role_dir = folder / role
        role_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        torch.save(model.state_dict(), role_dir / f"model_world_size_{world}_rank_{rank}.pt")
        torch.save(optimizer.state_dict(), role_dir / f"optim_world_size_{world}_rank_{rank}.pt")
        torch.save({"lr_scheduler": {"last_epoch": step}, "rng": torch.get_rng_state()},
                   role_dir / f"extra_state_world_size_{world}_rank_{rank}.pt")  # fmt: skip
        if rank == 0:
            model.config.save_pretrained(role_dir / "huggingface")
            build_tokenizer().save_pretrained(role_dir / "huggingface")
            (role_dir / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
        dist.barrier()
    if rank == 0:
        torch.save({"dataloader": {"epoch": 0}}, folder / "data.pt")  # veRL's last write
    return folder


SAVERS = {"torchtitan": save_torchtitan, "hf-fsdp": save_hf_fsdp, "rank-shards": save_rank_shards,
          "lmms-engine": save_lmms_engine, "verl": save_verl}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--layout", choices=LAYOUTS, action="append", required=True)
    parser.add_argument("--step", type=int, default=20)
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    parser.add_argument("--shard-dim1", action="store_true")
    args = parser.parse_args()
    dtypes = args.dtype or ["float32"]

    torch.set_num_threads(1)  # 2 ranks on a small CPU box: avoid oversubscription
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tokenizer = build_tokenizer()
    for dtype in dtypes:
        dest = args.dest / dtype if len(dtypes) > 1 else args.dest
        save_variant(dest, args.layout, args.step, tokenizer, mesh, DTYPES[dtype], args.shard_dim1)
    dist.barrier()
    dist.destroy_process_group()


def save_variant(dest: Path, layouts: list[str], step: int, tokenizer, mesh, dtype: torch.dtype, shard_dim1: bool):
    rank = dist.get_rank()
    model = build_model(tokenizer, seed=0).to(dtype)
    shard_model(model, mesh, shard_dim1)
    optimizer = _train_one_step(model, tokenizer)

    model_sd = get_model_state_dict(model)
    reference = _full(model_sd)
    reference_ema = _full(_ema_state_dict(model_sd))

    for layout in layouts:
        out = dest / layout if len(layouts) > 1 else dest
        out.mkdir(parents=True, exist_ok=True)
        folder = SAVERS[layout](out, step, model, optimizer, rank)
        dist.barrier()
        if rank == 0:
            torch.save(reference, out / "reference.pt")
            torch.save(reference_ema, out / "reference_ema.pt")
            print(f"wrote {folder}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
