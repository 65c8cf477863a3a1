"""float32 dots run on tensor cores in the mode torch.get_float32_matmul_precision() asks for
(issue 17, item 1): "highest" → tf32x3, "high" / "medium" → tf32; half types are unaffected.

- In this process (interpreter): the launchers read the mode when they describe a launch.
- In a subprocess without TRITON_INTERPRET (this file run as a script, as
  tests/gpu_compile_worker.py is for test_gpu_compile.py): the float32 launch of every kernel,
  tile class 64, compiles for sm_80 and sm_90 in both modes to PTX with tensor-core instructions
  (mma.sync, or wgmma on sm_90) — a static fact of the code, no GPU needed. Accuracy against
  float64 is a GPU measurement: tests/test_cuda.py.

- Accuracy, emulated: Triton's interpreter ignores input_precision (its tl.dot is numpy's float32
  matmul, so every other interpreter test sees IEEE products in every mode). Here its tl.dot is
  patched to do what the compiled code does (TTGIR of tf32x3: hi = cvt.rna.tf32(x), lo = x - hi,
  lo·hi + hi·lo + hi·hi on tf32 tensor cores, which truncate their operands to tf32; tf32: one
  truncated product) and the kernels are held to the rule tests/test_cuda.py checks on a GPU:
  "highest" within 2× torch's own float32 error against float64 (+ 4 ulps), "high" within 5e-3.
  An emulation, not the hardware (the mma's internal accumulation order is not modelled).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The float32 launch of each kernel the modes apply to (tile class 64, no optional inputs).
KERNELS = {
    "fwd": "fwd-dqk64-dv64-float32-{precision}-dropout0-domains0",
    "bwd": "bwd-dqk64-dv64-float32-{precision}-dropout0-domains0",
    "bwd_dkdv": "bwd_dkdv-dqk64-dv64-float32-{precision}-dropout0-domains0",
    "bwd_dq": "bwd_dq-dqk64-dv64-float32-{precision}-dropout0-domains0",
    "ce_lse": "ce_lse-d64-float32-{precision}-bias0",
    "ce_bwd_dh": "ce_bwd_dh-d64-float32-{precision}-bias0",
    "ce_bwd_de": "ce_bwd_de-d64-float32-{precision}-bias0",
}
MODES = {"highest": "tf32x3", "high": "tf32"}
# Tensor-core instructions in PTX: mma.sync (sm_80+) or wgmma.mma_async (sm_90).
TENSOR_CORE = re.compile(r"^\s*(mma\.sync|wgmma\.mma_async)\S*", re.M)


@pytest.fixture
def restore_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("mode, expected", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_launchers_follow_float32_matmul_precision(restore_precision, mode: str, expected: str) -> None:
    from fastattn.ops.attention.triton_bwd import bwd_launches
    from fastattn.ops.attention.triton_fwd import fwd_launch
    from fastattn.ops.cross_entropy.triton_bwd import bwd_launches as ce_bwd_launches
    from fastattn.ops.cross_entropy.triton_fwd import lse_launch

    restore_precision(mode)
    for dtype, want in ((torch.float32, expected), (torch.bfloat16, "tf32"), (torch.float16, "tf32")):
        q = torch.empty(2, 1, 8, 16, dtype=dtype, device="meta")
        fwd, out, lse, _ = fwd_launch(q, q, q, 0.25, True, 0.0, None, None, None)
        bwd = [launch for fused in (True, False) for launch in bwd_launches(
            q, q, q, out, out, lse, None, None, 0.25, True, 0.0, None, None, None, fused=fused)[0]
            if "DOT_PRECISION" in launch.constexprs]
        h = torch.empty(8, 16, dtype=dtype, device="meta")
        row = torch.empty(8, device="meta")
        ce_fwd, _, _ = lse_launch(h, h, None, 1.0)
        ce_bwd, *_ = ce_bwd_launches(h, h, None, 1.0, row, row, row, row.long(), row)
        for launch in (fwd, *bwd, ce_fwd, *ce_bwd):
            assert launch.constexprs["DOT_PRECISION"] == want, (dtype, launch.kernel.__name__)


def test_every_launch_lists_both_float32_modes() -> None:
    from fastattn.ops.attention.triton_backend import every_launch as attention_launches
    from fastattn.ops.cross_entropy.triton_backend import every_launch as ce_launches

    launches = dict([*attention_launches(), *ce_launches()])
    for precision in MODES.values():
        for pattern in KERNELS.values():
            assert launches[pattern.format(precision=precision)].constexprs["DOT_PRECISION"] == precision
    assert {launch.constexprs.get("DOT_PRECISION") for name, launch in launches.items()
            if "float32" not in name} <= {"tf32", None}


@pytest.mark.parametrize("capability", [80, 90])
def test_float32_dots_compile_to_tensor_core_instructions(capability: int) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(capability)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["name"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert len(results) == len(KERNELS) * len(MODES), sorted(results)
    no_tensor_cores = [f"{name}: {r.get('error') or 'no mma/wgmma in the PTX'}"
                       for name, r in results.items() if not r.get("tensor_core_instructions")]
    assert not no_tensor_cores, f"sm_{capability}:\n" + "\n".join(no_tensor_cores)


def _tf32(x):
    """x (float32 numpy) truncated to tf32 (10 mantissa bits), as tensor cores read it."""
    import numpy as np

    return (x.view(np.int32) & ~0x1FFF).view(np.float32)


def _emulated_dot(original):
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        precision = str(input_precision).upper()  # INPUT_PRECISION.TF32 / TF32x3 / IEEE
        if a.dtype.scalar != tl.float32 or b.dtype.scalar != tl.float32 or precision.endswith("IEEE"):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y, acc = a.data.astype(np.float32), b.data.astype(np.float32), d.data.astype(np.float32)

        def mma(u, v):
            return np.matmul(_tf32(u), _tf32(v), dtype=np.float32)

        if precision.endswith("TF32X3"):
            x_hi = ((x.view(np.int32) + 0x1000) & ~0x1FFF).view(np.float32)  # cvt.rna.tf32.f32
            y_hi = ((y.view(np.int32) + 0x1000) & ~0x1FFF).view(np.float32)
            acc = acc + mma(x - x_hi, y_hi) + mma(x_hi, y - y_hi) + mma(x_hi, y_hi)
        else:
            acc = acc + mma(x, y)
        return interpreter.TensorHandle(acc.astype(np.float32), d.dtype.scalar)

    return create_dot


@pytest.fixture
def emulated_tensor_cores(monkeypatch):
    from triton.runtime import interpreter

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("emulates tensor cores in the Triton interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        _emulated_dot(interpreter.InterpreterBuilder.create_dot))


def _assert_mode_rule(mode: str, results: list, truths: list, torch_fp32: list) -> None:
    from attention_cases import max_err

    for i, (got, truth, ref) in enumerate(zip(results, truths, torch_fp32)):
        scale = max(1.0, truth.abs().max().item())
        err = max_err(got, truth)
        bound = 2 * max_err(ref, truth) + 2.0 ** -22 * scale if mode == "highest" else 5e-3 * scale
        assert err <= bound, f"result {i} ({mode}): err {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("mode", ["highest", "high"])
def test_emulated_tensor_core_accuracy_attention(emulated_tensor_cores, restore_precision, mode: str) -> None:
    from attention_cases import Case, make_inputs, run_fastattn, run_reference, with_grad

    case = Case(b=2, h=2, lq=200, dk=32, attr_dims=(8,), padding="left")
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk, generator=torch.Generator().manual_seed(1))
    truth, _, truth_grads = run_reference(case, inputs, grad_out)
    ref, _, ref_grads = run_fastattn(case, with_grad(inputs), "torch", grad_out)
    restore_precision(mode)
    out, _, grads = run_fastattn(case, with_grad(inputs), "triton", grad_out)
    _assert_mode_rule(mode, [out, *grads], [truth, *truth_grads], [ref, *ref_grads])


@pytest.mark.parametrize("mode", ["highest", "high"])
def test_emulated_tensor_core_accuracy_cross_entropy(emulated_tensor_cores, restore_precision, mode: str) -> None:
    from catalog_cases import make_case, run, run_naive

    case = make_case(257, 3000, 64)
    truth, truth_grads = run_naive(case, temperature=0.7)
    ref, ref_grads = run(case, "torch", temperature=0.7)
    restore_precision(mode)
    loss, grads = run(case, "triton", temperature=0.7)
    _assert_mode_rule(mode, [loss, *grads], [truth, *truth_grads], [ref, *ref_grads])


def _compile(job: tuple[str, int]) -> dict:
    """Compile one launch of every_launch() for sm_`capability`; count tensor-core instructions."""
    name, capability = job
    import triton
    from triton.backends.compiler import GPUTarget

    from fastattn.ops.aot import every_triton_launch

    launch = dict(every_triton_launch())[name]
    try:
        compiled = triton.compile(launch.ast_source(), target=GPUTarget("cuda", capability, 32),
                                  options=launch.compile_options())
    except Exception as exc:  # reported per kernel by the test
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"name": name, "tensor_core_instructions": len(TENSOR_CORE.findall(compiled.asm["ptx"]))}


def main(capability: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    jobs = [(pattern.format(precision=p), capability) for p in MODES.values() for pattern in KERNELS.values()]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
