"""Shared helpers of the cross-entropy and top-k tests (tests/ops/test_cross_entropy.py,
test_topk.py, and the edge and CUDA tests): random catalog cases, runs against the float64
references, soft targets, and the backend variants the per-op tests run."""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

import fastattn
from fastattn.ops import _common as chunked  # item_chunks reads CHUNK_ELEMENTS from ops/_common.py
from fastattn.ops.cross_entropy.reference import materialized_logits, naive_cross_entropy

# Backend variants: the torch backend also with tiny item chunks (many chunks per call), the C++
# kernels also with tiny blocks (7 rows x 5 items: every case spans many row blocks and item
# chunks, with ragged last ones). The Triton kernels split their loops by size alone, so small
# and large cases cover both.
TORCH_VARIANTS = ["torch", "torch-small-chunks"]
CPP_VARIANTS = ["cpp", "cpp-small-blocks"]


def select_variant(variant: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Set up `variant` (one of the lists above, or "triton") and return its backend name."""
    if variant == "torch-small-chunks":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 257 * 37)
    if variant == "cpp-small-blocks":
        monkeypatch.setenv("FASTATTN_CE_CHUNK_ROWS", "7")
        monkeypatch.setenv("FASTATTN_CE_CHUNK_ITEMS", "5")
    return variant.split("-")[0]


def make_case(n: int, v: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0,
              ignore: str = "some", with_bias: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, v, (n,), generator=gen)
    if ignore == "some":
        target[torch.rand(n, generator=gen) < 0.3] = -100
    elif ignore == "all":
        target[:] = -100
    return {
        "hidden": torch.randn(n, d, generator=gen).to(dtype),
        "weight": (torch.randn(v, d, generator=gen) / d ** 0.25).to(dtype),
        "bias": torch.randn(v, generator=gen).to(dtype) if with_bias else None,
        "target": target,
    }


def leaves(case: dict, dtype: Optional[torch.dtype] = None) -> list[Optional[torch.Tensor]]:
    return [None if case[k] is None else case[k].detach().to(dtype or case[k].dtype).requires_grad_(True)
            for k in ("hidden", "weight", "bias")]


def run(case: dict, backend: str, target: object = None, grad: Optional[torch.Tensor] = None, **kw: object
        ) -> tuple[torch.Tensor, list]:
    h, w, b = leaves(case)
    loss = fastattn.full_item_cross_entropy(h, w, case["target"] if target is None else target, bias=b,
                                            backend=backend, **kw)
    (loss * (grad if grad is not None else 1.0)).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in (h, w, b)]


def run_naive(case: dict, target: Optional[torch.Tensor] = None, grad: Optional[torch.Tensor] = None,
              dtype: torch.dtype = torch.float64, **kw: object) -> tuple[torch.Tensor, list]:
    h, w, b = leaves(case, dtype)
    loss = naive_cross_entropy(h, w, case["target"] if target is None else target, bias=b, **kw)
    (loss * (grad.to(dtype) if grad is not None else 1.0)).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in (h, w, b)]


def assert_close(got: tuple, want: tuple, tol: float = 2e-5) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert torch.isfinite(loss).all()
    assert (loss.double() - ref_loss).abs().max() <= tol * max(1.0, ref_loss.abs().max().item())
    for name, g, r in zip(("hidden", "item_weight", "bias"), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert torch.isfinite(g).all(), name
            err = (g.double() - r).abs().max().item()
            assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: {err:.2e}"



def random_soft_target(n: int, v: int, seed: int = 0, ignored_rows: tuple = ()) -> fastattn.SoftTarget:
    """Rows mixing a dense base with a few sparse entries (duplicates included), summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (n,), generator=gen)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    indices = torch.randint(0, v, (int(indptr[-1]),), generator=gen)
    raw = torch.rand(int(indptr[-1]), generator=gen, dtype=torch.float64)
    base_share = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    base_share[counts == 0] = 1.0
    row_of = torch.repeat_interleave(torch.arange(n), counts)
    row_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, row_of, raw)
    values = raw / row_sum[row_of] * (1 - base_share[row_of])
    base = base_share / v
    for r in ignored_rows:
        base[r] = 0
        values[row_of == r] = 0
    return fastattn.SoftTarget(base.float(), indptr, indices, values.float())


def dense_soft_loss(case: dict, t: torch.Tensor, dtype: torch.dtype = torch.float64, reduction: str = "mean",
                    temperature: float = 1.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, list]:
    h, w, b = leaves(case, dtype)
    logits = materialized_logits(h, w, b, temperature)
    used = t.sum(1) > 0
    t = t * (1 - label_smoothing) + used[:, None] * label_smoothing / t.shape[1]
    per_row = -(t * logits.log_softmax(-1)).sum(-1)
    loss = per_row.sum() / used.sum().clamp_min(1) if reduction == "mean" else per_row
    loss.sum().backward()
    return loss.detach(), [None if x is None else x.grad for x in (h, w, b)]


def check_topk(case: dict, k: int, with_exclude: bool, topk_fn: Callable[..., tuple]) -> None:
    """topk_fn(hidden, weight, k, bias, exclude) against torch.topk of the masked float64 logits."""
    n, v = case["hidden"].shape[0], case["weight"].shape[0]
    exclude = None
    logits = materialized_logits(case["hidden"].double(), case["weight"].double(), case["bias"].double())
    if with_exclude:
        gen = torch.Generator().manual_seed(1)
        exclude = torch.randint(-1, v, (n, 30), generator=gen)  # -1 = unused slot; duplicates too
        mask = torch.zeros(n, v, dtype=torch.bool)
        rows = torch.arange(n)[:, None].expand_as(exclude)
        mask[rows[exclude >= 0], exclude[exclude >= 0]] = True
        logits = logits.masked_fill(mask, float("-inf"))
    scores, index = topk_fn(case["hidden"], case["weight"], k, case["bias"], exclude)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64 and scores.shape == (n, k)
    ref = logits.topk(k, dim=1)
    finite = torch.isfinite(ref.values)
    assert torch.equal(index[finite], ref.indices[finite])
    assert torch.allclose(scores[finite].double(), ref.values[finite], atol=1e-4)
    assert (index[~finite] == -1).all() and torch.isinf(scores[~finite]).all()
