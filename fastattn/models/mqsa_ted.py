"""MQSA-TED: multi-query self-attention (short + long query towers) with transition-based
teacher distillation (protocol: docs/training.md, "Evaluation protocol"), on fastattn's kernels.

Architecture, for a left-padded batch items (B, T)::

    x_0 = Dropout(LayerNorm(E[items] + P[pos]))             as SASRec's "ce" recipe (no input scaling)
    s   = SASRec encoder(x_0)                               short query tower: causal, key padding mask
    q_t = mean{ s_u : t-L+1 <= u <= t, u not padding }       long query (L = long_query_len)
    l   = FFN(LayerNorm(q + Dropout(W_o · Attn(W_q q, W_k s, W_v s))))
                                                            long tower: multi-head cross attention,
                                                            causal (key u <= t), key padding mask
    h   = α · s + (1 − α) · l                               per position
    score(b, t, j) = h[b, t] · E[j]                         tied to the item table E

Choice for the long tower: one cross-attention block with its own projections (W_q, W_k, W_v,
W_o), residual to the long query, post-LN, and its own feed-forward sublayer — a
TransformerLayer whose queries differ from its keys/values. Attention runs on
`fastattn.dif_attention` (q = projected long queries, k/v = projected short-tower states).
Because the scores are linear in h with a tied table, mixing the representations equals mixing
the two towers' logits α·short + (1−α)·long.

Losses over the valid positions (input item and next item present):

- ce = mean_n [logsumexp_j h_n·E_j − h_n·E_{y_n}] (full softmax, `full_softmax_loss`).
- kd (TED): for the input item i_n at each valid position, the teacher row
  t_i = softmax_j((c(i→j) / max_j c(i→j)) / τ) from next-item transition counts of the training
  sequences (`ted_teacher`, a base weight + CSR part, never items×items), the student
  softmax_j(e_i·E_j / τ); kd = mean_n CE(t_{i_n}, student_n) by `full_item_cross_entropy` with
  a `SoftTarget` and temperature τ. Items with no observed successor get the uniform teacher.
- loss = ce + kd_weight · kd (kd_weight = 0 disables distillation; kd is then reported as 0).

The teacher is set once with `set_teacher(train_sequences)`; it is a plain attribute (not in the
state dict), moved to the batch's device on use.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..data.batch import EvalBatch, TrainBatch
from ..data.dataset import SequenceDataset
from ..functional import SoftTarget, dif_attention, full_item_cross_entropy
from ..nn import Dropout
from .base import SequentialRecommender
from .blocks import (FeedForward, check_finite, check_int, check_items, check_positive, flat_targets,
                     full_softmax_loss, init_weights)
from .config import EncoderConfig, check_config, option
from .encoder import EmbeddingBlock, TransformerStack
from .spec import SMALL, ModelSpec


@dataclass(kw_only=True)
class MQSATEDConfig(EncoderConfig):
    """MQSA-TED options: the `EncoderConfig` fields plus

    long_query_len: L, the long query at position t averages the short-tower states of the last
        L valid positions up to t (>= 1).
    alpha: weight of the short tower, h = α·short + (1−α)·long, in [0, 1].
    tau: temperature τ > 0 of the TED teacher and student softmaxes.
    kd_weight: λ_kd >= 0, weight of the distillation loss (0 disables it; no teacher needed).
    """

    long_query_len: int = option(3, "positions averaged into the long query")
    alpha: float = option(0.5, "weight of the short tower (1 - alpha: long tower)")
    tau: float = option(0.1, "distillation temperature")
    kd_weight: float = option(0.1, "weight of the TED distillation loss")

    def validate(self) -> None:
        super().validate()
        check_int("long_query_len", self.long_query_len)
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a float in [0, 1], got {self.alpha!r}")
        check_positive("tau", self.tau)
        check_finite("kd_weight", self.kd_weight, minimum=0.0)


class LongQueryAttention(torch.nn.Module):
    """The long-query tower: multi-head cross attention (queries ≠ keys/values), causal with a key
    padding mask, on `fastattn.dif_attention`, then residual + LayerNorm and a feed-forward sublayer.

    forward(query (B, T, D), states (B, T, D), key_padding_mask (B, T) bool) → (B, T, D).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.attn_dropout = config.attn_dropout
        self.backend = config.backend
        self.query = torch.nn.Linear(config.hidden, config.hidden)
        self.key = torch.nn.Linear(config.hidden, config.hidden)
        self.value = torch.nn.Linear(config.hidden, config.hidden)
        self.dense = torch.nn.Linear(config.hidden, config.hidden)
        self.dropout = Dropout(config.dropout, backend=config.backend)
        self.norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config.hidden, config.inner, config.dropout, config.layer_norm_eps,
                                        config.backend)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, states: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(query)), self.split(self.key(states)), self.split(self.value(states))
        out = dif_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                            dropout_p=self.attn_dropout if self.training else 0.0, backend=self.backend)
        out = out.transpose(1, 2).reshape(query.shape)
        return self.feed_forward(self.norm(query + self.dropout(self.dense(out))))


def long_queries(states: torch.Tensor, padding: torch.Tensor, length: int) -> torch.Tensor:
    """Mean of the states of the last `length` non-padded positions up to each t.

    states (B, T, D), padding (B, T) bool (True = padding) → (B, T, D); q_t = mean of s_u over
    t-length+1 <= u <= t with u not padding (fewer when the row has fewer items so far; with left
    padding these are exactly the last `length` valid positions); 0 at a position with none.
    """
    keep = (~padding).to(states.dtype).unsqueeze(-1)
    masked = states * keep
    total = torch.zeros_like(states)
    count = torch.zeros_like(keep)
    steps = states.shape[1]
    for shift in range(min(length, steps)):
        if shift == 0:
            total = total + masked
            count = count + keep
        else:
            total = total + torch.nn.functional.pad(masked[:, :-shift], (0, 0, shift, 0))
            count = count + torch.nn.functional.pad(keep[:, :-shift], (0, 0, shift, 0))
    return total / count.clamp_min(1.0)


def _sequences_of(sequences: Any) -> Iterable[Sequence[int]]:
    """A `SequenceDataset`-like CSR object (indptr, items), an (indptr, items) pair, or an iterable
    of item-id sequences → an iterable of 1-D int64 arrays."""
    if hasattr(sequences, "indptr") and hasattr(sequences, "items") and not callable(sequences.items):
        indptr, items = np.asarray(sequences.indptr, np.int64), np.asarray(sequences.items, np.int64)
        return [items[indptr[u]:indptr[u + 1]] for u in range(len(indptr) - 1)]
    return [np.asarray(torch.as_tensor(s).cpu() if isinstance(s, torch.Tensor) else s, dtype=np.int64).reshape(-1)
            for s in sequences]


class MQSATED(SequentialRecommender, EmbeddingBlock):
    """MQSA-TED on fastattn kernels; see the module docstring for the math.

    set_teacher(train_sequences) must be called before `losses` when kd_weight > 0.
    losses(TrainBatch) → {"loss", "ce", "kd"}; user_vectors(EvalBatch) → (B, D) mixed
    representation at column T-1; item_table() → (item embedding (num_items+1, D), None).
    """

    def __init__(self, config: MQSATEDConfig) -> None:
        super().__init__()
        self.config = check_config(config, MQSATEDConfig)
        # Short tower: the same module names as SASRec, so a SASRec state dict loads into it.
        self.build_embedding(config)
        self.layers = TransformerStack(config, config.layers)
        self.long_attention = LongQueryAttention(config)
        init_weights(self, config.init_std)
        self.teacher: Optional[SoftTarget] = None
        self._teacher_width: Optional[tuple[SoftTarget, int]] = None  # (teacher, its max_row_nnz)

    def set_teacher(self, sequences: Union[Any, Iterable[Sequence[int]]]) -> SoftTarget:
        """Build the TED teacher from the TRAINING sequences (item ids 1..num_items, 0 = padding,
        pairs touching padding skipped): a `SequenceDataset`-like object with `indptr` / `items`
        (CSR), or an iterable of 1-D sequences (lists, arrays, tensors). Row i-1 / column j-1 of
        the returned `SoftTarget` is item i → item j (the catalog without the padding item);
        returned and kept as `self.teacher`."""
        shifted = [seq - 1 for seq in _sequences_of(sequences)]  # padding 0 → -1, skipped as pad_id
        for seq in shifted:
            if seq.size and (int(seq.min()) < -1 or int(seq.max()) >= self.config.num_items):
                raise ValueError(f"teacher sequences hold item ids outside [0, {self.config.num_items}]")
        self.teacher = ted_teacher(shifted, self.config.num_items, self.config.tau, pad_id=-1)
        self._teacher_width = (self.teacher, self.teacher.max_row_nnz())  # on the CPU: no device sync
        return self.teacher

    def encode_short(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) → short-tower (SASRec) states (B, T, D)."""
        return self.layers(self.embed(items), items == 0)

    def encode_towers(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """items (B, T) → (short (B, T, D), long (B, T, D)) tower outputs."""
        padding = items == 0
        short = self.encode_short(items)
        query = long_queries(short, padding, self.config.long_query_len)
        return short, self.long_attention(query, short, padding)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) int64, left padded → mixed representation α·short + (1−α)·long (B, T, D)."""
        short, long = self.encode_towers(items)
        alpha = self.config.alpha
        return alpha * short + (1.0 - alpha) * long

    def kd_loss(self, items: torch.Tensor) -> torch.Tensor:
        """Mean over the input items (N,) in 1..num_items of CE(teacher row, softmax(e_i·Eᵀ/τ)); an
        entry 0 means "no row" and is left out (exactly 0 to the loss and its gradients). The teacher
        rows are gathered at a fixed width (`SoftTarget.rows(width=...)`), so no value is read on
        the host."""
        teacher, width = self._teacher_on(items.device)
        weight = self.item_embedding.weight
        if items.numel() == 0:
            return weight.sum() * 0.0
        keep = items != 0
        rows = teacher.rows((items - 1).clamp_min(0), width=width)
        target = SoftTarget(torch.where(keep, rows.base, 0.0), rows.indptr, rows.indices,
                            torch.where(keep[:, None], rows.values.view(items.shape[0], width), 0.0).reshape(-1))
        return full_item_cross_entropy(weight[items], weight[1:], target, temperature=self.config.tau,
                                       backend=self.config.backend)

    def _teacher_on(self, device: torch.device) -> tuple[SoftTarget, int]:
        """(the teacher on `device`, its `max_row_nnz`): the width is read once per teacher (at
        `set_teacher`, or on first use of a teacher assigned directly), never per step."""
        if self.teacher is None:
            raise ValueError("MQSATED needs a teacher when kd_weight > 0: call model.set_teacher(train_sequences) "
                             "before training (or set kd_weight=0)")
        if self._teacher_width is None or self._teacher_width[0] is not self.teacher:
            self._teacher_width = (self.teacher, self.teacher.max_row_nnz())
        width = self._teacher_width[1]
        if self.teacher.base.device != device:
            self.teacher = self.teacher.to(device)
            self._teacher_width = (self.teacher, width)
        return self.teacher, width

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        if self.config.kd_weight > 0 and self.teacher is None:
            raise ValueError("MQSATED needs a teacher when kd_weight > 0: call model.set_teacher(train_sequences) "
                             "before training (or set kd_weight=0)")
        hidden = self.encode(batch.items)
        targets = flat_targets(batch)  # every position; those without a target are masked (0)
        weight = self.item_embedding.weight
        ce = full_softmax_loss(hidden.reshape(-1, hidden.shape[-1]), targets, weight, self.config.backend)
        if self.config.kd_weight > 0:
            kd = self.kd_loss(torch.where(targets != 0, batch.items.reshape(-1), 0))
            loss = ce + self.config.kd_weight * kd
        else:
            kd = ce.detach() * 0.0
            loss = ce
        return {"loss": loss, "ce": ce, "kd": kd}

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        return self.encode(batch.items)[:, -1]

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.item_embedding.weight, None


def ted_teacher(sequences: Iterable[Sequence[int]], num_items: int, tau: float = 0.1,
                pad_id: int | None = 0) -> SoftTarget:
    """MQSA-TED's transition teacher as a `SoftTarget` with one row per item, never V×V.

    From next-item transition counts c(i→j) over the sequences (pairs touching `pad_id` are
    skipped), each row is max-normalized r_ij = c_ij / max_j c_ij and the teacher is
    softmax_j(r_ij / τ) over all `num_items` items: unobserved items have r = 0. Shifted by the
    row max m_i (1 on a row with successors, else 0) so that no exp overflows for small τ:

        u_i = exp(−m_i/τ),  Z_i = (V − nnz_i)·u_i + Σ_observed exp((r_ij − m_i)/τ),
        t_ij = base_i + sparse_ij,  base_i = u_i / Z_i,  sparse_ij = (exp((r_ij − m_i)/τ) − u_i) / Z_i.

    For small τ, u_i (and so base_i) may underflow to 0: the teacher is then exactly 0 off the
    most frequent successors. Items with no observed successor get the uniform distribution
    (base = 1/V). `sequences`: iterables of item ids in [0, num_items); tau: a positive finite float.
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite float, got {tau!r}")
    src_parts, dst_parts = [], []
    for seq in sequences:
        arr = np.asarray(seq, dtype=np.int64)
        if arr.size >= 2:
            src_parts.append(arr[:-1])
            dst_parts.append(arr[1:])
    src = np.concatenate(src_parts) if src_parts else np.zeros(0, np.int64)
    dst = np.concatenate(dst_parts) if dst_parts else np.zeros(0, np.int64)
    if pad_id is not None:
        keep = (src != pad_id) & (dst != pad_id)
        src, dst = src[keep], dst[keep]
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= num_items):
        raise ValueError(f"sequences hold item ids outside [0, {num_items})")
    # Unique (src, dst) pairs with counts, sorted by src then dst: that is already CSR order.
    pairs, counts = np.unique(src * num_items + dst, return_counts=True)
    rows, cols = pairs // num_items, pairs % num_items
    row_max = np.zeros(num_items, np.float64)
    np.maximum.at(row_max, rows, counts)
    ratio = counts / row_max[rows]  # in (0, 1], exactly 1 at each row's most frequent successor
    nnz_per_row = np.bincount(rows, minlength=num_items)
    shift = (nnz_per_row > 0).astype(np.float64)  # m_i = max_j r_ij (unobserved items have r = 0)
    lifted = np.exp((ratio - 1.0) / tau)  # in (0, 1]: never overflows
    unobserved = np.exp(-shift / tau)  # u_i; underflows to 0 for small τ, legitimately
    z = (num_items - nnz_per_row) * unobserved + np.bincount(rows, weights=lifted, minlength=num_items)
    indptr = np.zeros(num_items + 1, np.int64)
    np.cumsum(nnz_per_row, out=indptr[1:])
    return SoftTarget(
        base=torch.from_numpy(unobserved / z).float(),
        indptr=torch.from_numpy(indptr),
        indices=torch.from_numpy(cols.astype(np.int64)),
        values=torch.from_numpy((lifted - unobserved[rows]) / z[rows]).float(),
    )


def _prepare(model: MQSATED, train: SequenceDataset) -> None:
    if model.config.kd_weight > 0:  # the sparse transition teacher of the training split
        model.set_teacher(train)


SPEC = ModelSpec(
    name="mqsa_ted", config_cls=MQSATEDConfig, model_cls=MQSATED, prepare=_prepare,
    presets={
        "small": {**SMALL, "long_query_len": 3, "alpha": 0.5, "tau": 0.1, "kd_weight": 0.1},
        # the official code (zhuty16/MQSA-TED, main.py defaults and its README command for Beauty):
        # num_factor 64, num_block 1, num_head 1, feed-forward width = num_factor, dropout_rate 0.5 (also
        # on the attention probabilities), L 3, alpha 0.5, tau 0.1, lambda_kd 0.1, max_len 50, lr 1e-3,
        # l2_reg 1e-4 (an L2 term in the loss, i.e. Adam's coupled weight decay), batches of 256 user
        # sequences, 200 epochs
        "paper": {"hidden": 64, "layers": 1, "heads": 1, "inner": 64, "dropout": 0.5, "attn_dropout": 0.5,
                  "long_query_len": 3, "alpha": 0.5, "tau": 0.1, "kd_weight": 0.1, "max_len": 50, "lr": 1e-3,
                  "weight_decay": 1e-4, "batch_size": 256, "batch_unit": "sequences", "epochs": 200},
    })
