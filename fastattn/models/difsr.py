"""DIF-SR (Xie et al., SIGIR 2022): side information fused inside attention, not added to the input.

Architecture (the official AIM-SE/DIF-SR `SASRecD`), for a left-padded batch items (B, L) with
attribute ids attributes[f] (B, L, A_f) (multi-valued, 0 = padding)::

    x_0   = Dropout(LayerNorm(E[items]))                   no position embedding in the input
    p     = P[pos]                                         (B, L, D); pos counts from the first real item
    a_f   = Σ_{v in attributes[f], v != 0} A_f[v]          (B, L, attribute_dim): sum pooling per feature
    x_l   = FFN_l(DIFAttention_l(x_{l-1}, p, (a_1, …)))    post-LN blocks, causal + key padding mask

where each DIFAttention scores item, position and every attribute stream per head
(head dims hidden/heads and attribute_dim/heads), fuses them ("sum": added inside one softmax on
the fused kernel; "concat"/"gate": mixed by a learned layer on the torch path, see
`fastattn.nn.DIFAttention`), divides by sqrt(hidden/heads), masks, softmaxes and applies
attention dropout; values come from the item stream only. Output tied to E (num_items+1, D).

Loss over the valid positions n (input item and next item present), x_n the final hidden state::

    ce   = mean_n [ logsumexp_j x_n·E_j − x_n·E_{y_n} ]                   (full softmax, fused kernel)
    aap  = Σ_f mean_{n, v=1..V_f-1} BCEWithLogits(W_f x_n + b_f, multi-hot_f(y_n))_v
    loss = ce + aap_weight · aap

multi-hot_f(y_n) is the attribute set of the NEXT item (batch.target_attributes[f]); value 0
(padding) is excluded from both the head and the labels. As in the official code each feature's
BCE is a mean over positions and values and the features are summed (one λ for all features).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..data.batch import EvalBatch, TrainBatch
from ..nn import FUSIONS
from .base import SequentialRecommender
from .blocks import (check_choice, check_int, check_items, check_range, flat_targets, full_softmax_loss, init_weights,
                     masked_mean, positions_from_padding, sum_pool)
from .config import EncoderConfig, catalog_field, check_config, option
from .encoder import EmbeddingBlock, TransformerStack
from .spec import SMALL, ModelSpec


@dataclass(kw_only=True)
class DIFSRConfig(EncoderConfig):
    """DIF-SR options: the `EncoderConfig` fields (small CPU recipe: hidden 64, 2 layers, 2 heads,
    inner 256, dropout 0.5, max_len 50; attn_dropout 0.3 as in the paper) plus

    attribute_sizes: vocabulary size of each item feature, padding id 0 included (ids 1..size-1);
        None until the data set is known.
    attribute_dim: width of every attribute embedding (must be divisible by heads).
    fusion: "sum" (fused kernel) | "concat" | "gate" (torch path; see `fastattn.nn.DIFAttention`).
    aap_weight: λ of the attribute-prediction loss (the paper uses 5–10; 0 disables it).
    """

    attribute_sizes: Optional[tuple[int, ...]] = catalog_field()
    attribute_dim: int = option(16, "attribute embedding size")
    fusion: str = option("sum", "sum (fused kernel) | concat | gate (reference path)")
    aap_weight: float = option(5.0, "weight lambda of the attribute-prediction (AAP) loss")
    attn_dropout: float = option(0.3, "attention-probability dropout")

    def validate(self) -> None:
        super().validate()
        if self.attribute_sizes is not None:
            self._validate_attribute_sizes()
        check_int("attribute_dim", self.attribute_dim)
        if self.attribute_dim % self.heads != 0:
            raise ValueError(f"attribute_dim ({self.attribute_dim}) must be divisible by heads ({self.heads})")
        check_choice("fusion", self.fusion, FUSIONS)
        if (isinstance(self.aap_weight, bool) or not isinstance(self.aap_weight, (int, float))
                or not (math.isfinite(self.aap_weight) and self.aap_weight >= 0)):
            raise ValueError(f"aap_weight must be a finite float >= 0, got {self.aap_weight!r}")

    def _validate_attribute_sizes(self) -> None:
        sizes = self.attribute_sizes
        if isinstance(sizes, (int, str)) or not isinstance(sizes, Sequence):
            raise ValueError(f"attribute_sizes must be a tuple of ints (one per feature), got {sizes!r}")
        self.attribute_sizes = tuple(sizes)
        if not self.attribute_sizes:
            raise ValueError("attribute_sizes must name at least one item feature (DIF-SR needs attributes)")
        for f, size in enumerate(self.attribute_sizes):
            check_int(f"attribute_sizes[{f}]", size, minimum=2)


class DIFSR(SequentialRecommender, EmbeddingBlock):
    """DIF-SR on fastattn kernels; see the module docstring for the math.

    losses(TrainBatch) → {"loss", "ce", "aap"}; user_vectors(EvalBatch) → (B, D) hidden state at
    column L-1; item_table() → (item embedding (num_items+1, D), None). Batches must carry one
    attribute tensor per `attribute_sizes` entry (and target_attributes for the AAP loss).
    """

    def __init__(self, config: DIFSRConfig) -> None:
        super().__init__()
        self.config = check_config(config, DIFSRConfig)
        sizes = config.attribute_sizes
        assert sizes is not None  # check_config: catalog fields are set

        def attribute_tables() -> None:  # after the position table, as in the checkpoints' parameter order
            self.attribute_embeddings = torch.nn.ModuleList(
                torch.nn.Embedding(size, config.attribute_dim, padding_idx=0) for size in sizes)

        self.build_embedding(config, before_norm=attribute_tables)
        self.layers = TransformerStack(config, config.layers, (config.attribute_dim,) * len(sizes),
                                       use_position=True, fusion=config.fusion)
        # One logit per attribute value 1..size-1 (padding value 0 has no output).
        self.attribute_heads = torch.nn.ModuleList(
            torch.nn.Linear(config.hidden, size - 1) for size in sizes)
        init_weights(self, config.init_std)

    def _check_attributes(self, attributes: Sequence[torch.Tensor], items: torch.Tensor, name: str) -> None:
        sizes = self.config.attribute_sizes
        if len(attributes) == 0:
            raise ValueError(f"DIFSR needs item attributes but batch.{name} is empty "
                             f"(expected {len(sizes)} tensors, one per attribute_sizes entry)")
        if len(attributes) != len(sizes):
            raise ValueError(f"batch.{name} holds {len(attributes)} tensors but the model has "
                             f"{len(sizes)} features (attribute_sizes={sizes})")
        for f, (ids, size) in enumerate(zip(attributes, sizes)):
            if (not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 3
                    or ids.shape[:2] != items.shape):
                raise ValueError(f"batch.{name}[{f}] must be an int64 tensor of shape "
                                 f"(B, L, A) = ({items.shape[0]}, {items.shape[1]}, A), got "
                                 f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
            check_range(ids, 0, size, f"batch.{name}[{f}] holds ids outside [0, {size}) (attribute_sizes[{f}]={size})")

    def encode(self, items: torch.Tensor, attributes: Sequence[torch.Tensor]) -> torch.Tensor:
        """items (B, L) left padded, attributes[f] (B, L, A_f) → hidden states (B, L, D)."""
        padding = items == 0
        x = self.normalize_input(self.embed_items(items, position=False))
        position = self.position_embedding(positions_from_padding(padding))
        pooled = [sum_pool(emb.weight, ids) for emb, ids in zip(self.attribute_embeddings, attributes)]
        return self.layers(x, padding, position=position, attributes=pooled)

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        self._check_attributes(batch.attributes, batch.items, "attributes")
        hidden = self.encode(batch.items, batch.attributes)
        rows = hidden.reshape(-1, hidden.shape[-1])  # every position; those without a target are masked
        targets = flat_targets(batch)
        ce = full_softmax_loss(rows, targets, self.item_embedding.weight, self.config.backend)
        if self.config.aap_weight == 0:
            aap = ce.new_zeros(())
        else:
            self._check_attributes(batch.target_attributes, batch.items, "target_attributes")
            aap = self.attribute_loss(rows, [t.reshape(rows.shape[0], -1) for t in batch.target_attributes],
                                      targets != 0)
        return {"loss": ce + self.config.aap_weight * aap, "ce": ce, "aap": aap}

    def attribute_loss(self, rows: torch.Tensor, target_ids: Sequence[torch.Tensor],
                       valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """AAP: Σ_f mean BCE-with-logits of head_f(rows) (N, V_f-1) against the multi-hot of
        target_ids[f] (N, A_f) (value 0 = padding, excluded), the mean over the rows where valid
        (N,) bool is True (all rows when None; others contribute exactly 0) and the values. No row gives 0."""
        total = rows.sum() * 0.0
        if rows.shape[0] == 0:
            return total
        for head, ids, size in zip(self.attribute_heads, target_ids, self.config.attribute_sizes):
            labels = rows.new_zeros(rows.shape[0], size)
            labels.scatter_(1, ids, 1.0)  # padding ids land in column 0, dropped below
            per_row = torch.nn.functional.binary_cross_entropy_with_logits(
                head(rows), labels[:, 1:], reduction="none").mean(dim=1)
            total = total + (per_row.mean() if valid is None else masked_mean(per_row, valid))
        return total

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        self._check_attributes(batch.attributes, batch.items, "attributes")
        return self.encode(batch.items, batch.attributes)[:, -1]

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.item_embedding.weight, None


SPEC = ModelSpec(
    name="difsr", config_cls=DIFSRConfig, model_cls=DIFSR, needs_attributes=True,
    presets={
        # attribute dim 16 and lambda 5 (chosen on Beauty's validation split from {5, 10})
        "small": {**SMALL, "attribute_dim": 16, "aap_weight": 5.0, "fusion": "sum"},
        # the official AIM-SE/DIF-SR configs/Amazon_Beauty.yaml, fusion kept at "sum" so it runs on the
        # fused kernel (the official file uses "gate", available with --fusion gate)
        "paper": {"hidden": 256, "layers": 4, "heads": 8, "inner": 256, "dropout": 0.5, "attn_dropout": 0.3,
                  "attribute_dim": 64, "aap_weight": 10.0, "fusion": "sum", "max_len": 50, "lr": 1e-4,
                  "batch_size": 2048, "epochs": 200},
    })
