# Source this on the GPU machine (from the repository root): installs .whl/*.whl (made by fetch_device_wheels.sh)
# into /tmp/site once, and puts the repository and /tmp/site on PYTHONPATH. Sourcing it twice installs once, so
# several benchmark scripts in one device call share it.
#
#   source tests/bench/install_device_wheels.sh || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.ckpt-watch-wheels-done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ckpt-watch-wheels-done || return 1
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
${PYTHON:-python3} -c 'import lm_eval, lm_eval.evaluator, datasets, watchdog, watcher' || return 1
