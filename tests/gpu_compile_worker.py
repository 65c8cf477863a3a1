"""Compile every Triton launch configuration for one GPU architecture; run by test_gpu_compile.py
in a subprocess because the tests' own process has TRITON_INTERPRET=1 set.

Usage: python tests/gpu_compile_worker.py CAPABILITY  → one JSON line per configuration.
"""
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor


def _launches(cap):
    """Every launch the launchers choose on sm_80; on other archs only those that differ from the
    arch-less ones (sm_86/89: the compact float32 tiles; sm_90: the 16-bit fused backward's tiles).
    The rest are the same kernels with the same constexprs: the sm_80 run compiles them, and on
    sm_90 tests/test_gpu_resources.py compiles the headline cases and every autotune candidate.
    Compiling all of them for every arch (cold cache: minutes per arch on 2 cores) is the resource
    report's job (`python -m fastattn.ops.aot --report`)."""
    from fastattn.ops.aot import every_triton_launch

    if cap == 80:
        return every_triton_launch(cap)

    def described(launch):
        return (launch.kernel, sorted(launch.constexprs.items()), launch.num_warps, launch.num_stages)

    return [(name, launch) for (name, launch), (_, regular) in zip(every_triton_launch(cap), every_triton_launch())
            if described(launch) != described(regular)]


def _compile(index_and_cap):
    index, cap = index_and_cap
    from triton.backends.compiler import GPUTarget

    from fastattn.ops.aot import compile_launch

    name, launch = _launches(cap)[index]
    try:
        # triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cap, 32))
        res = compile_launch(launch, GPUTarget("cuda", cap, 32), name)
        return {"name": name, "ok": True, "shared": res.shared_bytes}
    except Exception as exc:  # reported per configuration by the test
        return {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    cap = int(sys.argv[1])
    n = len(_launches(cap))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(_compile, [(i, cap) for i in range(n)]):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
