#!/bin/bash
# The spine on a real GPU: train the tiny model with the real Trainer, run `--scan --device cuda:0` on its three
# checkpoints while sampling nvidia-smi (only job children may appear there), then show `--device cuda:3` refused.
#
# Run from the repository root on a GPU machine with torch + transformers installed. On a machine without network,
# put wheels of lm-eval and its missing requirements (and watchdog) into .whl/ first; they are installed into
# /tmp/site. Results go to $OUT (default /tmp/gpu-spine).
set -x
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-spine}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi -L
python3 -V
python3 -c 'import torch,sys; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name(0))'
python3 -m pip list 2>/dev/null | grep -iE '^(pyarrow|fsspec|huggingface.hub|transformers|pandas|numpy|accelerate|rich|tokenizers|safetensors|xxhash|sacrebleu|scikit-learn|absl-py|tabulate|python-dateutil) '
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
python3 -c 'import lm_eval, datasets, watchdog, lm_eval.evaluator, lm_eval.models.huggingface, watcher; print("imports ok")' || exit 1
rm -rf /tmp/out
time python3 -m watcher.tiny /tmp/out --steps 30 --save-steps 10 > $OUT/tiny.txt 2>&1
echo "tiny rc=$?"; tail -3 $OUT/tiny.txt; ls /tmp/out
# sample GPU compute processes once a second while the daemon runs
( while true; do date +%T; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; sleep 1; done ) > $OUT/smi.txt 2>&1 &
SMI=$!
time python3 -m watcher /tmp/out --scan --device cuda:0
echo "daemon cuda:0 rc=$?"
kill $SMI
cat /tmp/out/ckpt-watch/results.jsonl
head -5 /tmp/out/ckpt-watch/checkpoint-10/regular/smoke.log
grep -n -i "device\|cuda\|error\|Traceback" /tmp/out/ckpt-watch/checkpoint-10/regular/smoke.log | head -30
grep -o '"device": "[^"]*"' /tmp/out/ckpt-watch/checkpoint-10/regular/smoke.json
python3 -c 'import json; d=json.load(open("/tmp/out/ckpt-watch/checkpoint-10/regular/smoke.json")); c=d["raw"]["lm_eval"]["config"]; print("top device:", d["device"], "cvd:", repr(d["cuda_visible_devices"]), "| raw.config device:", c.get("device"), "model_args:", c.get("model_args"), "model_dtype:", c.get("model_dtype"))'
grep -c , $OUT/smi.txt; grep -v '^[0-9:]*$' $OUT/smi.txt | sort | uniq -c | head
cp /tmp/out/ckpt-watch/results.jsonl /tmp/out/ckpt-watch/checkpoint-10/regular/smoke.log /tmp/out/ckpt-watch/checkpoint-10/regular/smoke.json $OUT/
python3 -m watcher /tmp/out --scan --device cuda:3
echo "daemon cuda:3 rc=$?"
echo "total script seconds: $(( $(date +%s) - T0 ))"
