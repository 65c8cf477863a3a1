"""torch.compile (issue 16, item 3): the public functions and each model's forward + loss trace
into one graph (no graph break) and give the eager values and gradients.

The fused backends are torch.library operators (`fastattn::dif_attention`,
`fastattn::full_item_cross_entropy`, their `_triton` twins, and the C++ kernels' own); here
(CPU, Triton interpreted) torch.compile sees them as opaque nodes with fake kernels. Most cases use backend="aot_eager" (the AOTAutograd trace
without Inductor's slow code generation); one case runs Inductor. `loss.backward()` itself is
not traced (Dynamo breaks the graph there): the compiled forward's autograd graph runs it.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch._dynamo

import fastattn
from fastattn.data.batch import TrainBatch
from fastattn.ops.cross_entropy.targets import SoftTarget
from fastattn.ops.topk.reference import topk_reference
from cpp_required import cpp_tests_mark

from test_no_host_sync import ATTRIBUTE_SIZES, BUILDERS, COMMON, NUM_ITEMS

pytestmark = cpp_tests_mark()
RTOL = 1e-5  # float32, no dropout: the same kernels run, only the surrounding ops may be fused
# Every backend of the public functions; "triton" runs its kernels in the interpreter here (its
# operators are custom_ops there; the triton_op registration is traced in test_triton_operators.py).
FUSED_AND_TORCH = ["cpp", "triton", "torch"]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=RTOL * max(1.0, b.abs().max().item() if b.numel() else 1.0))


def _check(fn: Callable[..., Any], inputs: list[torch.Tensor], backend: str = "aot_eager") -> None:
    """explain() finds no graph break; compiled outputs and gradients equal eager."""
    torch._dynamo.reset()
    assert torch._dynamo.explain(fn)(*inputs).graph_break_count == 0
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = f(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        total = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in outs
                    if o.is_floating_point())
        total.backward()
        results.append(([o.detach() for o in outs], [x.grad for x in xs if x.requires_grad]))
    (eager_out, eager_grads), (comp_out, comp_grads) = results
    for got, want in zip(comp_out + comp_grads, eager_out + eager_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert _close(got, want)


def _streams(b: int = 2, h: int = 2, lq: int = 5, d: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(b, h, lq, d) for _ in range(3)] + [torch.randn(b, h, lq, 4), torch.randn(b, h, lq, 4)]


ATTENTION_OPTIONS = {
    "plain": dict(),
    "not_causal_scale": dict(causal=False, scale=0.3),
    "padding": dict(key_padding_mask=torch.tensor([[True, True, False, False, False], [False] * 5])),
    "domains": dict(domains=torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])),
}


@pytest.mark.parametrize("backend", FUSED_AND_TORCH)
@pytest.mark.parametrize("option", list(ATTENTION_OPTIONS))
def test_dif_attention_compiles(backend: str, option: str) -> None:
    kwargs = ATTENTION_OPTIONS[option]

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: torch.Tensor, ka: torch.Tensor) -> Any:
        return fastattn.dif_attention(q, k, v, (qa,), (ka,), backend=backend, **kwargs)

    _check(fn, _streams())


@pytest.mark.parametrize("backend", FUSED_AND_TORCH)
def test_dif_attention_dropout_compiles(backend: str) -> None:
    """Dropout traces too (the seed is a tensor draw); values differ from eager by design, so
    only the graph and the finite gradients are checked."""
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fastattn.dif_attention(q, k, v, dropout_p=0.3, backend=backend)

    torch._dynamo.reset()
    q, k, v = _streams()[:3]
    assert torch._dynamo.explain(fn)(q, k, v).graph_break_count == 0
    q.requires_grad_(True)
    torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def _catalog() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(2, 3, 8), torch.randn(11, 8), torch.randn(11)]


SOFT = SoftTarget(base=torch.tensor([1., 1., 0., 1., 1., 1.]) * (0.5 / 11), indptr=torch.tensor([0, 1, 2, 2, 3, 4, 6]),
                  indices=torch.tensor([3, 4, 5, 0, 1, 2]), values=torch.tensor([.5, .5, .5, .5, .25, .25]))
CE_OPTIONS = {
    "hard_mean": dict(),
    "hard_sum_bias_temperature": dict(bias=True, reduction="sum", temperature=0.7),
    "smoothing_none": dict(label_smoothing=0.1, reduction="none"),
    "soft": dict(target=SOFT),
}


@pytest.mark.parametrize("backend", FUSED_AND_TORCH)
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_full_item_cross_entropy_compiles(backend: str, option: str) -> None:
    kwargs = dict(CE_OPTIONS[option])
    target = kwargs.pop("target", torch.tensor([[1, -100, 3], [10, 0, 4]]))
    use_bias = kwargs.pop("bias", False)

    def fn(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return fastattn.full_item_cross_entropy(hidden, weight, target, bias=bias if use_bias else None,
                                                backend=backend, **kwargs)

    _check(fn, _catalog())


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_topk_items_compiles(backend: str) -> None:
    """Both backends trace whole (the chunked torch one has static shapes: no boolean indexing) and
    give eager's items; eager itself equals the dense reference."""
    exclude = torch.tensor([[[1, -1], [2, 3], [-1, -1]], [[0, 0], [4, 5], [6, -1]]])

    def fn(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fastattn.topk_items(hidden, weight, 3, bias=bias, exclude=exclude, backend=backend)

    torch._dynamo.reset()
    inputs = _catalog()
    assert torch._dynamo.explain(fn)(*inputs).graph_break_count == 0
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    want = fn(*inputs)
    assert torch.equal(got[1], want[1]) and _close(got[0], want[0])
    hidden, weight, bias = inputs
    ref_scores, ref_index = topk_reference(hidden.reshape(6, 8), weight, 3, bias, exclude.reshape(6, 2))
    assert torch.equal(want[1].reshape(6, 3), ref_index) and _close(want[0].reshape(6, 3).double(), ref_scores)


def test_inductor_compiles_attention_and_loss() -> None:
    """One Inductor case (the slow code generator): attention feeding the catalog loss."""
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: torch.Tensor, ka: torch.Tensor) -> torch.Tensor:
        out = fastattn.dif_attention(q, k, v, (qa,), (ka,), backend="cpp")
        return fastattn.full_item_cross_entropy(out.reshape(-1, 8), v[0, 0], torch.arange(20) % 5, backend="cpp")

    _check(fn, _streams(), backend="inductor")


def _batch(b: int, length: int) -> TrainBatch:
    g = torch.Generator().manual_seed(b * 100 + length)

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high, shape, generator=g)

    items, targets = ids(NUM_ITEMS, b, length), ids(NUM_ITEMS, b, length)
    items[0, :2] = 0
    targets[0, :2] = 0
    attributes = tuple(ids(size, b, length, width) for size, width in zip(ATTRIBUTE_SIZES, (2, 1)))
    target_attributes = tuple(ids(size, b, length, width) for size, width in zip(ATTRIBUTE_SIZES, (2, 1)))
    return TrainBatch(items=items, targets=targets, attributes=attributes, target_attributes=target_attributes,
                      domains=torch.randint(0, 2, (b, length), generator=g),
                      target_domains=torch.randint(0, 2, (b, length), generator=g))


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]({**COMMON, "backend": "auto", "dropout": 0.0, "attn_dropout": 0.0}).train()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_loss_compiles(name: str) -> None:
    """Forward + loss of each model in one graph, backend="auto" (the C++ kernels on CPU); the
    loss and every parameter gradient equal eager."""
    model = _model(name)
    batch = _batch(3, 6)

    def loss_fn(batch: TrainBatch) -> torch.Tensor:
        return model.losses(batch)["loss"]

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss_fn)(batch).graph_break_count == 0
    runs = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        torch.manual_seed(5)  # sampled negatives: the same draws in both runs
        loss = fn(batch)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = runs
    assert _close(got, want)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None) and (w is None or _close(g, w))


def test_varying_shapes_recompile_at_most_twice() -> None:
    """Three batch sizes and lengths: dynamic shapes keep the compiles to at most two."""
    model = _model("sasrec_ce")
    frames = []

    def count(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        frames.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda batch: model.losses(batch)["loss"], fullgraph=True, backend=count)
    for b, length in ((2, 4), (3, 6), (4, 7)):
        batch = _batch(b, length)
        assert _close(fn(batch).detach(), model.losses(batch)["loss"].detach())
    assert len(frames) <= 2
