"""`FullItemCrossEntropy`: the module form of `fastattn.full_item_cross_entropy`."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..functional import SoftTarget, full_item_cross_entropy


class FullItemCrossEntropy(torch.nn.Module):
    """Module form of `fastattn.full_item_cross_entropy` (same options, same math).

    forward(hidden (..., D), item_weight (V, D), target, bias=None) → loss (float32).
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, temperature: float = 1.0,
                 reduction: str = "mean", backend: str = "auto", grad_filter: float = 0.0) -> None:
        super().__init__()
        self.ignore_index, self.label_smoothing, self.temperature = ignore_index, label_smoothing, temperature
        self.reduction, self.backend, self.grad_filter = reduction, backend, grad_filter

    def forward(self, hidden: torch.Tensor, item_weight: torch.Tensor, target: Union[torch.Tensor, SoftTarget],
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return full_item_cross_entropy(
            hidden, item_weight, target, bias=bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, temperature=self.temperature,
            reduction=self.reduction, backend=self.backend, grad_filter=self.grad_filter)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"grad_filter={self.grad_filter}")
