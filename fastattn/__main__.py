"""Command line: `python -m fastattn demo` checks the fused attention against the float64 reference.

On a machine without CUDA the Triton kernels run in Triton's interpreter (slow, exact), so the
demo shows the GPU code path is correct anywhere.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


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

    results = {}
    for backend, cast in (("triton", dtype), ("torch", torch.float64)):
        xs = [t.detach().to(cast).requires_grad_(True) for t in leaves]
        start = time.perf_counter()
        out = fastattn.dif_attention(xs[0], xs[1], xs[2], xs[3:5], xs[5:7], causal=True,
                                     key_padding_mask=pad, backend=backend)
        out.float().square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[backend] = (out.detach(), [x.grad for x in xs], time.perf_counter() - start)

    (out, grads, t_fused), (ref, ref_grads, t_ref) = results["triton"], results["torch"]
    names = ["out", "dq", "dk", "dv", "d pos_q", "d attr_q", "d pos_k", "d attr_k"]
    worst = 0.0
    for name, got, want in zip(names, [out, *grads], [ref, *ref_grads]):
        err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        worst = max(worst, err)
        print(f"  {name:9s} max relative error vs float64 reference: {err:.2e}")
    timing = f"  fused fwd+bwd {t_fused * 1e3:.1f} ms, float64 reference {t_ref * 1e3:.1f} ms"
    print(timing + (" (interpreter: a correctness run, not a speed measurement; see bench/)"
                    if device.type == "cpu" else ""))
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    ok = worst <= tol
    print("OK: the fused kernels match the reference" if ok else f"FAILED: error {worst:.2e} > {tol:.0e}")
    return 0 if ok else 1


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
