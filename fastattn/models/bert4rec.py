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
from .blocks import check_items, cloze_sequences, init_weights
from .config import ITEM_LOSSES, ClozeConfig, check_config
from .encoder import ClozeBlock, TransformerStack
from .spec import SMALL, ModelSpec

__all__ = ["BERT4Rec", "BERT4RecConfig", "LOSSES", "cloze_sequences"]

LOSSES = ITEM_LOSSES


@dataclass(kw_only=True)
class BERT4RecConfig(ClozeConfig):
    """BERT4Rec options: the `ClozeConfig` fields (the `EncoderConfig` ones plus

    mask_prob: probability in (0, 1) that a real position is replaced by [MASK] in training
        (at least one per sequence). loss: "ce" (full softmax over the catalog) | "inbatch"
        (in-batch contrastive, `blocks.in_batch_softmax_loss`). tau: temperature > 0 of "inbatch").
    """


class BERT4Rec(SequentialRecommender, ClozeBlock):
    """BERT4Rec on fastattn kernels; see the module docstring for the math.

    losses(TrainBatch) → {"loss", "ce" or "inbatch"}; user_vectors(EvalBatch) → (B, D) hidden
    state at an appended [MASK]; item_table() → (rows 0..num_items of the item table (num_items+1, D),
    L2-normalised for loss="inbatch"; None). `cloze(batch)` gives the masked inputs and the targets
    (`ClozeBlock`).
    """

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = check_config(config, BERT4RecConfig)
        # one row more than the other models' tables: the [MASK] token
        self.build_embedding(config, mask_row=True)
        self.layers = TransformerStack(config, config.layers)
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) int64 in 0..num_items+1 (0 = padding, num_items+1 = [MASK]) → hidden states
        (B, L, D) at every position, bidirectional (key padding mask only)."""
        return self.layers(self.embed(items), items == 0, causal=False)

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        inputs, targets = self.cloze(batch)
        # every position; unmasked ones have target 0
        loss = self.item_loss(self.encode(inputs), targets)
        return {"loss": loss, self.config.loss: loss}

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        return self.encode(self.append_mask(batch.items))[:, -1]

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.ranking_table(), None


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
