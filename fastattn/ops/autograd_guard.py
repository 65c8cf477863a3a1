"""One guard for the fused backward passes, shared by every op.

The fused kernels compute first-order gradients only. Left alone, autograd would treat their
backward as a constant under `create_graph=True` and return a silent zero (or, where a few
eager ops surround the kernel, a partial) second derivative. `no_second_derivative` makes
differentiating those gradients raise instead.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on the first `n_grads` tensors; its backward raises `message`. The remaining
    inputs (anchors) only connect it to the graph."""

    @staticmethod
    def forward(ctx: Any, message: str, n_grads: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n_grads])

    @staticmethod
    def backward(ctx: Any, *_: Any) -> tuple[None, ...]:
        raise RuntimeError(ctx.message)


def no_second_derivative(grads: tuple[Optional[torch.Tensor], ...], message: str,
                         anchors: tuple[Optional[torch.Tensor], ...]) -> tuple[Optional[torch.Tensor], ...]:
    """`grads` unchanged in value, routed through a node whose backward raises RuntimeError(message).

    Call it from an autograd.Function's backward when `torch.is_grad_enabled()` (under
    create_graph=True). `anchors` are the tensors the true second derivative depends on (the
    op's inputs or saved outputs, the incoming gradient): linking the node to them makes
    `torch.autograd.grad(grad, x)` reach the error for any such x, where torch's
    `once_differentiable` reports x as unused (or, with allow_unused=True, returns None).
    """
    links = [a for a in anchors if a is not None and a.requires_grad]
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not links or not idx:  # nothing upstream requires grad: no second derivative can be asked for
        return grads
    wrapped = _RaiseOnBackward.apply(message, len(idx), *(grads[i] for i in idx), *links)
    out = list(grads)
    for i, g in zip(idx, wrapped):
        out[i] = g
    return tuple(out)
