"""Command line: `python -m fastattn demo` checks the fused attention against the float64 reference.

On a machine without CUDA the Triton kernels run in Triton's interpreter (slow, exact), so the
demo shows the GPU code path is correct anywhere.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the commands, after the Triton interpreter switch
    import torch


def _demo(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        # Must be set before triton is imported: kernels then run in the interpreter on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import fastattn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    b, h, length, dk, da = args.batch, args.heads, args.length, args.head_dim, args.attr_dim

    def rnd(lq: int, d: int) -> torch.Tensor:
        return torch.randn(b, h, lq, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    q, k, v = rnd(length, dk), rnd(length, dk), rnd(length, dk)
    pos_q, pos_k, attr_q, attr_k = rnd(length, dk), rnd(length, dk), rnd(length, da), rnd(length, da)
    pad = torch.zeros(b, length, dtype=torch.bool, device=device)
    pad[:, : length // 4] = True  # left padding, as in recommender batches
    leaves = [q, k, v, pos_q, attr_q, pos_k, attr_k]
    print(f"decoupled attention: B={b} H={h} L={length} item/position dim {dk}, attribute dim {da}, "
          f"causal, left padding, {dtype} on {device}"
          + (" (Triton interpreter)" if device.type == "cpu" else ""))

    fused = ["triton"] if device.type == "cuda" else ["triton", "cpp"]
    ref, ref_grads, t_ref = _run(fastattn, leaves, pad, "torch", torch.float64, device)
    names = ["out", "dq", "dk", "dv", "d pos_q", "d attr_q", "d pos_k", "d attr_k"]
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    ok = True
    for backend in fused:
        out, grads, elapsed = _run(fastattn, leaves, pad, backend, dtype, device)
        worst = max((got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
                    for got, want in zip([out, *grads], [ref, *ref_grads]))
        label = backend + (" (interpreter)" if backend == "triton" and device.type == "cpu" else "")
        print(f"  {label:22s} fwd+bwd {elapsed * 1e3:8.1f} ms   max relative error vs float64 over "
              f"{', '.join(names)}: {worst:.2e}")
        ok &= worst <= tol
    print(f"  {'torch reference (fp64)':22s} fwd+bwd {t_ref * 1e3:8.1f} ms")
    if device.type == "cpu":
        print("  (the interpreter is a correctness tool; speed is measured in bench/)")
    print("OK: the fused kernels match the reference" if ok else f"FAILED: an error exceeds {tol:.0e}")
    return 0 if ok else 1


def _run(fastattn: ModuleType, leaves: list[torch.Tensor], pad: torch.Tensor, backend: str, dtype: torch.dtype,
         device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """One forward + backward on copies of `leaves` cast to `dtype`: (out, grads, seconds)."""
    import torch

    xs = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    start = time.perf_counter()
    out = fastattn.dif_attention(xs[0], xs[1], xs[2], xs[3:5], xs[5:7], causal=True,
                                 key_padding_mask=pad, backend=backend)
    out.float().square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.detach(), [x.grad for x in xs], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fused attention forward/backward vs the float64 reference")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--heads", type=int, default=2)
    demo.add_argument("--length", type=int, default=50)
    demo.add_argument("--head-dim", type=int, default=32)
    demo.add_argument("--attr-dim", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
