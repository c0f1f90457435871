#!/bin/bash
# Wheels a GPU machine without network needs to run ckpt-watch with lm-eval: exactly the packages of lm-eval's and
# watchdog's requirement closure that the device image ('cuda', Python 3.12, see the device notes' package list)
# lacks, at the versions the dev venv tests with.
#
#   bash tests/bench/fetch_device_wheels.sh DIR      # then carry DIR as .whl/ to the GPU machine
#
# How the list was made (re-run when lm-eval is upgraded): walk `importlib.metadata` requirements of lm-eval and
# watchdog in the dev venv (markers evaluated for Linux, Python 3.12, no extras) and drop every name in the device
# image's package list. wandb is left out: the benchmarks run with `--wandb off`, which never imports it.
# On the GPU machine, tests/bench/install_device_wheels.sh installs DIR into /tmp/site (idempotent).
set -euo pipefail
DIR=${1:?usage: fetch_device_wheels.sh DIR}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
PINS=(
  chardet==6.0.0.post1 dataproperty==1.1.1 datasets==4.7.0 defusedxml==0.7.1 dill==0.4.0 evaluate==0.4.6
  lm-eval==0.4.13 mbstrdecoder==1.1.5 more-itertools==11.2.1 multiprocess==0.70.18 nltk==3.10.4
  pathvalidate==3.3.1 pytablewriter==1.2.1 rouge-score==0.1.2 sqlitedict==2.1.0 tabledata==1.3.5
  tcolorpy==0.1.7 typepy==1.3.5 watchdog==7.1.0 word2number==1.1
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pin in "${PINS[@]}"; do
  name=${pin%%==*}; version=${pin##*==}
  # a wheel of this name and version already there: nothing to do (idempotent re-runs)
  if ls "$DIR"/"$(echo "$name" | tr - _)"-"$version"-*.whl >/dev/null 2>&1; then continue; fi
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${PLATFORMS[@]}" -d "$DIR" "$pin" 2>/dev/null; then
    # published as an sdist only (rouge-score, sqlitedict, word2number): all pure Python, so a wheel built here
    # is the same one the machine would build
    "$PY" -m pip wheel -q --no-deps -w "$DIR" "$pin"
  fi
done
ls "$DIR"
du -sh "$DIR"
