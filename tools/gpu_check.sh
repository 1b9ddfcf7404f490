#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (PyTorch present, no megatron-core): install the
# carried wheels, run the GPU-marked tests and the GPU benchmarks, write logs under $OUT.
#   wheels: python3 -m pip download --no-deps megatron-core==0.19.2 -d .whl  (see README)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_environment.py tests/test_megatron_cpu.py tests/test_algo_vocab_parallel.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
for tokens in 4096 16384; do
  python3 tools/bench_objective.py --device cuda --tokens "$tokens" --repeats 5 \
    --json "$OUT/bench_objective_cuda_${tokens}.json" 2>&1 | tee -a "$OUT/bench_objective_cuda.log" | tail -8
done
