"""The input embedding block and the Transformer stack every model here is built from.

`EmbeddingBlock` (a mixin for the model, or for one of its encoders) registers the item table
`item_embedding`, the learned position table `position_embedding`, the input `norm` and `dropout`
as attributes of the module itself — not as a submodule — so the state-dict keys and the order of
the parameters (which the optimizer's saved state is indexed by) stay those of the models'
checkpoints. `TransformerStack` is a `ModuleList` of `TransformerLayer`s (keys ``layers.N...``) that
runs them in order. `ClozeBlock` (a mixin on top of `EmbeddingBlock`) adds the item-loss choice
and the Cloze (masked-item) objective of the models configured by a `ClozeConfig`.

Conventions (`fastattn.data.batch`): item ids are LEFT padded with 0; B batch, L length, D hidden.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..data.batch import TrainBatch
from ..distributed.embedding import ShardedItemEmbedding
from ..nn import Dropout
from .blocks import (TransformerLayer, append_column, cloze_inputs, cloze_sequences, full_softmax_loss,
                     in_batch_softmax_loss, positions_from_padding)
from .config import ClozeConfig, EncoderConfig

__all__ = ["ClozeBlock", "EmbeddingBlock", "TransformerStack"]


class EmbeddingBlock(torch.nn.Module):
    """Mixin: x_0 = Dropout(LayerNorm(s · E[items] + P[pos])), pos counted from each row's first
    real item (`positions_from_padding`), E (num_items + 1, D) with row 0 = padding, P (max_len, D).

    Call `build_embedding` in `__init__`; `embed_items` gives s·E[items] (+ P[pos]), `normalize_input`
    Dropout(LayerNorm(x)), `embed` both.
    """

    def build_embedding(self, config: EncoderConfig, *, item_table: bool = True, position: bool = True,
                        before_norm: Optional[Callable[[], None]] = None, mask_row: bool = False) -> None:
        """Register item_embedding (with `item_table`; with `mask_row` one row more, num_items + 1, for
        the [MASK] token of a Cloze objective), position_embedding (with `position`), then what
        `before_norm` registers (a model's own tables that sit there in its parameter order, e.g.
        DIF-SR's attribute tables), then norm and dropout."""
        if item_table:
            rows = config.num_items + (2 if mask_row else 1)
            self.item_embedding = torch.nn.Embedding(rows, config.hidden, padding_idx=0)
        if position:
            self.position_embedding = torch.nn.Embedding(config.max_len, config.hidden)
        if before_norm is not None:
            before_norm()
        self.norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout, backend=config.backend)

    def embed_items(self, items: torch.Tensor, scale: float = 1.0, position: bool = True) -> torch.Tensor:
        """items (B, L) int64, left padded → scale · E[items] (+ P[pos] with `position`): (B, L, D)."""
        x = self.item_embedding(items)
        if scale != 1.0:
            x = x * scale
        if position:
            x = x + self.position_embedding(positions_from_padding(items == 0))
        return x

    def item_softmax_loss(self, rows: torch.Tensor, targets: torch.Tensor, backend: str) -> torch.Tensor:
        """Mean full-catalog cross-entropy of rows (N, D) against targets (N,) in 0..V (0 = none) on the
        item table (`blocks.full_softmax_loss`); with the table split over processes
        (`--item-shards`, a `ShardedItemEmbedding`), the same loss over every process's rows."""
        if isinstance(self.item_embedding, ShardedItemEmbedding):
            return self.item_embedding.cross_entropy(rows, targets)
        return full_softmax_loss(rows, targets, self.item_embedding.weight, backend)

    def item_weight(self) -> torch.Tensor:
        """The whole item table (V + 1, D) (gathered when it is split over processes)."""
        if isinstance(self.item_embedding, ShardedItemEmbedding):
            return self.item_embedding.full_weight()
        return self.item_embedding.weight

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """(…, D) → Dropout(LayerNorm(x))."""
        return self.dropout(self.norm(x))

    def embed(self, items: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """items (B, L) → Dropout(LayerNorm(scale · E[items] + P[pos])) (B, L, D)."""
        return self.normalize_input(self.embed_items(items, scale))


class TransformerStack(torch.nn.ModuleList):
    """`count` post-LN `TransformerLayer`s built from one config (same options for every layer).

    forward(x (B, L, D), key_padding_mask (B, L) bool True = padding, position (B, L, D) or None,
    attributes: sequence of (B, L, Da_f), domains (B, L) or None, causal: None (the layers' own
    setting: causal) or a bool for every layer) → x after every layer; with `domains`,
    (x, [acd (B, H, L) float32 of each layer]) (`TransformerLayer`, fusion "sum").
    """

    def __init__(self, config: EncoderConfig, count: int, attribute_dims: Sequence[int] = (),
                 use_position: bool = False, fusion: str = "sum") -> None:
        super().__init__(TransformerLayer(config, attribute_dims, use_position=use_position, fusion=fusion)
                         for _ in range(count))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor, position: Optional[torch.Tensor] = None,
                attributes: Sequence[torch.Tensor] = (), domains: Optional[torch.Tensor] = None,
                causal: Optional[bool] = None) -> Union[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
        if domains is None:
            for layer in self:
                x = layer(x, position, attributes, key_padding_mask, causal=causal)
            return x
        per_layer: list[torch.Tensor] = []
        for layer in self:
            x, acd = layer(x, position, attributes, key_padding_mask, domains=domains, causal=causal)
            per_layer.append(acd)
        return x, per_layer


class ClozeBlock(EmbeddingBlock):
    """Mixin for the models a `ClozeConfig` configures (BERT4Rec, AutoCDSR, AutoCDSR+): the item loss
    (`loss`, `tau`) and, for bidirectional training, the Cloze objective on an item table with a
    [MASK] row (`build_embedding(config, mask_row=True)`)::

        E (num_items + 2, D)   row 0 padding, rows 1..num_items the items, row m = num_items + 1 [MASK]
        training               (inputs, targets) = cloze_inputs(cloze_sequences(batch), m, mask_prob)
        prediction             [history, m] (`append_mask`); the state at m
        loss (`item_loss`)     over the rows with a target (0 = none), classes E[1..num_items]:
                               "ce" full softmax, "inbatch" in-batch contrastive with temperature tau
        ranking (`ranking_table`)  E[0..num_items], L2-normalised for "inbatch" (that loss is blind
                               to item norms); the [MASK] row is never a class nor ranked

    Masks come from torch's default RNG (`blocks.cloze_positions`): fresh every step, as
    reproducible as dropout (the loop seeds torch and checkpoints its state).
    """

    config: ClozeConfig

    @property
    def mask_id(self) -> int:
        """The [MASK] token's id: num_items + 1."""
        return self.config.num_items + 1

    def cloze(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, L'), targets (B, L')) int64 of one Cloze draw: inputs = the `cloze_sequences`
        of the batch with the hidden positions replaced by [MASK]; targets = the original item at the
        hidden positions, 0 elsewhere (`blocks.cloze_inputs`)."""
        return cloze_inputs(cloze_sequences(batch, self.config.max_len), self.mask_id, self.config.mask_prob)

    def append_mask(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) → [items, [MASK]] (B, L') (the oldest item dropped at max_len): the input whose
        state at the last column predicts the next item."""
        return append_column(items, torch.full_like(items[:, :1], self.mask_id), self.config.max_len)

    def item_rows(self) -> torch.Tensor:
        """Rows 0..num_items of the item table (num_items + 1, D): the table itself when it has no
        [MASK] row, else a view without it."""
        weight = self.item_embedding.weight
        rows = self.config.num_items + 1
        return weight if weight.shape[0] == rows else weight[:rows]

    def item_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The configured item loss of hidden (…, D) against targets (…) in 0..num_items (0 = no
        target: left out exactly), one row per target: "ce" = `blocks.full_softmax_loss`, "inbatch"
        = `blocks.in_batch_softmax_loss`, on `item_rows()`."""
        rows, flat = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if self.config.loss == "ce":
            return full_softmax_loss(rows, flat, self.item_rows(), self.config.backend)
        return in_batch_softmax_loss(rows, flat, self.item_rows(), self.config.tau)

    def ranking_table(self) -> torch.Tensor:
        """The (num_items + 1, D) table the catalog is ranked with: `item_rows()`, L2-normalised for
        loss="inbatch" (the cosine it trains)."""
        weight = self.item_rows()
        return torch.nn.functional.normalize(weight, dim=-1) if self.config.loss == "inbatch" else weight
