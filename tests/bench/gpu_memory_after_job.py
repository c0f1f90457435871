"""What a warm worker still holds on the GPU after a job (the memory warm_max_gpu_mb is compared with).

    BIG=1 python tests/bench/gpu_memory_after_job.py     (needs a GPU; BIG=1: TinyLlama-1.1B's shape, else 2 layers)

Runs `run_job` in this process on a fresh random Llama with the probes and lm-eval on the bundled task, then prints
what `_memory_held()` reports and every live block over 1 MiB in torch's allocator with the frames that allocated
it. It found the 1.8 GiB that `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` gives back (watcher/warm.py).
"""
import gc, sys, json, shutil
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
from watcher.records import JobSpec, Preset, EvaluatorStep
from watcher.worker import run_job, _memory_held
from watcher.tiny import build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
root = Path("/tmp/leak"); shutil.rmtree(root, ignore_errors=True); root.mkdir()
ckpt = root / "checkpoint-1"
tok = build_tokenizer()
import os
big = os.environ.get("BIG") == "1"
dims = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4) if big else dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
cfg = LlamaConfig(**dims, vocab_size=tok.vocab_size if hasattr(tok, "vocab_size") else 512, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(ckpt); tok.save_pretrained(ckpt)
steps = {"probes": EvaluatorStep("probes", {"probes": ["parameters", "flops", "perplexity", "inference"], "iterations": 1, "new_tokens": 4}),
         "lm_eval": EvaluatorStep("lm_eval", {"tasks": ["ckpt_watch_smoke_mc"], "limit": 4})}
torch.cuda.memory._record_memory_history(max_entries=200000)
for label, chosen in ((("both", ["probes", "lm_eval"]),) if big else (("probes", ["probes"]), ("lm_eval", ["lm_eval"]), ("both", ["probes", "lm_eval"]))):
    preset = Preset("bench", "", None, tuple(steps[c] for c in chosen), 1)
    work = root / label
    spec = JobSpec(job_id=1, checkpoint_name=ckpt.name, checkpoint_path=ckpt, step=1, generation=1, layout="hf", variants=("regular",), variant="regular", preset=preset, devices=("cuda:0",), base_model=None, scratch_dir=work/"s", outcome_path=work/"o.json", parent_pid=0)
    out = run_job(spec)
    held = _memory_held()
    print("RESULT", label, out.kind, held, "allocated", torch.cuda.memory_allocated(), flush=True)
    if torch.cuda.memory_allocated():
        seen = 0
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.is_cuda:
                    seen += 1
                    if seen <= 3:
                        for r in gc.get_referrers(o):
                            print("  tensor", tuple(o.shape), "<-", type(r), repr(r)[:150].replace("\n", " "))
                            for rr in gc.get_referrers(r)[:4]:
                                print("      <-", type(rr), repr(rr)[:150].replace("\n", " "))
            except Exception:
                pass
        print("cuda tensors alive:", seen, flush=True)

snap = torch.cuda.memory._snapshot()
for seg in snap["segments"]:
    for block in seg["blocks"]:
        if block["state"] == "active_allocated" and block["size"] > 2**20:
            frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']}:{f['name']}" for f in block.get("frames", [])
                      if any(k in f["filename"] for k in ("transformers", "lm_eval", "watcher", "accelerate", "safetensors"))]
            print("LIVE", block["size"] // 2**20, "MiB", " | ".join(frames[:6]))
