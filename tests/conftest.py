"""Test set-up: Triton runs in interpreter mode on CPU tensors (must be set before import)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Before torch loads OpenMP: short spin-waits (see fastattn/__init__.py), so the suite stays
# fast when the CI machine is shared.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
# Triton 3.9 warns on every import unless FP fusion is chosen explicitly; keep its default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Under pytest-xdist (`pytest -n auto`, what .ci/run does) each worker takes its share of the
# cores for torch's and OpenMP's threads: n workers each spinning up every core would oversubscribe.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)


def _patch_interpreter_bf16_dot() -> None:
    """Triton 3.9's interpreter stores bfloat16 as raw uint16 and its tl.dot multiplies those
    integers (reproduce: tl.dot of two bf16 tiles returns ~1e10). Widen bf16 operands to fp32
    first, as the GPU's tensor cores effectively do; the kernels themselves are unchanged."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


_patch_interpreter_bf16_dot()
