"""A preset on a ~1B-parameter model on a GPU: walltime and memory per stage, and lm-eval on one GPU vs two.

    python tests/bench/preset_device.py --out /tmp/preset-bench [--device cuda:0] [--parallel cuda:0,1]

1. Builds a TinyLlama-1.1B-shaped Llama (random weights, bf16; the bundled byte-level tokenizer) and saves it as
   the Hugging Face Trainer's FSDP SHARDED_STATE_DICT checkpoint (`checkpoint-100/pytorch_model_fsdp_0/`, a
   `torch.distributed.checkpoint` directory, then trainer_state.json last), so the job merges it first.
2. Runs `ckpt-watch OUT --scan --device DEVICE` with the bundled `5min` preset's probes and, in place of
   hellaswag (which needs a dataset download), the bundled multiple-choice task with the same limit of 20.
   Prints the result's per-stage walltime and memory, and which processes held GPU memory (nvidia-smi).
3. With `--parallel cuda:0,1`: the same lm-eval task with no limit, once pinned to the first GPU and once
   data-parallel over both, from the merged model; prints both walltimes and whether the metrics agree.

Needs torch with CUDA, transformers, lm-eval (and its requirements), watchdog. Writes about 5 GB under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP = 100
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000)  # fmt: skip


def tiny_llama(small: bool = False):
    """(model, config, tokenizer): a TinyLlama-1.1B-shaped Llama, random weights (seed 0), bf16, on the CPU, with
    the bundled byte-level tokenizer; `small`: 2 layers of 256, to try a script on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from watcher.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    shape = dict(TINYLLAMA, hidden_size=256, intermediate_size=512, num_hidden_layers=2) if small else TINYLLAMA
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    return model, config, tokenizer


def build_checkpoint(output_dir: Path, small: bool = False) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = output_dir / f"checkpoint-{STEP}"
    if (folder / "trainer_state.json").is_file():
        return folder
    model, config, tokenizer = tiny_llama(small)
    begin = time.time()
    # What accelerate's FSDP SHARDED_STATE_DICT save writes: DCP of {"model": state_dict}; one process here.
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": STEP}))
    print(f"saved {folder} in {time.time() - begin:.1f} s", flush=True)
    return folder


def sample_gpu_processes(stop: threading.Event, seen: set[str]) -> None:
    if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode != 0:
        return
    while not stop.wait(1.0):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True)  # fmt: skip
        seen.update(line.strip() for line in out.stdout.splitlines() if line.strip())


def ckpt_watch(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    begin = time.time()
    done = subprocess.run([sys.executable, "-m", "watcher", *args], capture_output=True, text=True)
    return time.time() - begin, done


def run_preset(output_dir: Path, device: str) -> None:
    config = output_dir.parent / "bench.toml"
    config.write_text("""keep_merged = 1
[presets.5min-local]
description = "the bundled 5min preset with a bundled task in place of hellaswag"
time_budget = 900
[[presets.5min-local.evaluators]]
backend = "probes"
probes = ["parameters", "flops", "routing", "perplexity", "inference"]
iterations = 3
new_tokens = 32
[[presets.5min-local.evaluators]]
backend = "lm_eval"
tasks = ["ckpt_watch_smoke_mc"]
limit = 20
""")
    stop, seen = threading.Event(), set()
    sampler = threading.Thread(target=sample_gpu_processes, args=(stop, seen), daemon=True)
    sampler.start()
    seconds, done = ckpt_watch(str(output_dir), "--scan", "--device", device, "--config", str(config),
                               "--preset", "5min-local")  # fmt: skip
    stop.set()
    print(f"ckpt-watch --scan: {seconds:.1f} s, exit {done.returncode}\n{done.stderr[-3000:]}", flush=True)
    record = json.loads((output_dir / "ckpt-watch" / f"checkpoint-{STEP}" / "regular" / "5min-local.json").read_text())
    print(json.dumps({k: record[k] for k in ("status", "error", "device", "walltime_s", "timings", "stages",
                                             "metrics", "versions")}, indent=1))  # fmt: skip
    print("GPU processes seen:", *sorted(seen), sep="\n  ")


def run_parallel(output_dir: Path, devices: str) -> None:
    merged = output_dir / "ckpt-watch" / ".work" / "merged" / "regular" / f"checkpoint-{STEP}"
    from watcher.evaluators.lm_eval_backend import LmEvalBackend

    options = {"tasks": ["ckpt_watch_smoke_mc", "ckpt_watch_smoke_ppl"], "batch_size": 8}
    code = (f"import json,sys,time; sys.path.insert(0, {str(ROOT)!r});"
            "from pathlib import Path; from watcher.evaluators.lm_eval_backend import LmEvalBackend;"
            "t=time.time(); o=LmEvalBackend().run(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]));"
            "print('RESULT', json.dumps({'seconds': time.time()-t, 'metrics': o.metrics}))")  # fmt: skip
    del LmEvalBackend
    outcomes = {}
    for label, visible in (("1 GPU", devices.split(":")[1].split(",")[0]), ("data-parallel", devices.split(":")[1])):
        workdir = output_dir.parent / f"lm-eval-{len(visible.split(','))}"
        workdir.mkdir(exist_ok=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
        device = "cuda:" + ",".join(str(i) for i in range(len(visible.split(","))))
        done = subprocess.run([sys.executable, "-c", code, str(merged), device, json.dumps(options), str(workdir)],
                              capture_output=True, text=True, env=env)  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{label}: failed, exit {done.returncode}\n{done.stderr[-3000:]}")
            return
        outcomes[label] = json.loads(lines[-1][7:])
        print(f"{label} (CUDA_VISIBLE_DEVICES={visible}, device {device}): {outcomes[label]['seconds']:.1f} s", flush=True)
    one, many = outcomes["1 GPU"]["metrics"], outcomes["data-parallel"]["metrics"]
    differences = {k: (one[k], many.get(k)) for k in one if abs(one[k] - many.get(k, float("nan"))) > 1e-3 * abs(one[k])}
    print("metrics agree within 0.1%" if not differences else f"metrics differ: {differences}")
    print(json.dumps(outcomes, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--parallel", help="e.g. cuda:0,1: also compare lm-eval on one GPU with data-parallel")
    parser.add_argument("--small", action="store_true", help="a small model, to try the script on a CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir = args.out / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    build_checkpoint(output_dir, args.small)
    run_preset(output_dir, args.device)
    if args.parallel:
        run_parallel(output_dir, args.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
