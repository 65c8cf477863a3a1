"""What every recommender in `fastattn.models` provides to the training and evaluation loop."""
from __future__ import annotations

from typing import Optional

import torch

from ..data.batch import EvalBatch, TrainBatch


class SequentialRecommender(torch.nn.Module):
    """Base class: a model maps a left-padded history to one vector per position and scores the
    catalog by a dot product with an item table (row 0 = padding item, never recommended).

    Subclasses implement:
      - `losses(batch: TrainBatch) -> dict[str, Tensor]`: scalar tensors; key "loss" is the total
        that is minimized, other keys (e.g. "ce", "aap") are shown in the progress bar.
      - `user_vectors(batch: EvalBatch) -> Tensor (B, D)`: the representation after the last item.
      - `item_table() -> (weight (num_items + 1, D), bias (num_items + 1,) or None)`.
    """

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The traceable part of `losses` (what `torch.compile` may capture in one graph); default:
        `losses` itself. A model whose loss needs eager work (AutoCDSR's Pareto solve calls
        `torch.autograd.grad`) returns its task losses here and finishes in `combine_loss_terms`."""
        return self.losses(batch)

    def combine_loss_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """terms from `loss_terms` → the `losses` dict; run eagerly. Default: terms unchanged."""
        return terms

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError
