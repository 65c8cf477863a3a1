"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item history, tied output layer.

Architecture (RecBole's SASRec), for a left-padded batch items (B, L)::

    x_0 = Dropout(LayerNorm(s · E[items] + P[pos]))         s = sqrt(hidden) for loss="bce", else 1
    x_l = FFN_l(MHA_l(x_{l-1}))                              post-LN blocks, causal + key padding mask
    score(b, t, j) = x_L[b, t] · E[j]                        output tied to the item table E (num_items+1, D)

pos counts from each row's first real item (`positions_from_padding`), so left padding never
shifts positions. Attention runs on `fastattn.dif_attention` (no extra streams).

Two recipes (`SASRecConfig.loss`), over the valid positions (input item and next item present):

- "ce" (RecBole): full softmax over all items, mean_n [logsumexp_j x_n·E_j − x_n·E_{y_n}],
  by `fastattn.full_item_cross_entropy` on the gathered valid rows (never N×V logits).
- "bce" (the paper): one negative item z_n per position, uniform over the items ≠ y_n,
  mean_n [−log σ(x_n·E_{y_n}) − log(1 − σ(x_n·E_{z_n}))]; negatives come from torch's RNG
  (`blocks.sample_negatives`: one draw, no redraw loop).
- "inbatch" (the AutoCDSR code's loss): each position against the next items of the whole batch,
  L2-normalised, temperature tau, same-item columns left out (`blocks.in_batch_softmax_loss`);
  `item_table()` then returns the L2-normalised table (the similarity it trains).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.batch import EvalBatch, TrainBatch
from .base import SequentialRecommender
from .blocks import (check_choice, check_items, check_positive, flat_targets,
                     in_batch_softmax_loss, init_weights, masked_mean, sample_negatives)
from .config import EncoderConfig, check_config, option
from .encoder import EmbeddingBlock, TransformerStack
from .spec import SMALL, ModelSpec

LOSSES = ("ce", "bce", "inbatch")


@dataclass(kw_only=True)
class SASRecConfig(EncoderConfig):
    """SASRec options: the `EncoderConfig` fields (defaults = RecBole's small CPU recipe: hidden 64,
    2 layers, 2 heads, inner 256, dropout 0.5, attn_dropout 0.5, max_len 50) plus

    loss: "ce" (full-softmax cross-entropy) | "bce" (original recipe: sqrt(hidden)-scaled
    embeddings, BCE with one sampled negative; needs num_items >= 2) | "inbatch" (in-batch
    contrastive). tau: temperature > 0 of "inbatch".
    """

    loss: str = option("ce", "ce (full softmax) | bce (sasrec's original: one sampled negative) | "
                             "inbatch (in-batch contrastive, temperature --tau)")
    # shared with MQSA-TED's --tau (one flag): the help names both meanings
    tau: float = option(0.1, "softmax temperature: of the in-batch loss (--loss inbatch; sasrec, bert4rec, "
                             "autocdsr, autocdsr_plus), of the TED distillation (mqsa_ted)")

    def validate(self) -> None:
        super().validate()
        check_choice("loss", self.loss, LOSSES)
        check_positive("tau", self.tau)
        if self.loss == "bce" and self.num_items is not None and self.num_items < 2:
            raise ValueError(f"num_items must be >= 2 for loss='bce' (a negative must differ from the target), "
                             f"got {self.num_items}")


class SASRec(SequentialRecommender, EmbeddingBlock):
    """SASRec on fastattn kernels; see the module docstring for the math.

    losses(TrainBatch) → {"loss", "ce", "bce" or "inbatch"}; user_vectors(EvalBatch) → (B, D) hidden
    state at column L-1; item_table() → (item embedding (num_items+1, D), L2-normalised for
    loss="inbatch"; None).
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = check_config(config, SASRecConfig)
        self.build_embedding(config)
        self.layers = TransformerStack(config, config.layers)
        self.input_scale = math.sqrt(config.hidden) if config.loss == "bce" else 1.0
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) int64, left padded with 0 → hidden states (B, L, D) at every position."""
        return self.layers(self.embed(items, self.input_scale), items == 0)

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        hidden = self.encode(batch.items)
        rows = hidden.reshape(-1, hidden.shape[-1])  # every position; those without a target are masked
        targets = flat_targets(batch)
        if self.config.loss == "ce":
            loss = self.item_softmax_loss(rows, targets, self.config.backend)
            return {"loss": loss, "ce": loss}
        weight = self.item_embedding.weight
        if self.config.loss == "inbatch":
            loss = in_batch_softmax_loss(rows, targets, weight, self.config.tau)
            return {"loss": loss, "inbatch": loss}
        negatives = sample_negatives(targets, self.config.num_items)
        pos_logit = (rows * weight[targets]).sum(-1)
        neg_logit = (rows * weight[negatives]).sum(-1)
        # −log σ(a) = softplus(−a), −log(1 − σ(b)) = softplus(b)
        per_row = torch.nn.functional.softplus(-pos_logit) + torch.nn.functional.softplus(neg_logit)
        loss = masked_mean(per_row, targets != 0)
        return {"loss": loss, "bce": loss}

    def sample_negatives(self, targets: torch.Tensor) -> torch.Tensor:
        """One item per target, uniform over 1..num_items without the target (`sample_negatives`)."""
        return sample_negatives(targets, self.config.num_items)

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        return self.encode(batch.items)[:, -1]

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.config.loss == "inbatch":  # that loss is blind to item norms: rank by cosine
            return torch.nn.functional.normalize(self.item_embedding.weight, dim=-1), None
        return self.item_weight(), None


SPEC = ModelSpec(
    name="sasrec", config_cls=SASRecConfig, model_cls=SASRec,
    presets={
        "small": {**SMALL, "loss": "ce"},
        # Kang & McAuley 2018, sparse data sets: hidden 50, 1 head, BCE with one sampled negative,
        # batches of 128 whole sequences, lr 1e-3, 200 epochs
        "paper": {"hidden": 50, "layers": 2, "heads": 1, "inner": 50, "dropout": 0.5, "attn_dropout": 0.5,
                  "max_len": 50, "lr": 1e-3, "batch_size": 128, "batch_unit": "sequences", "loss": "bce",
                  "epochs": 200},
    })
