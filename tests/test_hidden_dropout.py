"""`fastattn.functional.dropout` / `fastattn.nn.Dropout`: the models' hidden-state dropout with the
C++ Philox keep-mask on CPU (fastattn/ops/dropout.py), torch's dropout everywhere else."""
from __future__ import annotations

import pytest
import torch

import fastattn.nn
from fastattn.functional import dropout
from fastattn.ops.attention.cpp import cpp_dropout_keep_rows
from fastattn.ops.attention.function import draw_seed

from cpp_required import cpp_tests_mark


def _expected(x: torch.Tensor, p: float, seed_state: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output, the keep mask) the Philox path gives after torch.manual_seed(seed_state)."""
    torch.manual_seed(seed_state)
    keep = cpp_dropout_keep_rows(draw_seed(), p, x.shape[-1], 0, x.numel() // x.shape[-1]).view(x.shape)
    return x * keep * (1 / (1 - p)), keep


@cpp_tests_mark()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_philox_dropout_is_the_mask_of_a_torch_seed(dtype: torch.dtype, layout: str) -> None:
    base = torch.randn(6, 13, 10, dtype=torch.float64).to(dtype)
    x = {"contiguous": base, "transposed": base.transpose(0, 2), "sliced": base[:, 2:11, ::3]}[layout]
    x = x.detach().requires_grad_()
    want, keep = _expected(x.detach(), 0.3, 7)
    torch.manual_seed(7)
    got = dropout(x, 0.3)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.detach(), want)
    grad = torch.randn_like(got)
    got.backward(grad)
    assert torch.equal(x.grad, grad * keep * (1 / (1 - 0.3)))


@cpp_tests_mark()
def test_philox_dropout_keeps_one_minus_p_and_is_reproducible() -> None:
    x = torch.ones(200, 500)
    torch.manual_seed(0)
    first = dropout(x, 0.25)
    second = dropout(x, 0.25)
    kept = (first != 0).double().mean().item()
    assert abs(kept - 0.75) < 0.01  # 1e5 draws: the binomial std is 0.0014
    assert torch.allclose(first[first != 0], torch.full((), 1 / 0.75))
    assert not torch.equal(first, second)  # a fresh seed per call
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.25), first)


def test_torch_backend_eval_and_edge_probabilities_are_torchs() -> None:
    x = torch.randn(4, 9)
    torch.manual_seed(3)
    want = torch.nn.functional.dropout(x, 0.4, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.4, backend="torch"), want)
    assert torch.equal(dropout(x, 0.4, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(torch.zeros(0, 5), 0.5).shape == (0, 5)


def test_module_form() -> None:
    layer = fastattn.nn.Dropout(0.2, backend="cpp")
    assert "backend='cpp'" in repr(layer) and layer.p == 0.2
    layer.eval()
    x = torch.randn(3, 4)
    assert torch.equal(layer(x), x)


def test_compiled_dropout_traces_without_a_graph_break() -> None:
    layer = fastattn.nn.Dropout(0.5).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(torch.ones(8, 16))
    assert set(out.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("call, match", [
    (lambda: dropout(torch.ones(2), float("nan")), "dropout: p must be a probability in"),
    (lambda: dropout(torch.ones(2), 1.5), "dropout: p must be a probability in"),
    (lambda: dropout(torch.ones(2), 0.1, backend="gpu"), "dropout: backend must be"),
    (lambda: fastattn.nn.Dropout(1.0), "p must be a float in"),
    (lambda: fastattn.nn.Dropout(0.1, backend="fast"), "backend must be one of"),
])
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
