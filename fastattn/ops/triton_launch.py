"""A Triton launch described as data, so the same description is run by the launchers and
compiled ahead of time for sm_80/sm_90 by the tests (tests/test_gpu_compile.py).

A launch runs through `torch.library.wrap_triton`, so inside a `torch.library.triton_op`
(triton_registration.py) torch.compile traces it as a `triton_kernel_wrapper_functional` node;
in that operator's eager call, and under the interpreter, wrap_triton returns the kernel itself.
A CUDA launch runs with the tensors' device current (not whichever device is current)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.library import wrap_triton

_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


@dataclass
class KernelLaunch:
    """One kernel call: runtime arguments (tensors, ints, floats; None for an unused pointer)
    and compile-time ones (constexprs), by parameter name."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> None:
        if 0 in self.grid:  # empty sequences: nothing to compute (and CUDA rejects empty grids)
            return
        run = wrap_triton(self.kernel)[self.grid]
        # Triton launches on the current CUDA device: make it the tensors' one (under DDP without
        # torch.cuda.set_device the current device is cuda:0 in every process). The launchers
        # check that all tensors of a call share one device (_common.check_same_device).
        device = self.cuda_device()
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            run(**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def cuda_device(self) -> Optional[torch.device]:
        """The device of the first CUDA tensor argument; None for CPU / meta tensors, and where
        CUDA is unavailable (fake CUDA tensors traced on a machine without a GPU launch nothing)."""
        for value in self.args.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                return value.device if torch.cuda.is_available() else None
        return None

    def ast_source(self) -> Any:
        """The `triton.compiler.ASTSource` a real launch compiles (no alignment specialisation):
        `triton.compile(launch.ast_source(), target=GPUTarget("cuda", 90, 32),
        options=launch.compile_options())` builds it without a GPU. Needs triton imported
        without TRITON_INTERPRET."""
        from triton.compiler import ASTSource

        sig, consts = self.signature()
        return ASTSource(fn=self.kernel, signature={n: sig[n] for n in self.kernel.arg_names}, constexprs=consts)

    def compile_options(self) -> dict[str, int]:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    def signature(self) -> tuple[dict[str, str], dict[str, Any]]:
        """Triton signature and constexpr values as a real launch specializes them (None → constexpr)."""
        sig: dict[str, str] = {}
        consts: dict[str, Any] = {}
        for name, value in self.args.items():
            if value is None:
                sig[name], consts[name] = "constexpr", None
            elif isinstance(value, torch.Tensor):
                sig[name] = "*" + _TRITON_DTYPES[value.dtype]
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"cannot describe argument {name}={value!r} in a Triton signature")
        for name, value in self.constexprs.items():
            sig[name], consts[name] = "constexpr", value
        return sig, consts
