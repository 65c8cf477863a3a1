#!/usr/bin/env bash
# One command for a CUDA machine: the GPU correctness tests, then the whole benchmark suite.
#
#   bash bench/gpu.sh [OUT]          (default OUT: bench/results/suite-gpu)
#
# Needs only the package with its test extras and a CUDA build of torch (which brings triton):
#   pip install torch   # the CUDA build you use
#   pip install --no-build-isolation -e ".[test]"
# Budget: under 9 minutes on an H100 (tests ≈ 2 min, suite ≈ 6 min); each stage has a timeout so
# a slow or hung stage cannot eat a lent GPU's whole slot. Everything lands in OUT: device.txt,
# tests.log (+ tests.xml), bench.json, bench.md, the plots, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/suite-gpu}"
mkdir -p "$OUT"
unset TRITON_INTERPRET   # real kernels, not the interpreter

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# The Triton kernels on CUDA tensors against the float64 reference (tests/test_cuda.py), and the
# ahead-of-time compile of every launch configuration for sm_80/sm_90.
TRITON_INTERPRET=0 timeout 240 python -m pytest tests/test_cuda.py tests/test_gpu_compile.py -q -rs \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 360 python -m fastattn.bench --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu.sh: tests exit ${tests_rc}, bench exit ${bench_rc}; files in ${OUT}"
exit $(( tests_rc != 0 || bench_rc != 0 ))
