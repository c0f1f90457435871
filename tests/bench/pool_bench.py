"""The pool benchmark (issue 13): a real Trainer on GPU 0, the daemon with a pool of the other GPUs under `latest`.

    python tests/bench/pool_bench.py --workdir /tmp/pool-bench --gpus 1,2,3 --minutes 1.5 --json OUT.json
    python tests/bench/pool_bench.py --dry-run          # this plumbing on a CPU machine, in about three minutes

Modes, each a separate training run in its own output dir under WORKDIR/MODE/ (same model, data, seed, wall time):

    alone   training only (the step-time baseline)
    pool1   the daemon with `device = "cuda:G1"` (the first GPU of --gpus)
    poolN   the daemon with `device = "cuda:G1,...,GN"` (all of --gpus)

The trainer is `transformers.Trainer` on a randomly initialised bf16 Llama built from a config (no download): the
bundled training text as byte-level tokens, `--batch` blocks of `--seq` tokens a step. It saves `checkpoint-N`
(weights, config, tokenizer, trainer_state.json; no optimizer state) every `--save-every` seconds for `--minutes`,
then stops. A TrainerCallback writes each save's time (`on_save`, after the folder is complete) and each step's
start time. The daemon runs one `[[schedule]]` entry (`--preset`, default `smoke`) under `policy = "latest"` from a
config file this script writes, with W&B and TensorBoard off. After training, the daemon is given up to
`--drain` seconds to evaluate what is left (under `latest`: the newest checkpoint), then stopped with SIGTERM.

Measured per mode:
- throughput: checkpoints evaluated per minute while training ran, from the completions' spacing: (k - 1) / (last
  - first finish) over the k results finished before training ended (steady state: neither the ramp-up to the
  first finish nor the drain after training counts); also the plain count;
- latency: a result's `finished_at` minus its checkpoint's save time (the callback's), p50 and p90, all results;
- skipped: the jobs `ckpt-watch status --json` shows as `skipped` (`latest` overtook them), as a fraction of the
  checkpoints saved; and the saved checkpoints with no ok result (the same number once drained);
- step time: the median interval between consecutive step starts, leaving out the first 10 and those with a save;
  the ratio alone / with the daemon (>= 0.99: the daemon costs training at most 1 %);
- concurrency: the most results whose [started_at, finished_at] windows overlap, and the devices they ran on;
- nvidia-smi, sampled every second (`--query-compute-apps`): the most job processes seen on one pool GPU at once,
  and any process other than the trainer on the training GPU.

Exit status 1 when a target is missed (not in --dry-run, where the CPU is shared and the GPUs fake): poolN's
throughput >= 0.9 x N x pool1's, poolN's latency p90 <= pool1's x (1 + --latency-tolerance), each daemon mode's
step-time ratio >= 0.99, no pool GPU with two job processes at once, no job process on the training GPU.
Everything is printed (and written with --json) first.

--dry-run: a two-layer model on the CPU, saves every 3 s for 0.5 min per mode, and the daemon on fake GPUs
(CKPT_WATCH_FAKE_GPUS, watcher/gpu_inventory.py: jobs run on the CPU while pinned to fake ids), or `--pool cpu`
(`device = "cpu"` with `cpu_jobs = N`).
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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WARMUP_STEPS = 10  # step intervals left out at the start (allocator warm-up, first kernels)
STEP_RATIO_TARGET = 0.99
SCALING_TARGET = 0.9  # poolN's throughput >= this x N x pool1's
ACTIVE_STATES = ("pending", "preparing", "evaluating")


# --- the trainer (runs in its own process, pinned to the training GPU) -------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int
    batch: int


GPU_MODEL = ModelSize(hidden=1024, layers=16, heads=16, kv_heads=8, intermediate=2816, seq=1024, batch=32)
CPU_MODEL = ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seq=64, batch=4)


def train(out: Path, log_dir: Path, minutes: float, save_every: float, size: ModelSize, cpu: bool) -> None:
    """Train until `minutes` have passed, saving every `save_every` seconds; write saves.jsonl and steps.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from watcher.tiny import build_tokenizer, training_dataset

    if cpu:
        torch.set_num_threads(1)  # leave the other core(s) to the daemon's jobs
    tokenizer = build_tokenizer()
    blocks = training_dataset(tokenizer, size.seq)

    class Cycle(torch.utils.data.IterableDataset):
        """The text's blocks over and over: a fixed wall time needs more steps than one pass has. Iterable, so
        the run never ends an epoch (which rebuilds the dataloader) and no sampler shuffles a huge index."""

        def __iter__(self):
            while True:
                yield from blocks

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=max(512, size.seq),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    if not cpu:
        model = model.to(torch.bfloat16)  # pure bf16: the checkpoint is what an eval job loads, as in a real run
    params = sum(p.numel() for p in model.parameters())
    saves = (log_dir / "saves.jsonl").open("a", encoding="utf-8")
    step_starts: list[tuple[int, float]] = []  # (global step about to run, time.time())
    saved_after: set[int] = set()
    started = time.time()

    class Clock(TrainerCallback):
        """Saves by wall time and stops after `minutes`; records step starts and save times."""

        def __init__(self) -> None:
            self.last_save = time.time()

        def on_step_begin(self, args, state, control, **kwargs):
            step_starts.append((state.global_step, time.time()))

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            if now - started >= minutes * 60:
                control.should_training_stop = True
                control.should_save = True  # the run's last checkpoint
            elif now - self.last_save >= save_every:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.time()
            saved_after.add(state.global_step)
            saves.write(json.dumps({"step": state.global_step, "saved_at": self.last_save}) + "\n")
            saves.flush()
            control.should_save = False  # else the end-of-training pass would save the same step again
            return control

    args = TrainingArguments(
        output_dir=str(out), max_steps=10**9, save_strategy="no", save_only_model=True, logging_strategy="no",
        per_device_train_batch_size=size.batch, learning_rate=1e-4, report_to=[], use_cpu=cpu, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch" if cpu else "adamw_torch_fused",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Cycle(), processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    intervals = [
        {"step": step, "seconds": nxt - t, "saved": step + 1 in saved_after}  # the save of step s ends its interval
        for (step, t), (_, nxt) in zip(step_starts, step_starts[1:])
    ]
    (log_dir / "steps.json").write_text(json.dumps({"params": params, "started_at": started,
                                                    "finished_at": time.time(), "intervals": intervals}))  # fmt: skip


# --- nvidia-smi, once a second ---------------------------------------------------------------------------------


class SmiSampler(threading.Thread):
    """Which processes hold memory on which GPU, once a second, through nvidia-smi (None without it)."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._halt = threading.Event()
        self._index_of: dict[str, int] = {}
        if self.available:
            out = _run_smi(["--query-gpu=index,uuid", "--format=csv,noheader"])
            for line in out.splitlines():
                index, uuid = (cell.strip() for cell in line.split(","))
                self._index_of[uuid] = int(index)

    def run(self) -> None:
        while self.available and not self._halt.wait(self.interval):
            out = _run_smi(["--query-compute-apps=pid,used_memory,gpu_uuid", "--format=csv,noheader,nounits"])
            apps = []
            for line in out.splitlines():
                cells = [cell.strip() for cell in line.split(",")]
                if len(cells) == 3 and cells[0].isdigit():
                    apps.append({"pid": int(cells[0]), "mib": int(cells[1]) if cells[1].isdigit() else None,
                                 "gpu": self._index_of.get(cells[2], cells[2])})  # fmt: skip
            self.samples.append({"t": time.time(), "apps": apps})

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _run_smi(args: list[str]) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def smi_summary(samples: list[dict[str, Any]], trainer_pid: int | None, train_gpu: int,
                pool: tuple[int, ...]) -> dict[str, Any]:  # fmt: skip
    """The most job processes seen on one pool GPU at once, and processes other than the trainer on its GPU."""
    most = {gpu: 0 for gpu in pool}
    pids: dict[int, set[int]] = {gpu: set() for gpu in pool}
    intruders = set()
    for sample in samples:
        per_gpu: dict[Any, int] = {}
        for app in sample["apps"]:
            per_gpu[app["gpu"]] = per_gpu.get(app["gpu"], 0) + 1
            if app["gpu"] in pids:
                pids[app["gpu"]].add(app["pid"])
            if app["gpu"] == train_gpu and app["pid"] != trainer_pid:
                intruders.add(app["pid"])
        for gpu in pool:
            most[gpu] = max(most[gpu], per_gpu.get(gpu, 0))
    busy = [s for s in samples if sum(1 for a in s["apps"] if a["gpu"] in pool) > 0]
    return {
        "samples": len(samples),
        "max_job_processes_per_gpu": {f"cuda:{g}": n for g, n in most.items()},
        "job_processes_seen": {f"cuda:{g}": len(p) for g, p in pids.items()},
        "max_pool_gpus_busy_at_once": max((len({a["gpu"] for a in s["apps"] if a["gpu"] in pool}) for s in busy),
                                          default=0),  # fmt: skip
        "other_processes_on_training_gpu": sorted(intruders),
    }


# --- one mode ----------------------------------------------------------------------------------------------------


@dataclass
class ModeReport:
    mode: str
    device: str | None  # the daemon's pool, None for `alone`
    slots: int
    params: int = 0
    train_seconds: float = 0.0
    saves: int = 0
    save_interval_s: float | None = None
    step_median_s: float | None = None
    step_intervals: int = 0
    step_ratio: float | None = None  # alone's median / this mode's: >= 0.99 means at most 1 % slower
    jobs: int = 0
    evaluated: int = 0
    evaluated_during_training: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_fraction: float | None = None  # of the checkpoints saved
    not_evaluated: int = 0  # saved checkpoints with no ok result (should equal `skipped` after a drain)
    throughput_per_min: float | None = None
    latency_p50_s: float | None = None
    latency_p90_s: float | None = None
    max_concurrent_jobs: int = 0
    devices: dict[str, int] = field(default_factory=dict)  # result device -> count
    cuda_visible_devices: dict[str, int] = field(default_factory=dict)
    drained: bool | None = None
    daemon_rc: int | None = None
    smi: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)  # step, device, started, finished, latency


@dataclass(frozen=True)
class Setting:
    workdir: Path
    minutes: float
    save_every: float
    size: ModelSize
    cpu_train: bool  # the trainer on the CPU (--dry-run)
    train_gpu: int
    pool_kind: str  # cuda | fake | cpu
    preset: str
    drain: float
    settle: float


def run_mode(mode: str, gpus: tuple[int, ...], s: Setting) -> ModeReport:
    folder = s.workdir / mode
    shutil.rmtree(folder, ignore_errors=True)
    out, logs = folder / "run", folder / "logs"
    out.mkdir(parents=True)
    logs.mkdir()
    device = None if mode == "alone" else ("cpu" if s.pool_kind == "cpu" else "cuda:" + ",".join(map(str, gpus)))
    report = ModeReport(mode, device, len(gpus) if device else 0)
    print(f"== {mode}: {device or 'training alone'} ({s.minutes:g} min)", flush=True)
    daemon = start_daemon(out, logs, device, len(gpus), s) if device else None
    sampler = SmiSampler()
    sampler.start()
    trainer_env = dict(os.environ, PYTHONPATH=_pythonpath())
    trainer_env["CUDA_VISIBLE_DEVICES"] = "" if s.cpu_train else str(s.train_gpu)
    command = [sys.executable, __file__, "train", "--out", str(out), "--logs", str(logs), "--minutes", str(s.minutes),
               "--save-every", str(s.save_every), "--size", json.dumps(asdict(s.size))]  # fmt: skip
    if s.cpu_train:
        command.append("--cpu")
    with (logs / "train.log").open("w") as train_log:
        trainer = subprocess.Popen(command, env=trainer_env, stdout=train_log, stderr=subprocess.STDOUT)
        trainer_rc = trainer.wait()
    if trainer_rc != 0:
        sampler.stop()
        if daemon:
            stop_daemon(daemon)
        tail = (logs / "train.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"pool_bench: the trainer of {mode} exited {trainer_rc}:\n{tail}")
    steps = json.loads((logs / "steps.json").read_text())
    saves = {r["step"]: r["saved_at"] for r in map(json.loads, (logs / "saves.jsonl").read_text().splitlines())}
    report.params, report.saves = steps["params"], len(saves)
    train_end = steps["finished_at"]
    report.train_seconds = round(train_end - steps["started_at"], 1)
    times = sorted(saves.values())
    if len(times) > 1:
        report.save_interval_s = round((times[-1] - times[0]) / (len(times) - 1), 2)
    clean = [i["seconds"] for i in steps["intervals"][WARMUP_STEPS:] if not i["saved"]]
    report.step_intervals = len(clean)
    report.step_median_s = statistics.median(clean) if clean else None
    if daemon:
        report.drained = wait_drained(out, max(saves), s.drain)
        report.daemon_rc = stop_daemon(daemon)
    sampler.stop()
    if sampler.available:
        report.smi = smi_summary(sampler.samples, trainer.pid, s.train_gpu, gpus if device else ())
        (logs / "smi.json").write_text(json.dumps(sampler.samples))
    if daemon:
        measure_results(report, out, saves, train_end)
    # the checkpoints themselves are not needed any more (hundreds of MB each); results and logs stay
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    return report


def _pythonpath() -> str:
    parts = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def write_config(path: Path, device: str, slots: int, s: Setting) -> None:
    lines = [f'device = "{device}"', 'policy = "latest"', 'wandb = "off"', 'tensorboard = "off"',
             'log_format = "plain"', f"settle = {s.settle}", "stop_grace = 5.0", "max_attempts = 1"]  # fmt: skip
    if device == "cpu":
        lines.append(f"cpu_jobs = {slots}")
    lines += ["", "[[schedule]]", f'preset = "{s.preset}"', 'policy = "latest"']
    path.write_text("\n".join(lines) + "\n")


def start_daemon(out: Path, logs: Path, device: str, slots: int, s: Setting) -> subprocess.Popen:
    config = logs / "ckpt-watch.toml"
    write_config(config, device, slots, s)
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the pool names nvidia-smi's indices; the trainer's pinning is its own
    if s.pool_kind == "fake":
        top = max([s.train_gpu, *(int(g) for g in device.split(":")[1].split(","))])
        env["CKPT_WATCH_FAKE_GPUS"] = ",".join(f"{i}:81000:0" for i in range(top + 1))
    log_path = logs / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "watcher", str(out), "--config", str(config)], env=env,
                              stdout=log_path.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:  # the start-up line: the daemon is watching before the first save
        if "ckpt-watch " in log_path.read_text(errors="replace") and "results in" in log_path.read_text():
            return daemon
        if daemon.poll() is not None:
            break
        time.sleep(0.5)
    daemon.kill()
    raise SystemExit(f"pool_bench: the daemon did not start:\n{log_path.read_text(errors='replace')[-3000:]}")


def job_rows(out: Path) -> list[dict[str, Any]]:
    """`ckpt-watch status OUT --json`: one row per job, with its state (pending, ..., done, failed, skipped)."""
    answer = subprocess.run([sys.executable, "-m", "watcher", "status", str(out), "--json"], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=_pythonpath()))  # fmt: skip
    try:
        return json.loads(answer.stdout)
    except json.JSONDecodeError:
        return []


def wait_drained(out: Path, last_step: int, limit: float) -> bool:
    """True once the run's last checkpoint has a finished job (`latest` never skips the newest) and no job is
    pending or running; False after `limit` seconds."""
    deadline = time.time() + limit
    while True:
        rows = job_rows(out)
        last_done = any(r["step"] == last_step and r["state"] in ("done", "failed") for r in rows)
        if last_done and not any(r["state"] in ACTIVE_STATES for r in rows):
            return True
        if time.time() >= deadline:
            return False
        time.sleep(2)


def stop_daemon(daemon: subprocess.Popen) -> int:
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        return daemon.wait()


def measure_results(report: ModeReport, out: Path, saves: dict[int, float], train_end: float) -> None:
    rows = job_rows(out)
    report.jobs = len(rows)
    report.skipped = sum(r["state"] == "skipped" for r in rows)
    report.skipped_fraction = round(report.skipped / len(saves), 3) if saves else None
    results_file = out / "ckpt-watch" / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    report.failed = sum(r["status"] != "ok" for r in records)
    done = []
    for r in records:
        if r["status"] != "ok":
            continue
        started, finished = _unix(r["started_at"]), _unix(r["finished_at"])
        saved = saves.get(r["step"])
        done.append({"step": r["step"], "device": r["device"], "cuda_visible_devices": r["cuda_visible_devices"],
                     "started": started, "finished": finished,
                     "latency_s": round(finished - saved, 2) if saved else None})  # fmt: skip
    done.sort(key=lambda d: d["finished"])
    report.results = done
    report.evaluated = len(done)
    report.not_evaluated = len(set(saves) - {d["step"] for d in done})  # skipped, failed or never seen
    for d in done:
        report.devices[d["device"]] = report.devices.get(d["device"], 0) + 1
        report.cuda_visible_devices[d["cuda_visible_devices"]] = report.cuda_visible_devices.get(
            d["cuda_visible_devices"], 0) + 1  # fmt: skip
    during = [d["finished"] for d in done if d["finished"] <= train_end]
    report.evaluated_during_training = len(during)
    if len(during) >= 2 and during[-1] > during[0]:
        report.throughput_per_min = round((len(during) - 1) / (during[-1] - during[0]) * 60, 2)
    latencies = sorted(d["latency_s"] for d in done if d["latency_s"] is not None)
    if latencies:
        report.latency_p50_s = round(_quantile(latencies, 0.5), 2)
        report.latency_p90_s = round(_quantile(latencies, 0.9), 2)
    report.max_concurrent_jobs = max_overlap([(d["started"], d["finished"]) for d in done])


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def max_overlap(windows: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows])  # an end before a start at a tie
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


# --- targets and the table ---------------------------------------------------------------------------------------


def check_targets(reports: dict[str, ModeReport], latency_tolerance: float) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when it cannot be measured, the figures)."""
    checks: list[tuple[str, bool | None, str]] = []
    alone = reports.get("alone")
    for report in reports.values():
        if report.device is None:
            continue
        if alone and alone.step_median_s and report.step_median_s:
            report.step_ratio = round(alone.step_median_s / report.step_median_s, 4)
            checks.append((f"{report.mode}: step-time ratio >= {STEP_RATIO_TARGET}", report.step_ratio >= STEP_RATIO_TARGET,
                           f"{alone.step_median_s * 1000:.1f} ms alone / {report.step_median_s * 1000:.1f} ms "
                           f"= {report.step_ratio:.4f}"))  # fmt: skip
        if report.smi is not None:
            most = max(report.smi["max_job_processes_per_gpu"].values(), default=0)
            checks.append((f"{report.mode}: at most one job process per pool GPU", most <= 1,
                           f"most seen at once on one GPU: {most}"))  # fmt: skip
            intruders = report.smi["other_processes_on_training_gpu"]
            checks.append((f"{report.mode}: nothing but the trainer on the training GPU", not intruders,
                           f"other pids: {intruders or 'none'}"))  # fmt: skip
        if report.failed:
            checks.append((f"{report.mode}: no failed job", False, f"{report.failed} failed"))
    one, many = reports.get("pool1"), next((r for m, r in reports.items() if m.startswith("pool") and m != "pool1"),
                                           None)  # fmt: skip
    if one and many:
        want = SCALING_TARGET * many.slots
        if one.throughput_per_min and many.throughput_per_min:
            scaling = many.throughput_per_min / one.throughput_per_min
            checks.append((f"{many.mode}: throughput >= {want:.2f} x pool1's", scaling >= want,
                           f"{many.throughput_per_min} / {one.throughput_per_min} per min = {scaling:.2f}x"))
        else:
            checks.append((f"{many.mode}: throughput >= {want:.2f} x pool1's", None, "too few results to measure"))
        if one.latency_p90_s is not None and many.latency_p90_s is not None:
            bound = one.latency_p90_s * (1 + latency_tolerance)
            checks.append((f"{many.mode}: latency p90 <= pool1's x {1 + latency_tolerance:g}",
                           many.latency_p90_s <= bound, f"{many.latency_p90_s} s vs {one.latency_p90_s} s"))
    return checks


def print_table(reports: dict[str, ModeReport]) -> None:
    rows = [
        ("device", lambda r: r.device or "-"),
        ("training s", lambda r: f"{r.train_seconds:.0f}"),
        ("saves (every s)", lambda r: f"{r.saves} ({r.save_interval_s})"),
        ("step median ms", lambda r: f"{r.step_median_s * 1000:.1f}" if r.step_median_s else "-"),
        ("step ratio alone/this", lambda r: f"{r.step_ratio:.4f}" if r.step_ratio else "-"),
        ("jobs / evaluated / failed", lambda r: f"{r.jobs} / {r.evaluated} / {r.failed}" if r.device else "-"),
        ("evaluated per min", lambda r: str(r.throughput_per_min) if r.device else "-"),
        ("latency p50 / p90 s", lambda r: f"{r.latency_p50_s} / {r.latency_p90_s}" if r.device else "-"),
        ("skipped (of saves) / not evaluated", lambda r: f"{r.skipped} ({r.skipped_fraction}) / {r.not_evaluated}"
                                                          if r.device else "-"),
        ("max jobs at once", lambda r: str(r.max_concurrent_jobs) if r.device else "-"),
        ("result devices", lambda r: ", ".join(f"{d} x{n}" for d, n in sorted(r.devices.items())) or "-"),
        ("nvidia-smi max procs/GPU", lambda r: _smi_cell(r)),
        ("drained", lambda r: str(r.drained) if r.device else "-"),
    ]
    modes = list(reports)
    width = max(len(name) for name, _ in rows)
    cells = {m: [get(reports[m]) for _, get in rows] for m in modes}
    widths = {m: max(len(m), *(len(c) for c in cells[m])) for m in modes}
    print(" " * width + "  " + "  ".join(m.rjust(widths[m]) for m in modes))
    for i, (name, _) in enumerate(rows):
        print(name.ljust(width) + "  " + "  ".join(cells[m][i].rjust(widths[m]) for m in modes))


def _smi_cell(report: ModeReport) -> str:
    if report.smi is None:
        return "-"
    return " ".join(f"{g.split(':')[1]}:{n}" for g, n in report.smi["max_job_processes_per_gpu"].items()) or "-"


# --- the command -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pool_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pool-bench"))
    parser.add_argument("--gpus", default="1,2,3", help="the pool's GPUs (pool1 takes the first); default 1,2,3")
    parser.add_argument("--train-gpu", type=int, default=0)
    parser.add_argument("--modes", default="alone,pool1,poolN", help="any of alone, pool1, poolN, in order")
    parser.add_argument("--minutes", type=float, help="training wall time per mode (default 1.5; dry run 0.5)")
    parser.add_argument("--save-every", type=float, help="seconds between saves (default 4; dry run 3)")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--drain", type=float, default=90.0, help="seconds the daemon may take after training")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--pool", choices=("cuda", "fake", "cpu"), help="default cuda; dry run: fake")
    parser.add_argument("--size", help="model size as JSON (keys of ModelSize), overriding the default")
    parser.add_argument("--latency-tolerance", type=float, default=0.05,
                        help="poolN's p90 may exceed pool1's by this fraction (run-to-run noise); default 0.05")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, fake GPUs: the plumbing")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    gpus = tuple(int(g) for g in args.gpus.split(","))
    size = CPU_MODEL if args.dry_run else GPU_MODEL
    if args.size:
        size = ModelSize(**{**asdict(size), **json.loads(args.size)})
    setting = Setting(
        workdir=args.workdir, minutes=args.minutes or (0.5 if args.dry_run else 1.5),
        save_every=args.save_every or (3.0 if args.dry_run else 4.0), size=size, cpu_train=args.dry_run,
        train_gpu=args.train_gpu, pool_kind=args.pool or ("fake" if args.dry_run else "cuda"), preset=args.preset,
        drain=args.drain, settle=args.settle,
    )  # fmt: skip
    if setting.pool_kind == "cuda" and args.train_gpu in gpus:
        parser.error(f"the training GPU {args.train_gpu} must not be in the pool {args.gpus}")
    pools = {"alone": (), "pool1": gpus[:1], "poolN": gpus}
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in pools]:
        parser.error(f"unknown mode(s) {unknown}: choose from alone, pool1, poolN")
    started = time.time()
    reports: dict[str, ModeReport] = {}
    for mode in modes:
        name = f"pool{len(gpus)}" if mode == "poolN" else mode
        reports[name] = run_mode(name, pools[mode], setting)
    checks = check_targets(reports, args.latency_tolerance)
    print(f"\npool benchmark: {reports[next(iter(reports))].params / 1e6:.1f}M-parameter Llama, "
          f"{setting.minutes:g} min per mode, a save every {setting.save_every:g} s, preset {setting.preset}, "
          f"policy latest, {'dry run (CPU, ' + setting.pool_kind + ' pool)' if args.dry_run else 'GPU'}; "
          f"{time.time() - started:.0f} s in all")  # fmt: skip
    print_table(reports)
    missed = False
    for name, met, figures in checks:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[met]
        print(f"  {verdict:>12}  {name}: {figures}")
        missed |= met is not True
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "setting": {**asdict(setting), "workdir": str(setting.workdir)},
            "modes": {m: asdict(r) for m, r in reports.items()},
            "targets": [{"target": n, "met": m, "figures": f} for n, m, f in checks],
        }, indent=2))  # fmt: skip
        print(f"wrote {args.json}")
    if args.dry_run:
        print("dry run: targets not enforced (shared CPU, fake GPUs)")
        return 0
    return 1 if missed else 0


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pool_bench.py train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--save-every", type=float, required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    train(args.out, args.logs, args.minutes, args.save_every, ModelSize(**json.loads(args.size)), args.cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
