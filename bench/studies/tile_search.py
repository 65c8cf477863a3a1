"""Compile candidate tiles of one Triton kernel at a headline shape and print what ptxas says
(registers, spill bytes, shared memory): how the tile tables of ops/attention and
ops/cross_entropy were chosen (docs/gpu-resources.md, "How the tiles were chosen"). No GPU needed.

    python bench/studies/tile_search.py attn_bwd --dtype float32 --mode high --dims 40,32 \
        --tiles 32x32w4s2,16x32w4s2,16x16w4s1 --arch 80,86,90

Kernels: attn_fwd, attn_bwd (the fused backward; dims = dqk,dv at B 128, H 2, L 200, causal,
padded), ce_lse, ce_bwd_dh, ce_bwd_de (dims = D at N 51,200, V 1M). A tile is
<rows>x<keys or items>w<warps>s<stages>. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

_TILE = re.compile(r"^(\d+)x(\d+)w(\d+)s(\d+)$")


def describe(kernel: str, dtype: torch.dtype, mode: str, dims: tuple[int, ...]) -> Any:
    """The launch the launcher describes for the headline shape (meta tensors)."""
    from fastattn.ops._common import float32_matmul_precision

    meta = torch.device("meta")
    with float32_matmul_precision(mode):
        if kernel.startswith("attn"):
            from fastattn.ops.attention.triton_bwd import bwd_launches
            from fastattn.ops.attention.triton_fwd import fwd_launch

            dqk, dv = dims
            q = torch.empty(128, 2, 200, dqk, dtype=dtype, device=meta)
            v = torch.empty(128, 2, 200, dv, dtype=dtype, device=meta)
            lse = torch.empty(128, 2, 200, device=meta)
            pad = torch.empty(128, 200, dtype=torch.bool, device=meta)
            if kernel == "attn_fwd":
                return fwd_launch(q, q, v, 0.2, True, 0.0, None, pad, None)[0]
            return bwd_launches(q, q, v, v, v, lse, None, None, 0.2, True, 0.0, None, pad, None, fused=True)[0][0]
        from fastattn.ops.cross_entropy.triton_bwd import bwd_launches as ce_bwd
        from fastattn.ops.cross_entropy.triton_fwd import lse_launch

        (d,) = dims
        h = torch.empty(51_200, d, dtype=dtype, device=meta)
        w = torch.empty(1_000_000, d, dtype=dtype, device=meta)
        rows = torch.empty(51_200, device=meta)
        if kernel == "ce_lse":
            return lse_launch(h, w, None, 1.0)[0]
        dh, de = ce_bwd(h, w, None, 1.0, rows, rows, rows, torch.empty(51_200, dtype=torch.int64, device=meta),
                        rows)[0]
        return dh if kernel == "ce_bwd_dh" else de


def compile_tile(job: tuple[str, str, str, tuple[int, ...], str, int]) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    from fastattn.ops.resources import launch_source, ptxas_usage

    kernel, dtype, mode, dims, tile, arch = job
    rows, cols, warps, stages = map(int, _TILE.match(tile).groups())  # type: ignore[union-attr]
    launch = describe(kernel, getattr(torch, dtype), mode, dims)
    launch.constexprs.update({"BLOCK_M": rows, ("BLOCK_N" if kernel.startswith("attn") else "BLOCK_V"): cols})
    launch.num_warps, launch.num_stages = warps, stages
    try:
        compiled = triton.compile(launch_source(launch, arch, aligned=True), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        regs, store, load = ptxas_usage(compiled.asm["ptx"], arch)
        result = f"{regs:>4} regs  spill {store}/{load} B  shared {int(compiled.metadata.shared)} B"
    except Exception as exc:  # noqa: BLE001 (reported per candidate)
        result = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    return f"{kernel} {dtype} {mode} dims={','.join(map(str, dims))} {tile} sm_{arch}: {result}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", choices=["attn_fwd", "attn_bwd", "ce_lse", "ce_bwd_dh", "ce_bwd_de"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--mode", default="highest", choices=["highest", "high"],
                        help="torch.set_float32_matmul_precision for float32 (highest: tf32x3, high: tf32)")
    parser.add_argument("--dims", required=True, help="dqk,dv for attention; D for cross-entropy")
    parser.add_argument("--tiles", required=True, help="comma-separated <rows>x<cols>w<warps>s<stages>")
    parser.add_argument("--arch", default="80,90")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        parser.error("unset TRITON_INTERPRET: nothing compiles for a GPU under the interpreter")
    tiles = args.tiles.split(",")
    bad = [t for t in tiles if not _TILE.match(t)]
    if bad:
        parser.error(f"--tiles: {bad[0]!r} is not <rows>x<cols>w<warps>s<stages>")
    dims = tuple(int(x) for x in args.dims.split(","))
    if len(dims) != (2 if args.kernel.startswith("attn") else 1):
        parser.error(f"--dims: {args.kernel} takes {'dqk,dv' if args.kernel.startswith('attn') else 'D'}")
    jobs = [(args.kernel, args.dtype, args.mode, dims, t, int(a)) for t in tiles for a in args.arch.split(",")]
    with ProcessPoolExecutor(args.workers) as pool:
        for line in pool.map(compile_tile, jobs):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
