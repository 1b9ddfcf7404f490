#!/usr/bin/env bash
# Bootstrap the environment, then run its python with the given arguments:
#   bash tools/run.sh -m megatron_sdar.train      # the main job on the built-in default
#   bash tools/run.sh -m pytest                   # the test suite
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$ROOT/tools/bootstrap.sh" | tail -1)
cd "$ROOT"
# The environment is shared by every checkout on the machine and holds no copy of megatron-sdar:
# this checkout's code is what runs (and what its subprocesses import: they inherit PYTHONPATH).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$@"
