#!/bin/bash
# preset_device.py on a GPU machine without network (see run_on_device.sh). Arguments are passed on, e.g.
#   bash tests/bench/preset_device.sh --out /tmp/preset-bench --device cuda:1 --parallel cuda:0,1
exec bash "$(dirname "$0")/run_on_device.sh" tests/bench/preset_device.py "$@"
