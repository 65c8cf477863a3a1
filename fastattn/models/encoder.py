"""The input embedding block and the Transformer stack every model here is built from.

`EmbeddingBlock` (a mixin for the model, or for one of its encoders) registers the item table
`item_embedding`, the learned position table `position_embedding`, the input `norm` and `dropout`
as attributes of the module itself — not as a submodule — so the state-dict keys and the order of
the parameters (which the optimizer's saved state is indexed by) stay those of the models'
checkpoints. `TransformerStack` is a `ModuleList` of `TransformerLayer`s (keys ``layers.N...``) that
runs them in order.

Conventions (`fastattn.data.batch`): item ids are LEFT padded with 0; B batch, L length, D hidden.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..distributed.embedding import ShardedItemEmbedding
from .blocks import TransformerLayer, full_softmax_loss, positions_from_padding
from .config import EncoderConfig

__all__ = ["EmbeddingBlock", "TransformerStack"]


class EmbeddingBlock(torch.nn.Module):
    """Mixin: x_0 = Dropout(LayerNorm(s · E[items] + P[pos])), pos counted from each row's first
    real item (`positions_from_padding`), E (num_items + 1, D) with row 0 = padding, P (max_len, D).

    Call `build_embedding` in `__init__`; `embed_items` gives s·E[items] (+ P[pos]), `normalize_input`
    Dropout(LayerNorm(x)), `embed` both.
    """

    def build_embedding(self, config: EncoderConfig, *, item_table: bool = True, position: bool = True,
                        before_norm: Optional[Callable[[], None]] = None) -> None:
        """Register item_embedding (with `item_table`), position_embedding (with `position`), then
        what `before_norm` registers (a model's own tables that sit there in its parameter order,
        e.g. DIF-SR's attribute tables), then norm and dropout."""
        if item_table:
            self.item_embedding = torch.nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)
        if position:
            self.position_embedding = torch.nn.Embedding(config.max_len, config.hidden)
        if before_norm is not None:
            before_norm()
        self.norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = torch.nn.Dropout(config.dropout)

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
    attributes: sequence of (B, L, Da_f), domains (B, L) or None) → x after every layer; with
    `domains`, (x, [acd (B, H, L) float32 of each layer]) (`TransformerLayer`, fusion "sum").
    """

    def __init__(self, config: EncoderConfig, count: int, attribute_dims: Sequence[int] = (),
                 use_position: bool = False, fusion: str = "sum") -> None:
        super().__init__(TransformerLayer(config, attribute_dims, use_position=use_position, fusion=fusion)
                         for _ in range(count))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor, position: Optional[torch.Tensor] = None,
                attributes: Sequence[torch.Tensor] = (), domains: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
        if domains is None:
            for layer in self:
                x = layer(x, position, attributes, key_padding_mask)
            return x
        per_layer: list[torch.Tensor] = []
        for layer in self:
            x, acd = layer(x, position, attributes, key_padding_mask, domains=domains)
            per_layer.append(acd)
        return x, per_layer
