"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer over the item history trained
with the Cloze (masked-item) objective; tied output layer.

Architecture, for a left-padded sequence s (B, L) whose ids may include the [MASK] token
m = num_items + 1 (an extra row of the item table)::

    x_0 = Dropout(LayerNorm(E[s] + P[pos]))        E (num_items + 2, D): row 0 padding, row m [MASK]
    x_l = FFN_l(MHA_l(x_{l-1}))                     post-LN blocks, NOT causal: every query sees every
                                                    non-padding key (key padding mask only)
    score(b, t, j) = x_L[b, t] · E[j]               j = 1..num_items; the [MASK] row is never scored

pos counts from each row's first real item (`positions_from_padding`). Attention runs on
`fastattn.dif_attention` with causal=False.

Training (`losses`): the row's sequence is its inputs followed by its last target,
s = [items, targets[:, -1]] (the oldest column dropped when that is longer than max_len), so
every item of the training split can be a Cloze target. `blocks.cloze_positions` hides each real
position with probability mask_prob (at least one per row; padding never) and replaces it by
[MASK] (always [MASK]: the official code's mask_prob=1.0, no random-item replacement). Over the
hidden positions M:

- loss="ce": full softmax over the catalog, mean_{(b,t) ∈ M} [logsumexp_j x_bt·E_j − x_bt·E_{s_bt}],
  by `fastattn.full_item_cross_entropy` (`blocks.full_softmax_loss`) on every position with target
  0 outside M — the "targets 0 = ignored" form, so no boolean gather and no device sync;
- loss="inbatch": `blocks.in_batch_softmax_loss` (AutoCDSR's in-batch contrastive loss,
  L2-normalised, temperature tau) on the same rows and targets.

Masks are drawn from torch's default RNG in the loss, so they are fresh every step/epoch and as
reproducible as dropout: the training loop seeds torch once per run (and per epoch in
data-parallel runs) and saves the RNG state in its checkpoints, so a resumed run draws the masks
of the uninterrupted one.

Prediction (`user_vectors`): [MASK] appended after the history (the oldest item dropped when the
history already holds max_len items); the vector is x_L at that [MASK]. `item_table()` returns rows
0..num_items (padding + items, never the [MASK] row); with loss="inbatch" the rows are
L2-normalised, the similarity that loss trains (it is blind to item norms).

Deviations from the paper: no output projection/bias head (BERT4Rec's GELU(x W + b) E^T + b_o);
the output is the tied item table, as in this project's other models. Masks are redrawn every
step (the official code precomputes dupe_factor=10 maskings per sequence and adds last-item-only
instances); at least one mask per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..data.batch import EvalBatch, TrainBatch
from .base import SequentialRecommender
from .blocks import (check_choice, check_items, check_positive, cloze_positions, full_softmax_loss,
                     in_batch_softmax_loss, init_weights)
from .config import EncoderConfig, check_config, option
from .encoder import EmbeddingBlock, TransformerStack
from .spec import SMALL, ModelSpec

__all__ = ["BERT4Rec", "BERT4RecConfig", "LOSSES", "cloze_sequences"]

LOSSES = ("ce", "inbatch")


@dataclass(kw_only=True)
class BERT4RecConfig(EncoderConfig):
    """BERT4Rec options: the `EncoderConfig` fields plus

    mask_prob: probability in (0, 1) that a real position is replaced by [MASK] in training
        (at least one per sequence). loss: "ce" (full softmax over the catalog) | "inbatch"
        (in-batch contrastive, `blocks.in_batch_softmax_loss`). tau: temperature > 0 of "inbatch".
    """

    mask_prob: float = option(0.2, "Cloze: probability that a position is replaced by [MASK] in training")
    loss: str = option("ce", "ce (full softmax) | inbatch (in-batch contrastive, temperature --tau)")
    tau: float = option(0.1, "temperature of the in-batch loss (--loss inbatch)")

    def validate(self) -> None:
        super().validate()
        if (isinstance(self.mask_prob, bool) or not isinstance(self.mask_prob, (int, float))
                or not 0.0 < self.mask_prob < 1.0):
            raise ValueError(f"mask_prob must be a float in (0, 1), got {self.mask_prob!r}")
        check_choice("loss", self.loss, LOSSES)
        check_positive("tau", self.tau)


def cloze_sequences(batch: TrainBatch, max_len: int) -> torch.Tensor:
    """The sequence a Cloze objective reads from a next-item batch: (B, L') int64,
    [items, targets[:, -1]] with the oldest column dropped when L + 1 > max_len (L' <= max_len).

    Left-padded rows keep their padding on the left. A row whose last target is 0 (none) gets a
    padding slot at the right end: masked as a key, never hidden, never a target. Earlier targets
    are not read (they repeat the items shifted by one; with batch unit "prefixes" they are 0).
    """
    seq = torch.cat([batch.items, batch.targets[:, -1:]], dim=1)
    return seq[:, 1:] if seq.shape[1] > max_len else seq


class BERT4Rec(SequentialRecommender, EmbeddingBlock):
    """BERT4Rec on fastattn kernels; see the module docstring for the math.

    losses(TrainBatch) → {"loss", "ce" or "inbatch"}; user_vectors(EvalBatch) → (B, D) hidden
    state at an appended [MASK]; item_table() → (rows 0..num_items of the item table (num_items+1, D),
    L2-normalised for loss="inbatch"; None). `cloze(batch)` gives the masked inputs and the targets.
    """

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = check_config(config, BERT4RecConfig)
        self.mask_id = config.num_items + 1
        # one row more than the other models' tables: the [MASK] token (registered first, so the
        # parameter order is that of EmbeddingBlock's own item table)
        self.item_embedding = torch.nn.Embedding(config.num_items + 2, config.hidden, padding_idx=0)
        self.build_embedding(config, item_table=False)
        self.layers = TransformerStack(config, config.layers)
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) int64 in 0..num_items+1 (0 = padding, num_items+1 = [MASK]) → hidden states
        (B, L, D) at every position, bidirectional (key padding mask only)."""
        x = self.embed(items)
        padding = items == 0
        for layer in self.layers:
            x = layer(x, key_padding_mask=padding, causal=False)
        return x

    def cloze(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, L'), targets (B, L')) int64 of one Cloze draw (torch's RNG): inputs = the
        `cloze_sequences` with the hidden positions replaced by [MASK]; targets = the original item
        at the hidden positions, 0 elsewhere."""
        seq = cloze_sequences(batch, self.config.max_len)
        hidden = cloze_positions(seq != 0, self.config.mask_prob)
        inputs = torch.where(hidden, torch.full_like(seq, self.mask_id), seq)
        return inputs, torch.where(hidden, seq, torch.zeros_like(seq))

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        inputs, targets = self.cloze(batch)
        hidden = self.encode(inputs)
        rows = hidden.reshape(-1, hidden.shape[-1])  # every position; unmasked ones have target 0
        targets = targets.reshape(-1)
        weight = self.item_embedding.weight[: self.config.num_items + 1]  # the [MASK] row is no class
        if self.config.loss == "ce":
            loss = full_softmax_loss(rows, targets, weight, self.config.backend)
            return {"loss": loss, "ce": loss}
        loss = in_batch_softmax_loss(rows, targets, weight, self.config.tau)
        return {"loss": loss, "inbatch": loss}

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        items = batch.items
        seq = torch.cat([items, torch.full_like(items[:, :1], self.mask_id)], dim=1)
        if seq.shape[1] > self.config.max_len:
            seq = seq[:, 1:]
        return self.encode(seq)[:, -1]

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight = self.item_embedding.weight[: self.config.num_items + 1]
        if self.config.loss == "inbatch":
            weight = torch.nn.functional.normalize(weight, dim=-1)
        return weight, None


SPEC = ModelSpec(
    name="bert4rec", config_cls=BERT4RecConfig, model_cls=BERT4Rec,
    presets={
        "small": {**SMALL, "mask_prob": 0.2, "loss": "ce"},
        # Sun et al. 2019, the official ML-1m run (FeiSun/BERT4Rec run_ml-1m.sh and
        # bert_train/bert_config_ml-1m_64.json): hidden 64, 2 layers, 2 heads, inner 256, dropout 0.2
        # (hidden and attention), max length 200, masked_lm_prob 0.2, batches of 256 sequences,
        # lr 1e-4; full softmax (the Beauty run: mask 0.6, max length 50, dropout 0.5). Not here: its
        # AdamW (decay 0.01), clipping at norm 5, 100 warm-up steps and linear decay over 400k steps —
        # many epochs: Petrov & Macdonald (RecSys 2022) replicate the paper only when training to
        # convergence, so the preset runs 200 epochs (raise --patience to avoid stopping early).
        "paper": {"hidden": 64, "layers": 2, "heads": 2, "inner": 256, "dropout": 0.2, "attn_dropout": 0.2,
                  "max_len": 200, "mask_prob": 0.2, "loss": "ce", "lr": 1e-4, "batch_size": 256,
                  "batch_unit": "sequences", "epochs": 200},
    })
