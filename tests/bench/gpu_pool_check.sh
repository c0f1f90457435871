#!/bin/bash
# Issue 13's 2-GPU check: two checkpoints evaluated at the same time, one on cuda:0 and one on cuda:1.
#
# Trains the tiny model (python -m watcher.tiny: the real Trainer, two checkpoints), runs
# `ckpt-watch OUT --scan --device cuda:0,1` while sampling nvidia-smi every 0.5 s, then checks from the records:
# both results ok, on cuda:0 and cuda:1 (CUDA_VISIBLE_DEVICES 0 and 1), their [started_at, finished_at] windows
# overlap; and from nvidia-smi: never two processes on one GPU, both GPUs busy in the same sample.
# Exit status 1 when any of that does not hold. Evidence goes to $OUT (default /tmp/gpu-pool-check).
#
# Run from anywhere on a machine with >= 2 GPUs (torch + transformers installed; lm-eval and watchdog from
# .whl/, see fetch_device_wheels.sh). Dry run on a CPU machine: CKPT_WATCH_FAKE_GPUS="0:81000:0,1:81000:0"
# PYTHON=/path/to/venv/python bash tests/bench/gpu_pool_check.sh (no nvidia-smi: only the records are checked).
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/gpu-pool-check}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
source tests/bench/install_device_wheels.sh || exit 1
T0=$(date +%s)
SMI=$(command -v nvidia-smi)
if [ -z "$CKPT_WATCH_FAKE_GPUS" ]; then
  [ -n "$SMI" ] || { echo "gpu_pool_check: no nvidia-smi (set CKPT_WATCH_FAKE_GPUS for a dry run)"; exit 1; }
  nvidia-smi -L | tee "$OUT/gpus.txt"
  [ "$(nvidia-smi -L | grep -c '^GPU')" -ge 2 ] || { echo "gpu_pool_check: needs 2 GPUs"; exit 1; }
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader > "$OUT/gpu_uuids.csv"
fi
RUN=/tmp/gpu-pool-check-run; rm -rf "$RUN"
$PY -m watcher.tiny "$RUN" --steps 20 --save-steps 10 > "$OUT/tiny.log" 2>&1 || { tail "$OUT/tiny.log"; exit 1; }
ls "$RUN"
: > "$OUT/smi.csv"
if [ -n "$SMI" ] && [ -z "$CKPT_WATCH_FAKE_GPUS" ]; then
  # time, pid, process name, MiB, GPU uuid: one line per GPU process, every half second
  ( while true; do t=$(date +%s.%N)
      nvidia-smi --query-compute-apps=pid,process_name,used_memory,gpu_uuid --format=csv,noheader,nounits \
        | sed "s/^/$t, /"; echo "$t, sample"; sleep 0.5; done ) >> "$OUT/smi.csv" 2>&1 &
  SAMPLER=$!
fi
$PY -m watcher "$RUN" --scan --device cuda:0,1 --wandb off --tensorboard off --log-format plain 2>&1 \
  | tee "$OUT/daemon.log"
RC=${PIPESTATUS[0]}
[ -n "$SAMPLER" ] && kill "$SAMPLER"
echo "daemon rc=$RC"
cp "$RUN/ckpt-watch/results.jsonl" "$OUT/results.jsonl" || exit 1
$PY - "$OUT" <<'EOF'
import json, sys
from datetime import datetime
from pathlib import Path

out = Path(sys.argv[1])
unix = lambda iso: datetime.fromisoformat(iso).timestamp()
records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
problems = []
for r in records:
    print(f"{r['checkpoint']}: {r['status']} on {r['device']} (CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']!r}) "
          f"{r['started_at']} -> {r['finished_at']} ({r['walltime_s']} s)")
    if r["status"] != "ok":
        problems.append(f"{r['checkpoint']} failed: {r['error']}")
if sorted(r["device"] for r in records) != ["cuda:0", "cuda:1"]:
    problems.append(f"devices {[r['device'] for r in records]}, wanted cuda:0 and cuda:1")
if len(records) == 2:
    (a0, a1), (b0, b1) = ((unix(r["started_at"]), unix(r["finished_at"])) for r in records)
    overlap = min(a1, b1) - max(a0, b0)
    print(f"the two jobs ran at the same time for {overlap:.1f} s")
    if overlap <= 0:
        problems.append("the two jobs' windows do not overlap")
uuids = out / "gpu_uuids.csv"
if uuids.exists():
    index_of = {u.strip(): int(i) for i, u in (line.split(",") for line in uuids.read_text().splitlines())}
    samples: dict[str, list[tuple[int, str, str, int]]] = {}
    for line in (out / "smi.csv").read_text().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 2 and cells[1] == "sample":
            samples.setdefault(cells[0], [])
        elif len(cells) == 5 and cells[1].isdigit():
            samples.setdefault(cells[0], []).append((index_of.get(cells[4], -1), cells[1], cells[2], cells[3]))
    most = max((max([sum(1 for a in apps if a[0] == g) for g in (0, 1)]) for apps in samples.values()), default=0)
    both = [(t, apps) for t, apps in samples.items() if {a[0] for a in apps} >= {0, 1}]
    print(f"nvidia-smi: {len(samples)} samples; most processes on one GPU at once: {most}; "
          f"samples with a job on both GPUs: {len(both)}")
    for t, apps in both[:3]:
        print("  " + datetime.fromtimestamp(float(t)).strftime("%H:%M:%S.%f")[:-4] + "  "
              + "; ".join(f"GPU {g}: pid {pid} {name} {mib} MiB" for g, pid, name, mib in sorted(apps)))
    if most > 1:
        problems.append(f"nvidia-smi saw {most} processes on one GPU")
    if not both:
        problems.append("nvidia-smi never saw both GPUs busy at once")
else:
    print("nvidia-smi: not sampled (fake GPUs)")
(out / "evidence.json").write_text(json.dumps({"results": records and [
    {k: r[k] for k in ("checkpoint", "status", "device", "cuda_visible_devices", "started_at", "finished_at",
                       "walltime_s")} for r in records], "problems": problems}, indent=2))
for p in problems:
    print("PROBLEM:", p)
print("gpu_pool_check:", "FAILED" if problems else "ok")
sys.exit(1 if problems else 0)
EOF
CHECK=$?
echo "total script seconds: $(( $(date +%s) - T0 ))"
[ "$RC" = 0 ] && [ "$CHECK" = 0 ]
