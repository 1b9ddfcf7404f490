#!/usr/bin/env bash
# The GPU check, in at most 8 minutes on one H100/H200: install the carried wheels, run every
# GPU-only path once (tools/gpu_check.py: TE vs local spec, SDAR step bf16 and FP8, vLLM sleep /
# wake / sync / log-prob diff, objective benchmark), print one summary table; logs under $OUT.
#
# Wheels (the device machine has torch + triton only), fetched here into .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     megatron-core==0.19.2 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# Transformer Engine (transformer-engine-cu13: 264 MiB) and vLLM (GPU build: hundreds of MiB) do
# not fit a 64 MiB carry: where they are missing their checks say "not run" with the reason.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "gpu_check: no nvidia-smi"
python3 -c "import torch, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  || { echo "gpu_check: torch or megatron-core missing (carry the wheels, see the top of this script)" >&2; exit 1; }
timeout 470 python3 tools/gpu_check.py --out "$OUT" --budget-s 420 "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
