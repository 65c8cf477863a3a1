"""Plain eager calls skip the torch.library dispatch (fastattn/ops/eager.py) and give exactly
what the operators give; traced and transformed calls keep the operators."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import fastattn
from fastattn.ops import eager

from backend_params import KERNEL_BACKENDS


def _attention(backend: str, dropout: bool = False) -> Callable[[], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=gen, requires_grad=True) for _ in range(3))
    qa, ka = (torch.randn(2, 2, 9, 4, generator=gen, requires_grad=True) for _ in range(2))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :3] = True
    domains = torch.randint(0, 2, (2, 9), generator=gen)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(1)  # the dropout seed is drawn from the default generator
        out, acd = fastattn.dif_attention(q, k, v, (qa,), (ka,), causal=True, key_padding_mask=mask,
                                          dropout_p=0.2 if dropout else 0.0, domains=domains, backend=backend)
        grads = torch.autograd.grad((out.square().sum() + acd.sum()), (q, k, v, qa, ka))
        return [out, acd, *grads]
    return run


def _cross_entropy(backend: str) -> Callable[[], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=gen, requires_grad=True)
    w = torch.randn(29, 8, generator=gen, requires_grad=True)
    t = torch.randint(0, 29, (13,), generator=gen)
    t[2] = -100

    def run() -> list[torch.Tensor]:
        loss = fastattn.full_item_cross_entropy(h, w, t, label_smoothing=0.1, backend=backend)
        return [loss, *torch.autograd.grad(loss, (h, w))]
    return run


CASES = {"attention": _attention, "attention-dropout": lambda b: _attention(b, dropout=True),
         "cross_entropy": _cross_entropy}


def _check_twin(run: Callable[[], list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run()
    monkeypatch.setattr(eager, "_get_current_dispatch_mode", lambda: object())  # as if traced: the operator
    via_operator = run()
    assert len(fast) == len(via_operator)
    for a, b in zip(fast, via_operator):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_twin_equals_the_operator(backend: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_twin(CASES[case](backend), monkeypatch)


def test_eager_twin_equals_the_operator_chunked_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cross-entropy's "torch" backend is an operator too (attention's is the reference, none).
    _check_twin(_cross_entropy("torch"), monkeypatch)


# The Python-registered operators (torch.library.custom_op / triton_op), whose dispatch is what
# the eager twins skip; the C++ kernels' own operators (fastattn::attn_fwd, ce_lse, …) dispatch in
# C++ and stay.
PYTHON_OPERATORS = {f"fastattn::{name}{suffix}" for name in ("dif_attention", "full_item_cross_entropy")
                    for suffix in ("", "_backward", "_triton", "_triton_backward", "_streams", "_streams_backward")}


def _op_events(fn: Callable[[], object]) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()} & PYTHON_OPERATORS


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_plain_eager_calls_skip_the_operator_dispatch(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _op_events(_attention(backend))
    assert not _op_events(_cross_entropy(backend))
    monkeypatch.setattr(eager, "_get_current_dispatch_mode", lambda: object())
    assert _op_events(_attention(backend)) and _op_events(_cross_entropy(backend))  # the check can see them


def test_traced_and_wrapped_calls_keep_the_operator() -> None:
    plain = torch.ones(2)
    assert eager.eager_call_ok([plain, None, torch.nn.Parameter(plain)])
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
        assert not eager.eager_call_ok([fake])  # the mode is active
    assert not eager.eager_call_ok([fake])  # a tensor subclass
    assert not torch.func.vmap(lambda t: torch.tensor(float(eager.eager_call_ok([t]))))(torch.ones(3, 2)).any()
