"""REAL torchtitan 0.3.0 checkpoints: its own CheckpointManager over an FSDP2 (fully_shard) model on 2 gloo ranks.

Run under torchrun (see `make_torchtitan_checkpoints`, which does that for you). torchtitan's trainer does not
run on the CPU as shipped, but its checkpoint manager, model and state-dict adapter do. Into DEST it writes:

* ``checkpoint/step-10/``: a native save (DCP, torchtitan's own parameter names, optimizer, lr scheduler and
  train state), with ``async_mode`` "disabled", or "async" with ``--async``;
* ``checkpoint/step-20/``: the last-step save with ``last_save_model_only`` and ``last_save_in_hf``: torchtitan's
  own Hugging Face export through its Llama3 state-dict adapter (``sharded/`` + consolidated safetensors + index),
  in ``--export-dtype`` (float32 by default: bit-comparable with the native save, since no step runs between);
* ``base/``: a Hugging Face ``config.json`` and tokenizer describing the same tiny Llama (what a user passes
  as ``base_model``).

The model is a tiny Llama3 (dim 64, 4 heads, 2 KV heads, 2 layers, vocabulary 259, tied embeddings), or with
``--family qwen3_moe`` a tiny Qwen3-MoE (4 experts, top 2), built with torchtitan's own layer builders and
initialised by its own ``init_states``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

DIM, HEADS, KV_HEADS, LAYERS, HIDDEN, MAX_SEQ, THETA = 64, 4, 2, 2, 128, 512, 10000.0


def torchtitan_config(vocab: int):
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import (
        Llama3Model,
        _build_llama3_layers,
        _EMBEDDING_INIT,
        _NORM_INIT,
        _output_linear_init,
    )

    return Llama3Model.Config(
        dim=DIM,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=vocab, param_init=_output_linear_init(DIM)),
        layers=_build_llama3_layers(n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, hidden_dim=HIDDEN,
                                    rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=MAX_SEQ, theta=THETA),
                                    attn_backend="flex"),  # fmt: skip
        enable_weight_tying=True,
    )


def hf_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_SEQ,
                       rope_theta=THETA, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       architectures=["LlamaForCausalLM"])  # fmt: skip


def qwen3_moe_configs(tokenizer):
    """A tiny Qwen3-MoE (4 experts, top 2, every layer MoE): Hugging Face config and torchtitan's."""
    from transformers import Qwen3MoeConfig

    from merge.torchtitan_source import _qwen3_config

    hf = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, head_dim=DIM // HEADS, moe_intermediate_size=32, num_experts=4,
                        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                        max_position_embeddings=MAX_SEQ, rope_theta=THETA, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"],
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return hf, _qwen3_config(hf.to_dict())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--family", choices=("llama", "qwen3_moe"), default="llama")
    parser.add_argument("--async", dest="async_mode", action="store_true")
    parser.add_argument("--export-dtype", default="float32")
    args = parser.parse_args()

    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    from watcher.tiny import build_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))  # MoE export needs names
    tokenizer = build_tokenizer()
    if args.family == "llama":
        base_config, config, adapter = hf_config(tokenizer), torchtitan_config(len(tokenizer)), Llama3StateDictAdapter
    else:
        (base_config, config), adapter = qwen3_moe_configs(tokenizer), Qwen3StateDictAdapter
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    for layer in model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # 259 embedding rows: an uneven Shard(0) split over 2 ranks

    optimizers = OptimizersContainer(OptimizersContainer.Config(
        implementation="for-loop", param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                                                  optimizer_kwargs={"lr": 1e-3})]), model_parts=[model])
    lr_schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0)
    checkpointer = CheckpointManager(
        CheckpointManager.Config(enable=True, folder="checkpoint", interval=10, keep_latest_k=0,
                                 last_save_model_only=True, last_save_in_hf=True, export_dtype=args.export_dtype,
                                 async_mode="async" if args.async_mode else "disabled"),  # fmt: skip
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={},
        sd_adapter=adapter(config, None),
        base_folder=str(args.dest),
    )
    checkpointer.save(curr_step=10)
    checkpointer.maybe_wait_for_saving() if hasattr(checkpointer, "maybe_wait_for_saving") else None
    checkpointer.save(curr_step=20, last_step=True)
    checkpointer.close()
    dist.barrier()
    if dist.get_rank() == 0:
        base = args.dest / "base"
        base_config.save_pretrained(base)
        tokenizer.save_pretrained(base)
    dist.barrier()
    dist.destroy_process_group()


def make_torchtitan_checkpoints(dest: Path, *, family: str = "llama", async_save: bool = False,
                                timeout: float = 300) -> Path:
    """Run this script under torchrun on 2 CPU ranks; returns `dest` (see the module docstring for its content)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--dest", str(dest), "--family", family] + (["--async"] if async_save else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-6000:]}")
    return Path(dest)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
