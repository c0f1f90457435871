"""A tiny causal language model trained with the real `transformers.Trainer` on the CPU.

`ckpt-watch demo` and the tests use it to produce genuine Trainer checkpoints without any download:
the tokenizer is a plain byte-level one built in code (the Hub is not reachable offline), and the
model is a two-layer Llama small enough to train a few steps in seconds. `save_tiny_moe` writes an untrained
mixture-of-experts model (Qwen2-MoE classes) with the same tokenizer, for the MoE probes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def build_tokenizer():
    """A byte-level tokenizer: every UTF-8 byte is one token, so any text is encodable with no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for special in (BOS, EOS, PAD):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised two-layer Llama with ~0.1M parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build_moe_model(tokenizer, seed: int = 0):
    """A randomly initialised three-layer Qwen2-MoE: 4 routed experts, top-2, one always-on shared expert.

    Layer 1 is a dense MLP (`mlp_only_layers`), so the MoE layers are 0 and 2: the probes must take layer
    numbers from the modules, not count routers.
    """
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,  # the dense layer's MLP
        moe_intermediate_size=32,  # each routed expert
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen2MoeForCausalLM(config)


def save_tiny_moe(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny MoE model and the byte-level tokenizer to out_dir, as `save_pretrained` does."""
    tokenizer = build_tokenizer()
    build_moe_model(tokenizer, seed=seed).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def training_text() -> str:
    return resources.files("watcher").joinpath("data/smoke/train.txt").read_text(encoding="utf-8")


def training_dataset(tokenizer, block_size: int = 64) -> list[dict]:
    """The bundled training text as a list of {"input_ids", "labels"} blocks: a dataset `Trainer` takes as is."""
    return _token_blocks(tokenizer, training_text(), block_size)


def _token_blocks(tokenizer, text: str, block: int) -> list[dict]:
    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)] or [ids]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def train_tiny(
    output_dir: str | Path,
    max_steps: int = 30,
    save_steps: int = 10,
    seed: int = 0,
    callbacks: Sequence = (),
    save_total_limit: int | None = None,
    block_size: int = 64,
    report_to: Sequence[str] = (),
) -> Path:
    """Train the tiny model with `transformers.Trainer`, saving `checkpoint-N` folders into output_dir.

    Each checkpoint is a genuine Trainer checkpoint: model.safetensors, config.json, tokenizer files,
    optimizer/scheduler/RNG state and trainer_state.json, written in the Trainer's own order.
    """
    from transformers import Trainer, TrainingArguments

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    dataset = training_dataset(tokenizer, block_size)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        save_strategy="steps",
        save_total_limit=save_total_limit,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=max(1, save_steps),
        report_to=list(report_to),
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
    )
    trainer.train()
    return Path(output_dir)


def _slow_down(seconds: float):
    """A callback that sleeps after every step, so checkpoints arrive seconds apart like a real run."""
    import time

    from transformers import TrainerCallback

    class SlowDown(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(seconds)

    return SlowDown()


def main(argv: list[str] | None = None) -> None:
    """`python -m watcher.tiny OUTPUT_DIR`: train the tiny model (used by `ckpt-watch demo` as the trainer)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m watcher.tiny")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--report-to", action="append", default=[], help="a Trainer integration, e.g. tensorboard")
    parser.add_argument("--save-total-limit", type=int, help="the Trainer's checkpoint rotation (default: none)")
    parser.add_argument("--ckpt-watch-callback", action="store_true",
                        help="add CkptWatchCallback: sentinels, the run record, and stop requests honoured")  # fmt: skip
    args = parser.parse_args(argv)
    callbacks = [_slow_down(args.step_delay)] if args.step_delay > 0 else []
    if args.ckpt_watch_callback:
        from watcher.integrations.hf import CkptWatchCallback

        callbacks.append(CkptWatchCallback())
    train_tiny(args.output_dir, max_steps=args.steps, save_steps=args.save_steps, callbacks=callbacks,
               report_to=args.report_to, save_total_limit=args.save_total_limit)


if __name__ == "__main__":
    main()
