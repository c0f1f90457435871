"""Save -> result latency of one checkpoint at a time, cold (a fresh process per job) vs warm (issue 15).

    python tests/bench/save_to_result.py --out /tmp/s2r [--device cuda:0] [--modes cold,warm]
        [--layouts trainer,sharded] [--saves 4] [--small] [--json OUT.json]

1. Builds a TinyLlama-1.1B-shaped Llama once (random weights, bf16, the bundled byte-level tokenizer) as two
   templates: a Hugging Face Trainer checkpoint (`model.safetensors`, config, tokenizer, trainer_state.json) and
   the Trainer's FSDP SHARDED_STATE_DICT checkpoint (`pytorch_model_fsdp_0/`, a torch.distributed.checkpoint
   directory). `--small`: a 2-layer model, to try the script on a CPU.
2. For each mode and layout: a fresh output dir and a daemon watching it (`ckpt-watch OUT --device DEVICE`,
   `warm = false` for cold), preset = the probes (parameters, flops, perplexity, inference) + lm-eval on the
   bundled multiple-choice task. Then `--saves` times: the template is copied next to the output dir and renamed
   into it as `checkpoint-N` (it appears complete at one instant: that instant is the "save"), and the time until
   the job's result file appears is the latency. One checkpoint at a time: this measures latency, not throughput.
3. GPU busy: nvidia-smi's utilization.gpu of the device sampled every 100 ms; the share of samples above 0 between
   the save and the result (`gpu_busy`), and within the job's own window, its started_at to finished_at
   (`gpu_busy_job`: the job's time on the GPU as nvidia-smi sees it; a CPU run reports none).

Prints one line per job and a summary per mode and layout (median of the jobs after the first, whose worker start
a warm daemon pays once); `--json` writes every figure. Needs torch (CUDA for a GPU run), transformers, lm-eval,
watchdog. Writes about 3x the model size (two templates, one copy in flight) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from preset_device import tiny_llama  # tests/bench is on sys.path: the script's own folder

ROOT = Path(__file__).resolve().parents[2]
PRESET = """[presets.bench]
description = "probes + lm-eval on the bundled multiple-choice task"
time_budget = 900
[[presets.bench.evaluators]]
backend = "probes"
probes = ["parameters", "flops", "perplexity", "inference"]
iterations = 1
new_tokens = 16
[[presets.bench.evaluators]]
backend = "lm_eval"
tasks = ["ckpt_watch_smoke_mc"]
"""


def build_templates(root: Path, small: bool) -> dict[str, Path]:
    import torch.distributed.checkpoint as dcp

    templates = {"trainer": root / "template-trainer", "sharded": root / "template-sharded"}
    if all((t / "trainer_state.json").is_file() for t in templates.values()):
        return templates
    model, config, tokenizer = tiny_llama(small)
    for layout, folder in templates.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if layout == "trainer":
            model.save_pretrained(folder)
        else:  # what accelerate's FSDP SHARDED_STATE_DICT save writes: DCP of {"model": state_dict}
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
            config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 0}))
    return templates


class GpuBusy:
    """utilization.gpu of one GPU every 100 ms, from nvidia-smi's own loop; nothing on a machine without it."""

    def __init__(self, index: int | None):
        self.samples: list[tuple[float, int]] = []
        self._proc = None
        if index is not None and shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", f"--id={index}", "--query-gpu=timestamp,utilization.gpu",
                                           "--format=csv,noheader,nounits", "-lms", "100"],
                                          stdout=subprocess.PIPE, text=True)  # fmt: skip
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                stamp, util = (part.strip() for part in line.split(","))
                when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((when, int(util)))
            except ValueError:
                continue

    def busy_share(self, begin: float, end: float) -> float | None:
        window = [util for when, util in self.samples if begin <= when <= end]
        return round(sum(1 for util in window if util > 0) / len(window), 3) if window else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


def run_mode(root: Path, mode: str, layout: str, template: Path, device: str, saves: int, gpu: GpuBusy) -> list[dict]:
    output = root / f"run-{mode}-{layout}"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    config = root / f"{mode}.toml"
    config.write_text(f'wandb = "off"\ntensorboard = "off"\npreset = "bench"\nwarm = {str(mode == "warm").lower()}\n'
                      + PRESET)  # fmt: skip
    log = open(root / f"daemon-{mode}-{layout}.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(output), "--device", device, "--config",
                               str(config), "--log-format", "plain"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    jobs = []
    try:
        time.sleep(3)  # the daemon's start-up (a warm one starts its worker with the first job)
        for number in range(1, saves + 1):
            name = f"checkpoint-{number * 100}"
            staging = root / f".staging-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(template, staging)
            state = json.loads((staging / "trainer_state.json").read_text())
            (staging / "trainer_state.json").write_text(json.dumps({**state, "global_step": number * 100}))
            os.sync()
            saved = time.time()
            os.rename(staging, output / name)
            result = output / "ckpt-watch" / name / "regular" / "bench.json"
            while not result.is_file():
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon ended: see {log.name}")
                time.sleep(0.05)
            done = time.time()
            record = json.loads(result.read_text())
            job = {"mode": mode, "layout": layout, "checkpoint": name, "latency_s": round(done - saved, 2),
                   "status": record["status"], "job_walltime_s": record.get("walltime_s"),
                   "timings": record.get("timings"), "gpu_busy": gpu.busy_share(saved, done),
                   # the job's own window (the daemon's start of it to its outcome), without settle and detection
                   "gpu_busy_job": gpu.busy_share(datetime.fromisoformat(record["started_at"]).timestamp(),
                                                  datetime.fromisoformat(record["finished_at"]).timestamp())}  # fmt: skip
            jobs.append(job)
            print(json.dumps(job), flush=True)
            shutil.rmtree(output / name)  # as a trainer's rotation would; keeps the disk use to one copy
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        log.close()
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--layouts", default="trainer,sharded")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="a 2-layer model, to try the script on a CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    templates = build_templates(args.out, args.small)
    gpu = GpuBusy(int(args.device.split(":")[1]) if args.device.startswith("cuda:") else None)
    everything = []
    try:
        for layout in args.layouts.split(","):
            for mode in args.modes.split(","):
                everything += run_mode(args.out, mode, layout, templates[layout], args.device, args.saves, gpu)
    finally:
        gpu.stop()
    print("\nmode  layout    latency s (jobs 2..N, median)  first job  GPU busy (median): of save->result, of the job")
    for layout in args.layouts.split(","):
        for mode in args.modes.split(","):
            jobs = [j for j in everything if j["mode"] == mode and j["layout"] == layout]
            later = jobs[1:] or jobs
            busy = [statistics.median(values) if values else "-" for values in
                    ([j[key] for j in later if j.get(key) is not None] for key in ("gpu_busy", "gpu_busy_job"))]
            print(f"{mode:<5} {layout:<9} {statistics.median(j['latency_s'] for j in later):>8.2f}"
                  f"{jobs[0]['latency_s']:>28.2f}  {busy[0]}, {busy[1]}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
