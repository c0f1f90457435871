#!/bin/bash
# save_to_result.py on a GPU machine without network (see run_on_device.sh), e.g.
#   bash tests/bench/save_to_result.sh --out /tmp/s2r --device cuda:0 --saves 4
exec bash "$(dirname "$0")/run_on_device.sh" tests/bench/save_to_result.py "$@"
