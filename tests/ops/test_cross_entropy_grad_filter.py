"""Gradient filtering of full-catalog cross-entropy (`grad_filter`, the Triton backward's tile
skip) against float64 references: what it drops, what it never drops, and its bound.

The catalog is built so the skipped tiles are known: items below POPULAR carry a large bias
(every row's probability mass and every target is there), the rest a very negative one, so
every tile of items >= POPULAR holds only probabilities far below the threshold and every tile
below holds large ones. POPULAR is a multiple of every item block the tile tables use (32, 64),
so the filtered gradient must equal the exact gradient with dz_ij zeroed for j >= POPULAR.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops.cross_entropy.reference import materialized_logits

from backend_params import KERNEL_BACKENDS

N, V, D, POPULAR = 45, 300, 24, 64
FILTER = 1e-3


def catalog(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, D, generator=g) * 0.3
    weight = torch.randn(V, D, generator=g) * 0.3
    bias = torch.where(torch.arange(V) < POPULAR, 6.0, -12.0)
    target = torch.randint(0, POPULAR, (N,), generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), target


def grads(backend: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
          **options: object) -> tuple[torch.Tensor, ...]:
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fastattn.full_item_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], reduction="sum",
                                            backend=backend, **options)
    loss.backward()
    return (loss.detach(), *(t.grad for t in leaves))


def reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
              dropped: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, ...]:
    """float64 loss and gradients of reduction "sum", with the logit gradient zeroed where `dropped` (N, V)."""
    h, w, b = (t.double() for t in (hidden, weight, bias))
    z = materialized_logits(h, w, b)
    p = torch.softmax(z, dim=1)
    onehot = torch.nn.functional.one_hot(target, V).double()
    t = (1 - label_smoothing) * onehot + label_smoothing / V
    dz = torch.where(dropped, 0.0, p - t)
    loss = (torch.logsumexp(z, 1) - (t * z).sum(1)).sum()
    return loss, dz @ w, dz.T @ h, dz.sum(0)


def assert_matches(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_filter_drops_exactly_the_negligible_tiles() -> None:
    hidden, weight, bias, target = catalog()
    unpopular = (torch.arange(V) >= POPULAR).expand(N, V)
    probs = torch.softmax(materialized_logits(hidden.double(), weight.double(), bias.double()), 1)
    assert probs[unpopular].max() < FILTER < probs[~unpopular].min()  # the premise of the case
    got = grads("triton", hidden, weight, bias, target, grad_filter=FILTER)
    assert_matches(got, reference(hidden, weight, bias, target, dropped=unpopular))
    # ... and that is not the exact gradient: the filter did skip (the bias gradient of an
    # unpopular item is exactly 0 only when its tiles were skipped).
    assert (got[3][POPULAR:] == 0).all()
    exact = grads("triton", hidden, weight, bias, target)
    assert (exact[3][POPULAR:] != 0).all()
    assert_matches(exact, reference(hidden, weight, bias, target, dropped=torch.zeros(N, V, dtype=torch.bool)))


def test_filter_stays_within_its_stated_bound() -> None:
    """full_item_cross_entropy's docstring: row i's hidden gradient moves by at most
    |g_i|·m_i·(Σ_dropped p_ij)·max_j‖E_j‖ (g = 1, m = 1 here)."""
    hidden, weight, bias, target = catalog()
    got = grads("triton", hidden, weight, bias, target, grad_filter=FILTER)
    exact = reference(hidden, weight, bias, target, dropped=torch.zeros(N, V, dtype=torch.bool))
    probs = torch.softmax(materialized_logits(hidden.double(), weight.double(), bias.double()), 1)
    bound = (probs * (probs < FILTER)).sum(1) * weight.double().norm(dim=1).max()
    moved = (got[1].double() - exact[1]).norm(dim=1)
    assert (moved <= bound + 1e-6).all()
    assert moved.max() > 0.01 * bound.max()  # the case drops something measurable


@pytest.mark.parametrize("label_smoothing", [0.1])
def test_label_smoothing_is_never_filtered(label_smoothing: float) -> None:
    """A dense base gives every item a gradient: no tile is negligible."""
    hidden, weight, bias, target = catalog()
    got = grads("triton", hidden, weight, bias, target, grad_filter=FILTER, label_smoothing=label_smoothing)
    assert_matches(got, reference(hidden, weight, bias, target, torch.zeros(N, V, dtype=torch.bool), label_smoothing))


def test_zero_filter_is_exact() -> None:
    """At 0 (the default) nothing is skipped: exact, ignored rows included."""
    hidden, weight, bias, target = catalog()
    target = torch.where(torch.arange(N) < 40, -100, target)  # the first row block is all ignored
    got = grads("triton", hidden, weight, bias, target, ignore_index=-100)
    used = target >= 0
    want = reference(hidden[used], weight, bias, target[used], torch.zeros(int(used.sum()), V, dtype=torch.bool))
    assert_matches((got[0], got[1][used], got[2], got[3]), want)
    assert (got[1][~used] == 0).all()


def test_nan_is_never_filtered() -> None:
    """A NaN probability is not "below the threshold": NaN in a used row reaches the gradients."""
    hidden, weight, bias, target = catalog()
    hidden[3, 0] = float("nan")
    got = grads("triton", hidden, weight, bias, target, grad_filter=0.5)
    assert got[1][3].isnan().all() and got[2].isnan().any() and got[3].isnan().all()


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"])
def test_other_backends_are_exact(backend: str) -> None:
    hidden, weight, bias, target = catalog()
    got = grads(backend, hidden, weight, bias, target, grad_filter=FILTER)
    assert_matches(got, reference(hidden, weight, bias, target, dropped=torch.zeros(N, V, dtype=torch.bool)))


def test_module_passes_the_filter() -> None:
    hidden, weight, bias, target = catalog()
    module = fastattn.nn.FullItemCrossEntropy(reduction="sum", backend="triton", grad_filter=FILTER)
    assert "grad_filter=0.001" in repr(module)
    h = hidden.clone().requires_grad_()
    module(h, weight, target, bias=bias).backward()
    want = reference(hidden, weight, bias, target, dropped=(torch.arange(V) >= POPULAR).expand(N, V))
    torch.testing.assert_close(h.grad.double(), want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), True, "1e-3", None])
def test_bad_filter_is_refused(bad: object) -> None:
    hidden, weight, _, target = catalog()
    with pytest.raises(ValueError, match="grad_filter"):
        fastattn.full_item_cross_entropy(hidden, weight, target, grad_filter=bad)
