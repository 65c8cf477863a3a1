"""Opt-in autotuning (fastattn/ops/autotune.py): the fixed choice by default, the fastest listed
candidate when enabled, cached per key; and every listed candidate of every Triton launcher is
correct against float64 (Triton's interpreter runs them here; their GPU resources are in the
report, bench/results/gpu-resources.md)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

import fastattn
from fastattn.ops import autotune
from fastattn.ops._common import float32_matmul_precision
from fastattn.ops.attention.triton_bwd import BackwardPlan, backward_plans, bwd_launches
from fastattn.ops.attention.triton_fwd import fwd_launch, tile_candidates
from fastattn.ops.cross_entropy.triton_backend import TritonCrossEntropyKernels
from fastattn.ops.cross_entropy.triton_fwd import ce_tile_candidates


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(autotune.ENV, raising=False)
    autotune.clear()
    yield
    autotune.clear()


def countdown_timer(times: list[float]) -> Callable[[Callable[[], None]], float]:
    """A clock that runs each candidate once and reports `times` in call order."""
    remaining = iter(times)

    def timer(run: Callable[[], None]) -> float:
        run()
        return next(remaining)
    return timer


# ------------------------------------------------------------------------------- the tuner
def test_fixed_choice_by_default() -> None:
    ran = []
    assert autotune.choose("k", ["a", "b"], ran.append, probe=torch.zeros(1)) == "a"
    assert not ran and not autotune.choices()


def test_enabled_picks_the_fastest_once_per_key() -> None:
    ran: list[str] = []
    with autotune.autotune(True, timer=countdown_timer([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])):
        assert autotune.choose("k", ["a", "b", "c"], ran.append, probe=torch.zeros(1)) == "b"
        assert autotune.choose("k", ["a", "b", "c"], ran.append, probe=torch.zeros(1)) == "b"  # cached
        assert ran == ["a", "b", "c"]
        assert autotune.choose("other", ["a", "b", "c"], ran.append, probe=torch.zeros(1)) == "b"
    assert autotune.choices() == {"k": "b", "other": "b"}
    # The cache outlives the block: a tuned key keeps its choice (torch.compile traces reuse it).
    assert autotune.choose("k", ["a", "b", "c"], ran.append, probe=torch.zeros(1)) == "b"


def test_ties_keep_the_fixed_choice() -> None:
    with autotune.autotune(True, timer=countdown_timer([1.0, 1.0])):
        assert autotune.choose("k", ["a", "b"], lambda c: None, probe=torch.zeros(1)) == "a"


def test_candidates_the_gpu_cannot_hold_are_skipped() -> None:
    def run(candidate: str) -> None:
        if candidate != "b":
            raise OutOfResources(200_000, 101_376, "shared memory")

    with autotune.autotune(True, timer=lambda f: (f(), 1.0)[1]):
        assert autotune.choose("k", ["a", "b", "c"], run, probe=torch.zeros(1)) == "b"
        with pytest.raises(RuntimeError, match="no candidate of other fits"):
            autotune.choose("other", ["a", "c"], run, probe=torch.zeros(1))


def test_other_errors_propagate() -> None:
    def run(candidate: str) -> None:
        raise ValueError("a real bug")

    with autotune.autotune(True, timer=lambda f: (f(), 1.0)[1]), pytest.raises(ValueError, match="real bug"):
        autotune.choose("k", ["a", "b"], run, probe=torch.zeros(1))


def test_nothing_is_timed_on_meta_or_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    ran: list[str] = []
    with autotune.autotune(True, timer=countdown_timer([2.0, 1.0])):
        assert autotune.choose("k", ["a", "b"], ran.append, probe=torch.empty(1, device="meta")) == "a"
        with FakeTensorMode():
            fake = torch.empty(3)
        assert autotune.choose("k", ["a", "b"], ran.append, probe=fake) == "a"
    assert not ran and not autotune.choices()


def test_cpu_tensors_are_not_timed_without_a_replacement_clock() -> None:
    with autotune.autotune(True):  # the default clock times CUDA events
        assert autotune.choose("k", ["a", "b"], lambda c: None, probe=torch.zeros(1)) == "a"


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV, "1")
    assert autotune.enabled()
    with autotune.autotune(False):
        assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV, "yes")
    with pytest.raises(ValueError, match=autotune.ENV):
        autotune.enabled()


def test_size_bucket() -> None:
    assert [autotune.size_bucket(n) for n in (0, 1, 2, 3, 50, 64, 65, 51_200)] == [0, 1, 2, 4, 64, 64, 128, 65_536]


# -------------------------------------------------------- every listed candidate is correct
MODES = [(torch.float32, "highest"), (torch.float32, "high"), (torch.float16, "highest")]
TOLERANCE = {("highest", torch.float32): 2e-5, ("high", torch.float32): 5e-3, ("highest", torch.float16): 5e-3}


def attention_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 70, 40, generator=g)
    k = torch.randn(2, 2, 70, 40, generator=g)
    v = torch.randn(2, 2, 70, 32, generator=g)
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[1, :5] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), pad


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor, scale: float
                        ) -> torch.Tensor:
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    s = s.masked_fill(~causal | pad[:, None, None, :], float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1)) @ v.double()


@pytest.mark.parametrize("dtype,mode", MODES)
def test_every_attention_candidate_is_correct(dtype: torch.dtype, mode: str) -> None:
    q, k, v, pad = attention_inputs(dtype)
    scale = 40 ** -0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*leaves, pad, scale)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(4))
    want_grads = torch.autograd.grad(want, leaves, dout)
    tol = TOLERANCE[(mode, dtype)]
    with float32_matmul_precision(mode):
        forwards, plans = tile_candidates(40, 32, "tf32x3" if mode == "highest" and dtype == torch.float32
                                          else "tf32"), backward_plans(q, k, v)
        assert len(forwards) > 1 and len(plans) > 2 and {p.fused for p in plans} == {True, False}
        for tiles in forwards:
            launch, out, lse, _ = fwd_launch(q, k, v, scale, True, 0.0, None, pad, None, tiles)
            launch()
            assert (out.double() - want).abs().max() <= tol * 10, tiles
        for plan in plans:
            launches, *grads = bwd_launches(q, k, v, dout.to(dtype), out, lse, None, None, scale, True, 0.0, None,
                                            pad, None, fused=plan.fused, tiles=plan.tiles)
            for launch in launches:
                launch()
            for got, ref in zip(grads, want_grads):
                assert (got.double() - ref).abs().max() <= tol * 10 * max(1.0, ref.abs().max().item()), plan


@pytest.mark.parametrize("dtype,mode", MODES)
@pytest.mark.parametrize("d", [24, 100])
def test_every_cross_entropy_candidate_is_correct(dtype: torch.dtype, mode: str, d: int) -> None:
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(150, d, generator=g).to(dtype)
    weight = (torch.randn(700, d, generator=g) * 0.2).to(dtype)
    target = torch.randint(0, 700, (150,), generator=g)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = F.cross_entropy(h64 @ w64.T, target, reduction="sum")
    want_grads = torch.autograd.grad(want, (h64, w64))
    tol = TOLERANCE[(mode, dtype)]
    with float32_matmul_precision(mode):
        precision = "tf32x3" if mode == "highest" and dtype == torch.float32 else "tf32"
        lse_tiles, bwd_tiles = ce_tile_candidates(d, precision), ce_tile_candidates(d, precision, backward=True)
        assert len(lse_tiles) > 1 and len(bwd_tiles) > 1
        # Each candidate runs through the backend, under a clock that makes it the fastest.
        for chosen in range(len(lse_tiles)):
            autotune.clear()
            with autotune.autotune(True, timer=countdown_timer([0.0 if i == chosen else 1.0
                                                                for i in range(len(lse_tiles))])):
                lse = TritonCrossEntropyKernels.lse(hidden, weight, None, 1.0)
            assert list(autotune.choices().values()) == [lse_tiles[chosen]]
            torch.testing.assert_close(lse.double(), torch.logsumexp(h64 @ w64.T, 1).detach(), rtol=tol, atol=tol * 10)
        for chosen in range(len(bwd_tiles)):
            autotune.clear()
            with autotune.autotune(True, timer=countdown_timer([0.0 if i == chosen else 1.0
                                                                for i in range(len(bwd_tiles))])):
                ones = torch.ones(150)
                dh, de, _ = TritonCrossEntropyKernels.backward(
                    hidden, weight, None, 1.0, lse, ones, torch.zeros(150), target, ones)
            assert list(autotune.choices().values()) == [bwd_tiles[chosen]]
            for got, ref in zip((dh, de), want_grads):
                assert (got.double() - ref).abs().max() <= tol * 10 * max(1.0, ref.abs().max().item()), chosen


def test_tuned_calls_through_the_public_api() -> None:
    """dif_attention / full_item_cross_entropy on the Triton backend tune every kernel they
    launch, keep one choice per key, and still give the float64 result."""
    q, k, v, pad = attention_inputs(torch.float32)
    with float32_matmul_precision("high"), autotune.autotune(True, timer=lambda f: (f(), 1.0)[1]):
        out = fastattn.dif_attention(q.requires_grad_(), k, v, key_padding_mask=pad, backend="triton")
        out.sum().backward()
        hidden = torch.randn(60, 24, requires_grad=True)
        weight = torch.randn(300, 24)
        fastattn.full_item_cross_entropy(hidden, weight, torch.randint(0, 300, (60,)), backend="triton").backward()
    assert sorted(key[0] for key in autotune.choices()) == ["attention_bwd", "attention_fwd", "ce_bwd", "ce_lse"]
    assert isinstance(next(c for key, c in autotune.choices().items() if key[0] == "attention_bwd"), BackwardPlan)
    want = attention_reference(q.detach(), k, v, pad, 40 ** -0.5)
    assert (out.detach().double() - want).abs().max() < 5e-3
