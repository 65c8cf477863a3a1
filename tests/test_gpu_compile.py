"""Every Triton kernel, in every configuration its launcher can choose, compiles to cubin for
sm_80; the configurations chosen only on sm_90 (the 16-bit fused backward's tiles) compile for
sm_90, and the compact float32 tiles the launchers choose on sm_86/89 compile for sm_86 within its
99 KB of shared memory — on this CPU machine, no GPU needed (fastattn/ops/aot.py). The shared
configurations on sm_90: the headline cases and autotune candidates in test_gpu_resources.py, all
of them in the resource report (`python -m fastattn.ops.aot --report`, bench/results)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("gpu_compile_worker.py")


@pytest.mark.parametrize("capability", [80, 86, 90])
def test_every_launch_compiles(capability: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(WORKER), str(capability)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [f"{r['name']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, f"{len(failures)} configurations fail on sm_{capability}:\n" + "\n".join(failures)
    # Attention: fwd, dK/dV and dQ for 3 tile classes × 4 dtype/precision cases (float32 in tf32x3
    # and tf32, float16, bfloat16) × 4 constexpr flag sets; the fused backward for the 64 class ×
    # 4 × 4; the split backward's D_i pass for the classes with equal QK/V widths (64, 128) × 3
    # dtypes × domains on/off; the dropout-mask kernel.
    # Cross-entropy: LSE, dH and dE, and dH and dE with gradient filtering, for 3 tile classes × 4
    # dtype/precision cases × bias on/off.
    if capability == 86:
        # Only what differs from sm_80's launches: attention float32 in the 128 class in tf32 (its
        # tf32x3 tiles are compact already) and in the 256 class in both modes — fwd, dK/dV, dQ ×
        # 4 flag sets each —; cross-entropy float32 D 128 LSE in tf32 (its tf32 backward tiles and
        # tf32x3 tiles fit 99 KB already) and D 256 in both modes, 3 kernels and the 2 filtered
        # ones — each × bias on/off.
        assert len(results) == 3 * 3 * 4 + (1 + 2 * 3 + 2 * 2) * 2
        return
    if capability == 90:
        # The fused backward's 64 class in float16 and bfloat16 × 4 flag sets (32 × 64 tiles: wgmma).
        assert len(results) == 2 * 4
        return
    assert len(results) == 3 * 3 * 4 * 4 + 4 * 4 + 2 * 3 * 2 + 1 + 5 * 3 * 4 * 2
