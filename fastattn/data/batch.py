"""Padded batches that models consume (the contract between `fastattn.data` and `fastattn.models`).

All sequences are LEFT padded with item id 0, so position L-1 always holds the latest item; a
batch is as long as its longest row (never more than the model's max length). Attribute ids and
domain ids are 0 at padded slots. Tensors are int64 unless stated.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class TrainBatch:
    """Next-item training rows: predict targets[b, t] after reading items[b, :t+1].

    items (B, L): input item ids, 0 = padding.
    targets (B, L): the next item at every position, 0 where there is none (padding).
    attributes: one (B, L, A_f) tensor per item feature: the attribute ids of each input item
        (multi-valued, 0-padded to A_f, the most values any item has for feature f).
    target_attributes: the same for targets (B, L, A_f), used by attribute-prediction losses.
    domains / target_domains: (B, L) domain ids of the inputs / targets, or None for single-domain data.
    """

    items: torch.Tensor
    targets: torch.Tensor
    attributes: tuple[torch.Tensor, ...] = ()
    target_attributes: tuple[torch.Tensor, ...] = ()
    domains: Optional[torch.Tensor] = None
    target_domains: Optional[torch.Tensor] = None

    @property
    def padding_mask(self) -> torch.Tensor:
        """(B, L) bool, True at padded input slots."""
        return self.items == 0

    def to(self, device: torch.device | str) -> "TrainBatch":
        return _move(self, device)


@dataclass
class EvalBatch:
    """One held-out next item per row: score the catalog after reading `items`.

    items (B, L), attributes, domains: the history as in TrainBatch (left padded).
    target (B,): the held-out item; target_domain (B,) or None.
    exclude (B, M): item ids to leave out of the ranking (the user's whole history and item 0),
        -1 in unused slots — the `exclude` format of `fastattn.topk_items`.
    """

    items: torch.Tensor
    target: torch.Tensor
    exclude: torch.Tensor
    attributes: tuple[torch.Tensor, ...] = ()
    domains: Optional[torch.Tensor] = None
    target_domain: Optional[torch.Tensor] = None

    @property
    def padding_mask(self) -> torch.Tensor:
        return self.items == 0

    def to(self, device: torch.device | str) -> "EvalBatch":
        return _move(self, device)


def _move(batch, device):  # type: ignore[no-untyped-def]
    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device, non_blocking=True)
        elif isinstance(value, tuple):
            changes[f.name] = tuple(t.to(device, non_blocking=True) for t in value)
    return replace(batch, **changes)
