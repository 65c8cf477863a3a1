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

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError
