"""`Dropout`: `torch.nn.Dropout` with the C++ Philox mask on CPU (`fastattn.functional.dropout`)."""
from __future__ import annotations

import torch

from ..functional import dropout
from .checks import check_choice, check_probability


class Dropout(torch.nn.Dropout):
    """`torch.nn.Dropout(p)` whose training-mode mask on CPU tensors comes from the attention
    kernels' Philox generator when backend is "auto" or "cpp" (see `fastattn.functional.dropout`);
    identical to torch's in eval mode and with backend "torch". Input (*), output (*), any float dtype."""

    def __init__(self, p: float = 0.5, backend: str = "auto") -> None:
        check_probability("p", p)
        check_choice("backend", backend, ("auto", "triton", "cpp", "torch"))
        super().__init__(p)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, backend={self.backend!r}"
