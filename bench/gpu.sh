#!/usr/bin/env bash
# One command for a CUDA machine: the headline measurements, the GPU correctness tests, then as
# much of the benchmark suite as the time budget allows. It sits in bench/, above suite/ and
# studies/, because it runs from both (and tests/test_cuda.py): bench/README.md, "Layout".
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
#   2. headline: bench/suite/bench_headline.py timed (DIF attention B128 H2 L200 Dk 32+8 in bf16
#                and fp32, vs the torch reference and SDPA; cross-entropy N 8192/51,200 × V 10k–1M
#                vs naive, Liger-Kernel and Cut Cross-Entropy when installed)    → OUT/headline/
#   3. tests:    tests/test_cuda.py, the Triton kernels on CUDA against the float64 reference and
#                the training steps under sync-debug "error", CUDA graphs and Inductor
#                                                                     → OUT/tests.log, tests.xml
#   3a. tuned:   stage 2's timings again with FASTATTN_AUTOTUNE=1 (the listed tile candidates
#                timed once per shape, the fastest kept; the choices land in the JSON under
#                "fastattn_autotune")                                      → OUT/headline-tuned/
#   3b. profile: bench/studies/gpu_profile.py, torch.profiler tables of the headline calls (host
#                vs kernel time, launches per call)                           → OUT/profile.txt
#   4. suite:    the benchmark suite (bench/suite/) at --size quick, torch.compile providers and
#                compiled steps left out (each compiles for tens of seconds)       → OUT/suite/
#   5. compiled: compiled vs eager training steps                                → OUT/compile/
# GPU_SH_STAGES (default "warm headline tests tuned profile suite compiled") runs a subset, in that
# order; GPU_SH_TESTS_K passes a pytest -k expression to the tests stage (e.g. a rerun of fixes).
# Stages 2, 4, 5 stop starting cases at their limit (python -m fastattn.bench --time-limit) and
# still write their JSON and reports; `timeout` is the backstop for a hung case.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/suite-gpu}"
BUDGET="${GPU_SH_BUDGET:-570}"
PY="${PYTHON:-python3}"
STAGES=" ${GPU_SH_STAGES:-warm headline tests tuned profile suite compiled} "
TESTS_K=()
[[ -n "${GPU_SH_TESTS_K:-}" ]] && TESTS_K=(-k "$GPU_SH_TESTS_K")
mkdir -p "$OUT"
unset TRITON_INTERPRET                 # real kernels, not the interpreter
export FASTATTN_DISABLE_CPP=1          # no stage uses the C++ CPU kernels; a just-in-time build would eat the slot
export PYTHONUNBUFFERED=1
if ! (cd / && "$PY" -c "import fastattn" 2>/dev/null); then   # from /: the checkout is no import path there
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    WORKERS=$(( $(nproc) / 2 )); (( WORKERS > 8 )) && WORKERS=8; (( WORKERS < 1 )) && WORKERS=1
    XDIST=(-n "$WORKERS")
fi

left() { echo $(( BUDGET - SECONDS )); }
# Each stage's cap (seconds). A stage gets its cap, or less so that half the caps of the selected
# stages after it stay in the budget.
ORDER=(warm headline tests tuned profile suite compiled)
declare -A CAP=([warm]=90 [headline]=150 [tests]=210 [tuned]=120 [profile]=60 [suite]=240 [compiled]=120)
limit() {  # limit NAME
    local reserve=0 later=0 name
    for name in "${ORDER[@]}"; do
        (( later )) && [[ "$STAGES" == *" $name "* ]] && reserve=$(( reserve + CAP[$name] / 2 ))
        [[ $name == "$1" ]] && later=1
    done
    local l=$(( $(left) - reserve )); (( l > CAP[$1] )) && l=${CAP[$1]}; echo "$l"
}
declare -A RC
stage() {  # stage NAME SECONDS COMMAND...: run unless not selected or under 20 s are left for it
    local name=$1 secs=$2; shift 2
    if [[ "$STAGES" != *" $name "* ]]; then RC[$name]="not selected"; return; fi
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
mkdir -p "$OUT/headline" "$OUT/headline-tuned" "$OUT/suite" "$OUT/compile"

warm() {  # warm SECONDS: each headline case once, benchmarks off, in parallel processes
    # Our kernels and the libraries' (Triton too); torch, naive and SDPA compile nothing.
    FASTATTN_BENCH_WARM_ONLY=1 timeout "$1" "$PY" -m pytest bench/suite/bench_headline.py --bench-device=cuda --benchmark-disable -q \
        -k "triton or liger or cce" -p no:cacheprovider "${XDIST[@]}" > "$OUT/warm.log" 2>&1
    local rc=$?; tail -3 "$OUT/warm.log"; return $rc
}
tests() {  # tests SECONDS. FASTATTN_TEST_DEVICE=cuda: fail, not skip, if torch sees no GPU
    TRITON_INTERPRET=0 FASTATTN_TEST_DEVICE=cuda timeout "$1" "$PY" -m pytest tests/test_cuda.py -q -rs \
        -p no:cacheprovider --junitxml="$OUT/tests.xml" "${XDIST[@]}" "${TESTS_K[@]}" 2>&1 | tee "$OUT/tests.log"
}
tuned() {  # tuned SECONDS: our headline cases with autotuning on (the baselines are stage 2's)
    FASTATTN_AUTOTUNE=1 bench "$1" "$OUT/headline-tuned" -k "headline and triton"
}
profile() {  # profile SECONDS
    timeout "$1" "$PY" bench/studies/gpu_profile.py --out "$OUT/profile.txt" 2>&1 | grep -v "^USDT"
}

(( ${#XDIST[@]} )) || STAGES=${STAGES/ warm / }   # without xdist the headline stage compiles
secs=$(limit warm);     stage warm "$secs" warm "$secs"
secs=$(limit headline); stage headline "$secs" bench "$secs" "$OUT/headline" -k headline
secs=$(limit tests);    stage tests "$secs" tests "$secs"
secs=$(limit tuned);    stage tuned "$secs" tuned "$secs"
secs=$(limit profile);  stage profile "$secs" profile "$secs"
secs=$(limit suite);    stage suite "$secs" bench "$secs" "$OUT/suite" --size quick \
    -k "not compiled and not headline and not torch_compile"
secs=$(limit compiled); stage compiled "$secs" bench "$secs" "$OUT/compile" --size quick -k compiled

summary="gpu.sh: after ${SECONDS} s of ${BUDGET}:"
for name in warm headline tests tuned profile suite compiled; do summary+=" ${name}: ${RC[$name]:-not run};"; done
echo "$summary files in ${OUT}" | tee "$OUT/summary.txt"
for name in headline tests tuned profile suite compiled; do
    [[ "${RC[$name]:-0}" =~ ^(0|skipped|not\ selected)$ ]] || exit 1
done
