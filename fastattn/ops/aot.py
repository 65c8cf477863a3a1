"""Ahead-of-time compilation of Triton launches for a GPU architecture, without a GPU.

The interpreter accepts code that real GPUs reject, so tests compile every configuration a
launcher can choose to cubin for sm_80 and sm_90 (tests/test_gpu_compile.py). Needs triton
imported *without* TRITON_INTERPRET.

`python -m fastattn.ops.aot --report [--arch 80,86,89,90] [--json FILE] [--md FILE]
[--headline-only]` writes the static resource report (registers, spills, shared memory, tensor
cores, tt.dot count, occupancy) of every configuration: see resources/ and docs/gpu-resources.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

from ._common import SHARED_MEMORY_LIMIT
from .triton_launch import KernelLaunch

__all__ = ["SHARED_MEMORY_LIMIT", "CompileResult", "compile_launch", "every_triton_launch"]


@dataclass
class CompileResult:
    name: str
    capability: int
    shared_bytes: int
    cubin_bytes: int


def compile_launch(launch: KernelLaunch, target: Any, name: str = "") -> CompileResult:
    """Compile one launch to cubin for `target` (a triton GPUTarget, e.g. GPUTarget("cuda", 90, 32));
    raise if it fails or needs more shared memory than that architecture has."""
    import triton
    from triton.compiler import ASTSource

    fn = launch.kernel
    sig, consts = launch.signature()
    src = ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=consts)
    compiled = triton.compile(src, target=target, options=dict(num_warps=launch.num_warps,
                                                              num_stages=launch.num_stages))
    shared = int(compiled.metadata.shared)
    limit = SHARED_MEMORY_LIMIT[target.arch]
    if shared > limit:
        raise RuntimeError(f"{name}: needs {shared} bytes of shared memory, sm_{target.arch} allows {limit}")
    return CompileResult(name, target.arch, shared, len(compiled.asm["cubin"]))


def every_triton_launch(arch: Optional[int] = None) -> list[tuple[str, KernelLaunch]]:
    """Every kernel configuration any launcher of the package can choose (meta tensors); with
    `arch`, those it chooses on sm_`arch` (sm_86/89: the compact float32 tiles)."""
    from ._common import target_arch
    from .attention.triton_backend import every_launch as attention_launches
    from .cross_entropy.triton_backend import every_launch as cross_entropy_launches

    with target_arch(arch) if arch is not None else contextlib.nullcontext():
        return [*attention_launches(), *cross_entropy_launches()]


if __name__ == "__main__":
    # `python -m fastattn.ops.aot --report ...`: the static resource report (resources/report.py).
    import sys

    from fastattn.ops.resources import main

    sys.exit(main())
