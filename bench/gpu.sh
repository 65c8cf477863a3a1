#!/usr/bin/env bash
# One command for a CUDA machine: the headline measurements, the GPU correctness tests, then as
# much of the benchmark suite as the time budget allows.
#
#   bash bench/gpu.sh [OUT]          (default OUT: bench/results/suite-gpu)
#
# Needs a CUDA build of torch (which brings triton), pytest and pytest-benchmark, and the package
# importable: installed (pip install --no-build-isolation -e ".[test]") or, as on a machine where
# nothing can be installed, straight from this checkout (the script then puts it on PYTHONPATH).
# pytest-xdist, when installed, compiles the Triton kernels in parallel processes.
#
# GPU_SH_BUDGET (seconds, default 570: one 10-minute slot of a lent GPU, with room to pack the
# results) bounds the whole run. The stages, in order of value, each limited so that the ones after
# it keep their share:
#   1. warm:     every headline case once, in parallel (pytest-xdist), so Triton's cache holds the
#                kernels before anything is timed (skipped without xdist: stage 2 then compiles);
#   2. headline: bench/bench_headline.py timed (DIF attention B128 H2 L200 Dk 32+8 in bf16 and
#                fp32, vs the torch reference and SDPA; cross-entropy N 8192/51,200 × V 10k–1M vs
#                naive, Liger-Kernel and Cut Cross-Entropy when installed)       → OUT/headline/
#   3. tests:    tests/test_cuda.py, the Triton kernels on CUDA against the float64 reference and
#                the training steps under sync-debug "error", CUDA graphs and Inductor
#                                                                     → OUT/tests.log, tests.xml
#   4. suite:    the benchmark suite at --size quick, torch.compile providers and compiled steps
#                left out (each compiles for tens of seconds)                      → OUT/suite/
#   5. compiled: compiled vs eager training steps                                → OUT/compile/
# Stages 2, 4, 5 stop starting cases at their limit (python -m fastattn.bench --time-limit) and
# still write their JSON and reports; `timeout` is the backstop for a hung case.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/suite-gpu}"
BUDGET="${GPU_SH_BUDGET:-570}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
unset TRITON_INTERPRET                 # real kernels, not the interpreter
export FASTATTN_DISABLE_CPP=1          # no stage uses the C++ CPU kernels; a just-in-time build would eat the slot
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import fastattn" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    WORKERS=$(( $(nproc) / 2 )); (( WORKERS > 8 )) && WORKERS=8; (( WORKERS < 1 )) && WORKERS=1
    XDIST=(-n "$WORKERS")
fi

left() { echo $(( BUDGET - SECONDS )); }
# limit CAP RESERVE: CAP seconds, or less so that RESERVE seconds stay for the later stages
limit() { local l=$(( $(left) - $2 )); (( l > $1 )) && l=$1; echo "$l"; }
declare -A RC
stage() {  # stage NAME SECONDS COMMAND...: run unless under 20 s are left for it
    local name=$1 secs=$2; shift 2
    if (( secs < 20 )); then echo "gpu.sh: ${name} skipped, ${secs} s left for it"; RC[$name]=skipped; return; fi
    echo "gpu.sh: ${name} (limit ${secs} s, $(left) s of the budget left)"
    "$@"
    RC[$name]=$?
    echo "gpu.sh: ${name} exit ${RC[$name]} after ${SECONDS} s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
  "$PY" -c "import importlib.metadata as m
for p in ('liger-kernel', 'cut-cross-entropy', 'pytest-xdist'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'not installed')"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

bench() {  # bench SECONDS OUTDIR ARGS...: python -m fastattn.bench with a time limit and a backstop
    local secs=$1 dir=$2; shift 2
    timeout $(( secs + 30 )) "$PY" -m fastattn.bench --device cuda --out "$dir" --time-limit "$secs" \
        --benchmark-max-time=0.2 "$@" 2>&1 | tee "$dir.log"
}
mkdir -p "$OUT/headline" "$OUT/suite" "$OUT/compile"

warm() {  # warm SECONDS: each headline case once, benchmarks off, in parallel processes
    # Our kernels and the libraries' (Triton too); torch, naive and SDPA compile nothing.
    timeout "$1" "$PY" -m pytest bench/bench_headline.py --bench-device=cuda --benchmark-disable -q \
        -k "triton or liger or cce" -p no:cacheprovider "${XDIST[@]}" > "$OUT/warm.log" 2>&1
    local rc=$?; tail -3 "$OUT/warm.log"; return $rc
}
tests() {  # tests SECONDS. FASTATTN_TEST_DEVICE=cuda: fail, not skip, if torch sees no GPU
    TRITON_INTERPRET=0 FASTATTN_TEST_DEVICE=cuda timeout "$1" "$PY" -m pytest tests/test_cuda.py -q -rs \
        -p no:cacheprovider --junitxml="$OUT/tests.xml" "${XDIST[@]}" 2>&1 | tee "$OUT/tests.log"
}

if (( ${#XDIST[@]} )); then secs=$(limit 90 420); stage warm "$secs" warm "$secs"; fi
secs=$(limit 150 330); stage headline "$secs" bench "$secs" "$OUT/headline" -k headline
secs=$(limit 210 130); stage tests "$secs" tests "$secs"
secs=$(limit 240 70);  stage suite "$secs" bench "$secs" "$OUT/suite" --size quick \
    -k "not compiled and not headline and not torch_compile"
secs=$(limit 120 5);   stage compiled "$secs" bench "$secs" "$OUT/compile" --size quick -k compiled

summary="gpu.sh: after ${SECONDS} s of ${BUDGET}:"
for name in warm headline tests suite compiled; do summary+=" ${name} ${RC[$name]:-not run}"; done
echo "$summary; files in ${OUT}" | tee "$OUT/summary.txt"
for name in headline tests suite compiled; do
    [[ "${RC[$name]:-0}" == 0 || "${RC[$name]:-}" == skipped ]] || exit 1
done
