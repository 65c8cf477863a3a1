"""The two schedules of the Triton attention backward (ops/attention/triton_bwd.py): the fused
one-program-per-(batch, head) pass that sequences up to FUSED_MAX_LEN take, and the split
D_i / dK,dV / dQ passes of longer ones. Most attention tests run lengths the fused schedule
takes; here the split one runs the same flag matrix against the float64 truth (by lowering
FUSED_MAX_LEN), both schedules must agree, and the launcher's choice is checked on meta tensors.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Optional

import pytest
import torch

from fastattn.ops.attention import triton_bwd

from attention_cases import (
    Case, check_acd, check_against_truth, check_dropout_own_mask, make_inputs, max_err, run_fastattn, run_reference,
    with_grad,
)

@pytest.fixture(params=["fused", "split"])
def schedule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every call in the test takes this schedule."""
    monkeypatch.setattr(triton_bwd, "FUSED_MAX_LEN", 10**9 if request.param == "fused" else 0)
    yield request.param


@pytest.mark.parametrize("causal, padding", list(itertools.product([True, False], [None, "left", "full_row"])))
def test_both_schedules_match_the_truth(schedule: str, causal: bool, padding: str) -> None:
    # Lq 66, Lk 50 cross two key and two query tiles of every class; attr streams change DQK.
    check_against_truth(Case(lq=66, lk=50 if not causal else None, causal=causal, padding=padding,
                             attr_dims=(8, 24)))


@pytest.mark.parametrize("which", ["out", "acd", "both"])
def test_both_schedules_take_the_acd_gradient(schedule: str, which: str) -> None:
    check_acd(Case(lq=66, padding="left", n_domains=2), which)


def test_both_schedules_with_dropout(schedule: str) -> None:
    check_dropout_own_mask(Case(lq=66, padding="left", dropout_p=0.2), "triton")


def test_both_schedules_in_float16(schedule: str) -> None:
    check_against_truth(Case(lq=66, dk=50, dv=24, padding="left"), torch.float16)


def test_both_schedules_with_strided_inputs(schedule: str) -> None:
    case = Case(b=2, h=3, lq=66, dk=24, attr_dims=())
    inputs = make_inputs(case)
    for key in ("q", "k", "v"):  # (B, L, H, D) storage seen as (B, H, L, D), as a projection makes it
        inputs[key] = inputs[key].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[key].is_contiguous()
    grad_out = torch.randn(2, 3, 66, 24).transpose(1, 2).contiguous().transpose(1, 2)
    out, _, grads = run_fastattn(case, with_grad(inputs), "triton", grad_out)
    ref_out, _, ref_grads = run_reference(case, inputs, grad_out)
    assert max_err(out, ref_out) < 1e-5
    assert all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


def test_schedules_agree_to_float32_rounding() -> None:
    case = Case(b=2, h=2, lq=70, padding="left", n_domains=2, dropout_p=0.1, attr_dims=(8,))
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk)
    grad_acd = torch.randn(case.b, case.h, case.lq)
    runs = []
    for limit in (10**9, 0):
        triton_bwd_limit = triton_bwd.FUSED_MAX_LEN
        triton_bwd.FUSED_MAX_LEN = limit
        try:
            torch.manual_seed(3)
            runs.append(run_fastattn(case, with_grad(inputs), "triton", grad_out, grad_acd))
        finally:
            triton_bwd.FUSED_MAX_LEN = triton_bwd_limit
    (o1, a1, g1), (o2, a2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(a1, a2)  # same forward, same dropout mask
    for x, y in zip(g1, g2):
        assert max_err(x, y) <= 1e-5 * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("lq, lk, dqk, dv, fused", [
    (1, 1, 40, 32, True), (200, 200, 40, 32, True), (256, 256, 64, 64, True), (257, 256, 40, 32, False),
    (50, 257, 40, 32, False), (8, 0, 40, 32, False), (50, 50, 65, 32, False), (50, 50, 40, 100, False)])
def test_launcher_picks_fused_up_to_the_limit(lq: int, lk: int, dqk: int, dv: int, fused: bool) -> None:
    meta = torch.device("meta")
    q = torch.empty(2, 2, lq, dqk, device=meta)
    k = torch.empty(2, 2, lk, dqk, device=meta)
    v = torch.empty(2, 2, lk, dv, device=meta)
    out = torch.empty(2, 2, lq, dv, device=meta)
    lse = torch.empty(2, 2, lq, device=meta)
    launches, *_ = triton_bwd.bwd_launches(q, k, v, out, out, lse, None, None, 0.2, True, 0.0, None, None, None)
    names = [launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__
             for launch in launches]
    if fused:
        assert names == ["_dif_attn_bwd_fused_kernel"] and launches[0].grid == (4,)
    else:
        assert names == ["_delta_kernel", "_dif_attn_bwd_dkdv_kernel", "_dif_attn_bwd_dq_kernel"]


def test_launcher_rejects_acd_without_domains() -> None:
    meta = torch.device("meta")
    q = torch.empty(1, 1, 4, 8, device=meta)
    lse = torch.empty(1, 1, 4, device=meta)
    with pytest.raises(ValueError, match="^acd and grad_acd must be given exactly when domains are$"):
        triton_bwd.bwd_launches(q, q, q, q, q, lse, lse, None, 0.2, True, 0.0, None, None, None)
    wide = torch.empty(1, 1, 4, 72, device=meta)
    with pytest.raises(ValueError, match="^the fused backward takes head dims <= 64"):
        triton_bwd.bwd_launches(wide, wide, q, q, q, lse, None, None, 0.2, True, 0.0, None, None, None, fused=True)


@pytest.mark.parametrize("dtype, mode, arch, tile", [
    (torch.bfloat16, "highest", None, (32, 32, 4, 2)), (torch.float16, "high", 80, (32, 32, 4, 2)),
    (torch.bfloat16, "highest", 86, (32, 32, 4, 2)),
    (torch.bfloat16, "highest", 90, (32, 64, 4, 2)), (torch.float16, "high", 90, (32, 64, 4, 2)),
    (torch.float32, "high", None, (16, 32, 4, 2)), (torch.float32, "highest", None, (16, 16, 4, 2)),
    (torch.float32, "high", 90, (16, 32, 4, 2)), (torch.float32, "highest", 90, (16, 16, 4, 2))])
def test_fused_tiles_follow_dtype_float32_mode_and_arch(dtype: torch.dtype, mode: str, arch: Optional[int],
                                                        tile: tuple) -> None:
    # The spill-free tiles of docs/gpu-resources.md (the resource tests compile them); sm_90's
    # 16-bit ones have 64-key blocks, for wgmma.
    from fastattn.ops._common import float32_matmul_precision, target_arch

    meta = torch.device("meta")
    q = torch.empty(2, 2, 50, 40, dtype=dtype, device=meta)
    v = torch.empty(2, 2, 50, 32, dtype=dtype, device=meta)
    lse = torch.empty(2, 2, 50, device=meta)
    with float32_matmul_precision(mode), target_arch(arch) if arch else contextlib.nullcontext():
        (launch,), *_ = triton_bwd.bwd_launches(q, q, v, v, v, lse, None, None, 0.2, True, 0.0, None, None, None)
    got = (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"], launch.num_warps, launch.num_stages)
    assert got == tile
