"""Where a headline call's time goes on a CUDA GPU: torch.profiler tables (bench/gpu.sh runs it).

    python bench/studies/gpu_profile.py [--out FILE] [--iters N]

For each case (fastattn's Triton attention fwd+bwd at B 128, H 2, L 200, Dk 32 + 8, bf16; its
cross-entropy fwd and fwd+bwd at N 8192, V 10k and 100k, D 64, bf16; the naive loss beside
them), one warm call, then N profiled calls: the wall time per call, the number of CUDA kernel
launches per call, the GPU-busy time per call (the sum of kernel times) and the top operators
by CUDA and by CPU time. A call whose wall time is far above its GPU-busy time is bound by the
host (Python, dispatch, launches), not by the kernels: the gap says which to optimise.
The numbers are diagnostics, not benchmarks: the timed comparisons are bench/suite/bench_*.py,
whose inputs and providers this script reuses.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suite"))  # the suite's cases and helpers

import bench_attention as attn  # noqa: E402
import bench_cross_entropy as ce  # noqa: E402
from _common import make_step  # noqa: E402


def cases(device: torch.device) -> dict[str, Callable[[], None]]:
    x = attn.make_inputs(attn.AttnShape(128, attn.HEADS, 200, torch.bfloat16, device))
    triton_attn = attn.PROVIDERS["triton"]
    out = {"attention fwd+bwd B128 L200 triton": make_step("fwd+bwd", lambda: triton_attn(x), x.leaves, device),
           "attention fwd+bwd B128 L200 sdpa": make_step("fwd+bwd", lambda: attn.PROVIDERS["sdpa"](x), x.leaves,
                                                         device)}
    for items in (10_000, 100_000):
        c = ce.make_inputs(ce.CEShape(8192, items, torch.bfloat16, device))
        for provider in ("fastattn_triton", "naive"):
            fn = ce.PROVIDERS[provider]
            for mode in ("fwd", "fwd+bwd"):
                out[f"cross_entropy {mode} N8192 V{items} {provider}"] = make_step(
                    mode, lambda fn=fn, c=c: fn(c), c.leaves, device)
    return out


def profile_case(name: str, step: Callable[[], None], iters: int) -> str:
    step()  # compile, grow the allocator (make_step's steps synchronize)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    wall_ms = (time.perf_counter() - start) / iters * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / iters / 1e3  # device_time: µs
    lines = [f"## {name}",
             f"wall {wall_ms:.3f} ms/call (unprofiled), GPU busy {busy_ms:.3f} ms/call, "
             f"{len(kernels) / iters:.0f} kernels/call",
             "",
             prof.key_averages().table(sort_by="cuda_time_total", row_limit=15),
             prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the report here (default: stdout only)")
    ap.add_argument("--iters", type=int, default=20, help="profiled calls per case")
    args = ap.parse_args()
    if args.iters < 1:
        ap.error(f"--iters must be at least 1, got {args.iters}")
    if not torch.cuda.is_available():
        print("gpu_profile.py: torch sees no CUDA device; nothing to profile", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    parts = [f"# GPU profile: {torch.cuda.get_device_name(0)}, torch {torch.__version__}"]
    for name, step in cases(device).items():
        try:
            parts.append(profile_case(name, step, args.iters))
        except Exception as exc:  # one failing case must not lose the others' tables
            parts.append(f"## {name}\nfailed: {type(exc).__name__}: {exc}\n")
        print(parts[-1].split("\n")[0], parts[-1].split("\n")[1], flush=True)
    text = "\n".join(parts)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
