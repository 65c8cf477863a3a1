"""Host overhead of one call: tiny inputs, so the time is the Python / dispatch path, not the math.

At recommender sizes on a GPU the host path sets the time (docs/gpu-results.md: the attention
forward at B 128, L 200 costs the same 0.3 ms from L 50 to 512). This suite times the public
functions on inputs too small to matter (attention B 2, H 1, L 4, Dk 8 + 4; cross-entropy
N 16, V 32, D 8), fwd+bwd, on the device's fused backend:

- eager: a plain call, which takes the operators' autograd.Function twins (fastattn/ops/eager.py);
- operator: the same call through the torch.library operators (what traced code runs), forced
  by pretending a dispatch mode is active;
- torch: SDPA on the concatenated streams / matmul + F.cross_entropy, the floor of a torch call.

Run: python -m fastattn.bench -k dispatch   (see bench/README.md)
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from pytest_benchmark.fixture import BenchmarkFixture

import fastattn
from fastattn.ops import eager

from _common import run_benchmark, triton_unavailable

PROVIDERS = ("eager", "operator", "torch")


def _backend(device: torch.device) -> str:
    if device.type == "cuda":
        if (reason := triton_unavailable(device)) is not None:
            pytest.skip(reason)
        return "triton"
    from fastattn.ops.cpp_extension import cpp_unavailable_reason

    if (reason := cpp_unavailable_reason()) is not None:
        pytest.skip(f"fastattn's C++ kernels are unavailable: {reason}")
    return "cpp"


def _attention(device: torch.device, backend: str, provider: str) -> tuple[Callable[[], torch.Tensor], list]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 4, 8, generator=gen).to(device).requires_grad_() for _ in range(3))
    qa, ka = (torch.randn(2, 1, 4, 4, generator=gen).to(device).requires_grad_() for _ in range(2))
    mask = torch.zeros(2, 4, dtype=torch.bool, device=device)
    if provider == "torch":
        return (lambda: F.scaled_dot_product_attention(torch.cat([q, qa], -1), torch.cat([k, ka], -1),
                                                       F.pad(v, (0, 4)), is_causal=True)), [q, k, v, qa, ka]
    return (lambda: fastattn.dif_attention(q, k, v, (qa,), (ka,), causal=True, key_padding_mask=mask,
                                           backend=backend)), [q, k, v, qa, ka]


def _cross_entropy(device: torch.device, backend: str, provider: str) -> tuple[Callable[[], torch.Tensor], list]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(16, 8, generator=gen).to(device).requires_grad_()
    w = torch.randn(32, 8, generator=gen).to(device).requires_grad_()
    t = torch.randint(0, 32, (16,), generator=gen).to(device)
    if provider == "torch":
        return (lambda: F.cross_entropy(h @ w.T, t)), [h, w]
    return (lambda: fastattn.full_item_cross_entropy(h, w, t, backend=backend)), [h, w]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["attention", "cross_entropy"])
def test_dispatch_overhead(benchmark: BenchmarkFixture, bench_device: torch.device, op: str, provider: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(bench_device)
    if provider == "operator":
        monkeypatch.setattr(eager, "_get_current_dispatch_mode", lambda: object())
    forward, leaves = (_attention if op == "attention" else _cross_entropy)(bench_device, backend, provider)
    run_benchmark(
        benchmark, mode="fwd+bwd", forward=forward, inputs=leaves, device=bench_device,
        group=f"dispatch overhead {op} fwd+bwd",
        extra_info={"op": f"dispatch_{op}", "provider": provider, "backend": backend},
    )
