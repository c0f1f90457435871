#!/bin/bash
# Run a benchmark script on a GPU machine without network: the wheels of lm-eval's missing requirements (and
# watchdog) go in .whl/ first (fetch_device_wheels.sh) and are installed into /tmp/site. E.g.
#   bash tests/bench/run_on_device.sh tests/bench/save_to_result.py --out /tmp/s2r --device cuda:0
set -x
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))'
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
script=$1
shift
time python3 "$script" "$@"
