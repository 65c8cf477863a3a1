#!/usr/bin/env bash
# One command for a CUDA machine: the GPU correctness tests, then the whole benchmark suite.
#
#   bash bench/gpu.sh [OUT]          (default OUT: bench/results/suite-gpu)
#
# Needs only the package with its test extras and a CUDA build of torch (which brings triton):
#   pip install torch   # the CUDA build you use
#   pip install --no-build-isolation -e ".[test]"
# Budget: under 15 minutes on an H100 (tests ≈ 3–4 min, suite ≈ 6 min, compiled steps ≤ 5 min; not yet measured); each stage has a timeout so
# a slow or hung stage cannot eat a lent GPU's whole slot. Everything lands in OUT: device.txt,
# tests.log (+ tests.xml), bench.json, bench.md, the plots, bench.log; compile/ (the compiled-step cases).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/suite-gpu}"
mkdir -p "$OUT"
unset TRITON_INTERPRET   # real kernels, not the interpreter

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# The Triton kernels on CUDA tensors against the float64 reference, and SASRec / DIF-SR training
# steps under sync-debug "error" mode, captured in a CUDA graph (with dropout: fresh masks per
# replay) and compiled by Inductor (tests/test_cuda.py as a whole;
# most of its time is Triton compiling ~35 kernel variants). FASTATTN_TEST_DEVICE=cuda makes it fail, not
# skip, if torch sees no GPU. (The ahead-of-time sm_80/sm_90 compile test needs no GPU: CI runs it.)
TRITON_INTERPRET=0 FASTATTN_TEST_DEVICE=cuda timeout 360 python -m pytest tests/test_cuda.py -q -rs \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

# --benchmark-max-time: GPU rounds are milliseconds, 0.2 s of them per case is plenty
timeout 400 python -m fastattn.bench --device cuda --out "$OUT" -k "not compiled" --benchmark-max-time=0.2 \
    2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

# Compiled vs eager training steps on their own, last: each case's warm-up runs Inductor
# (Triton code generation, tens of seconds), so a slow compile cannot cost the suite above.
timeout 300 python -m fastattn.bench --device cuda --out "$OUT/compile" -k compiled --benchmark-max-time=0.2 \
    2>&1 | tee "$OUT/compile.log"
compile_rc=${PIPESTATUS[0]}

echo "gpu.sh: tests exit ${tests_rc}, bench exit ${bench_rc}, compiled-step bench exit ${compile_rc}; files in ${OUT}"
exit $(( tests_rc != 0 || bench_rc != 0 || compile_rc != 0 ))
