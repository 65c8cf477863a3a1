"""Pieces shared by the Transformer recommenders: the feed-forward sublayer, a
Transformer layer on `fastattn.nn.DIFAttention`, positions of left-padded rows, attribute pooling,
RecBole-style initialization, the full-catalog softmax loss on valid positions, the in-batch
contrastive loss and the Cloze (masked-item) objective's sequences and position draw.

Conventions (`fastattn.data.batch`): item ids are LEFT padded with 0, so column L-1 is the latest
item of every row; shapes below use B (batch), L (batch length), D (hidden).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..data.batch import EvalBatch, TrainBatch
from ..functional import full_item_cross_entropy
from ..nn import DIFAttention, Dropout
from ..nn.checks import check_choice, check_int, check_positive, check_probability, check_values
from .config import BACKENDS, EncoderConfig

__all__ = [
    "BACKENDS", "EncoderConfig", "FeedForward", "TransformerLayer", "append_column", "check_choice", "check_finite",
    "check_int", "check_items", "check_positive", "check_probability", "check_range", "cloze_inputs",
    "cloze_positions", "cloze_sequences", "flat_targets", "full_softmax_loss", "in_batch_softmax_loss",
    "init_weights", "masked_mean", "positions_from_padding", "sample_negatives", "sum_pool", "valid_positions",
]


class FeedForward(torch.nn.Module):
    """Point-wise feed-forward sublayer (RecBole): LayerNorm(x + dropout(W_2 GELU(W_1 x + b_1) + b_2)).

    (B, L, D) → (B, L, D); W_1: D → inner, W_2: inner → D; GELU is the exact (erf) one.
    """

    def __init__(self, hidden: int, inner: int, dropout: float, layer_norm_eps: float, backend: str = "auto") -> None:
        super().__init__()
        self.dense_1 = torch.nn.Linear(hidden, inner)
        self.dense_2 = torch.nn.Linear(inner, hidden)
        self.dropout = Dropout(dropout, backend=backend)
        self.norm = torch.nn.LayerNorm(hidden, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense_2(torch.nn.functional.gelu(self.dense_1(x)))))


class TransformerLayer(torch.nn.Module):
    """Post-LN Transformer layer: `DIFAttention` sublayer then `FeedForward` (each with residual + LayerNorm).

    Built from an `EncoderConfig`; `attribute_dims`, `use_position` and `fusion` choose the extra
    score streams (none: plain causal multi-head self-attention, as in SASRec).
    forward(hidden (B, L, D), position (B, L, D) or None, attributes: sequence of (B, L, Da_f),
    key_padding_mask (B, L) bool True = padding) → (B, L, D). Keyword-only options: ``domains``
    (B, L) integer ids → returns (output, acd (B, H, L) float32), the cross-domain attention mass of
    each query row (fusion "sum" only, see `DIFAttention`); ``causal`` overrides causal=True.
    """

    def __init__(self, config: EncoderConfig, attribute_dims: Sequence[int] = (), use_position: bool = False,
                 fusion: str = "sum") -> None:
        super().__init__()
        self.attention = DIFAttention(
            config.hidden, config.heads, attribute_dims, fusion=fusion, attn_dropout=config.attn_dropout,
            hidden_dropout=config.dropout, layer_norm_eps=config.layer_norm_eps, backend=config.backend,
            use_position=use_position, causal=True, max_len=config.max_len)
        self.feed_forward = FeedForward(config.hidden, config.inner, config.dropout, config.layer_norm_eps,
                                        config.backend)

    def forward(self, hidden: torch.Tensor, position: Optional[torch.Tensor] = None,
                attributes: Sequence[torch.Tensor] = (), key_padding_mask: Optional[torch.Tensor] = None,
                *, domains: Optional[torch.Tensor] = None, causal: Optional[bool] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if domains is None:
            return self.feed_forward(self.attention(hidden, position, attributes, key_padding_mask, causal=causal))
        out, acd = self.attention(hidden, position, attributes, key_padding_mask, domains=domains, causal=causal)
        return self.feed_forward(out), acd


def positions_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool (True = padding) → (B, L) int64 positions: 0 at each row's first real item,
    counting up; padded slots get 0 (they are masked as keys and their outputs are never used).
    So extra left padding never shifts a row's positions."""
    return ((~padding_mask).long().cumsum(dim=1) - 1).clamp_min(0)


def sum_pool(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of the embeddings of each slot's attribute set, id 0 (padding) excluded.

    weight (V_f, Da), ids (B, L, A) int64 → (B, L, Da); a slot with no attribute gives zeros.
    One `embedding_bag` call: no (B, L, A, Da) intermediate.
    """
    b, length, width = ids.shape
    if width == 0:
        return weight.new_zeros(b, length, weight.shape[1])
    pooled = torch.nn.functional.embedding_bag(ids.reshape(-1, width), weight, mode="sum", padding_idx=0)
    return pooled.view(b, length, weight.shape[1])


def init_weights(module: torch.nn.Module, std: float) -> None:
    """RecBole initialization: Linear/Embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0);
    padding rows of embeddings (padding_idx) are zeroed again afterwards."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()


def check_finite(name: str, value: object, minimum: Optional[float] = None) -> None:
    """ValueError naming `name` unless value is a finite real number (and >= minimum when given)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (minimum is not None and value < minimum)):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite float{bound}, got {value!r}")


def check_range(ids: torch.Tensor, low: int, high: int, message: str) -> None:
    """ValueError(message) unless every id lies in [low, high) — on CPU tensors; a device-side assert
    on CUDA, nothing on meta (`fastattn.nn.checks.check_values`: a training step never syncs for it;
    the data readers and `SequenceDataset` already check every id once per data set)."""
    check_values(lambda: ((ids >= low) & (ids < high)).all(), ids.device, message)


def check_items(batch: TrainBatch | EvalBatch, num_items: int, max_len: int) -> None:
    """Clear errors for batches the model cannot read (wrong dtype/shape, too long, ids out of range;
    the id ranges as `check_range`: without a device sync)."""
    items = batch.items
    if not isinstance(items, torch.Tensor) or items.dtype != torch.int64 or items.dim() != 2:
        raise ValueError(f"batch.items must be an int64 (B, L) tensor, got "
                         f"{getattr(items, 'dtype', type(items).__name__)} {tuple(getattr(items, 'shape', ()))}")
    if items.shape[1] > max_len:
        raise ValueError(f"batch length {items.shape[1]} exceeds max_len={max_len}")
    check_range(items, 0, num_items + 1,
                f"batch.items holds ids outside [0, {num_items}] (0 = padding, num_items={num_items})")
    if isinstance(batch, TrainBatch):
        targets = batch.targets
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.shape != items.shape:
            raise ValueError(f"batch.targets must be an int64 tensor shaped like items {tuple(items.shape)}")
        check_range(targets, 0, num_items + 1, f"batch.targets holds ids outside [0, {num_items}] (0 = no target)")


def valid_positions(batch: TrainBatch) -> torch.Tensor:
    """(B, L) bool: positions that hold an input item and have a next item to predict."""
    return (batch.items != 0) & (batch.targets != 0)


def full_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor,
                      backend: str) -> torch.Tensor:
    """Mean full-catalog cross-entropy of rows hidden (N, D) against targets (N,) in 0..num_items,
    where 0 means "no target": that row is left out (exactly 0 to the loss and every gradient).

    loss = mean_n [ logsumexp_{j=1..V} (h_n·E_j) − h_n·E_{y_n} ] over the rows with y_n >= 1 (the
    padding row 0 of item_weight (V+1, D) is left out of the softmax), computed by
    `fastattn.full_item_cross_entropy` without the N×V logits. Models pass every position of the
    batch with targets 0 where `valid_positions` is False, rather than gathering the valid rows:
    a boolean-mask gather has a data-dependent size, i.e. a device sync. No row with a target
    (or N = 0) gives 0 (with a graph).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + item_weight.sum() * 0.0
    return full_item_cross_entropy(hidden, item_weight[1:], targets - 1, ignore_index=-1, backend=backend)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (N,) over mask (N,) bool, 0 when nothing is selected; unselected entries
    contribute exactly 0 (also to gradients), whatever they hold. No device sync."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


def flat_targets(batch: TrainBatch) -> torch.Tensor:
    """(B·L,) int64: each position's next item where `valid_positions` holds, else 0 (no target)."""
    return torch.where(valid_positions(batch), batch.targets, torch.zeros_like(batch.targets)).reshape(-1)


def sample_negatives(targets: torch.Tensor, num_items: int, per_target: Optional[int] = None) -> torch.Tensor:
    """Negative items for targets (N,) in 1..num_items, each uniform over 1..num_items without its
    target (num_items >= 2): (N,), or (N, per_target) independent draws when per_target is given.

    One draw per negative, no data-dependent redraw loop (so no device sync): r uniform in
    1..num_items−1, then z = r + [r >= y], a bijection from 1..num_items−1 onto the items ≠ y.
    A target of 0 (no target) gives a negative in 2..num_items. torch's default RNG on the
    targets' device.
    """
    shape = targets.shape if per_target is None else (*targets.shape, per_target)
    draws = torch.randint(1, num_items, shape, device=targets.device)
    wanted = targets if per_target is None else targets.unsqueeze(-1)
    return draws + (draws >= wanted).long()


def in_batch_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor,
                          tau: float) -> torch.Tensor:
    """In-batch contrastive loss (the AutoCDSR code's `InBatchContrastiveLoss`): each row is scored
    against the targets of the whole batch instead of the catalog.

    hidden (N, D) float, targets (N,) int64 in 0..V (0 = no target: the row is left out and its
    target is no negative), item_weight (V+1, D) (row 0 = padding); tau > 0. With
    q_n = h_n / ‖h_n‖, k_m = E_{y_m} / ‖E_{y_m}‖ and s_nm = q_n·k_m / τ::

        loss = mean_{n: y_n >= 1} [ logsumexp_{m ∈ C_n} s_nm − s_nn ],
        C_n = {n} ∪ {m : y_m >= 1, y_m ≠ y_n}

    Duplicate targets: another row m with the same target (y_m = y_n, m ≠ n) is left out of C_n
    — it is the positive, not a negative (a false negative otherwise). (The official code means
    the same but multiplies those logits by 0 instead of removing them, so each same-target
    column, the positive's own included, adds exp(0) = 1 to its denominator; we do not copy that.)
    A row whose targets are all duplicates of its own gets loss 0. Left-out rows contribute
    exactly 0 to the loss and every gradient; no left-out row reads anything (no device sync).
    Dense: O(N²) memory and O(N²·D) work for the N×N scores, fine for N up to a few thousand.
    """
    valid = targets != 0
    q = torch.nn.functional.normalize(hidden, dim=-1)
    k = torch.nn.functional.normalize(item_weight[targets], dim=-1)
    scores = q @ k.t()
    if scores.dtype not in (torch.float32, torch.float64):  # reduced precision: the softmax in float32
        scores = scores.float()
    scores = scores / tau
    eye = torch.eye(targets.shape[0], dtype=torch.bool, device=targets.device)
    # the diagonal stays in every row (also left-out ones), so no row is all -inf (no NaN gradient)
    keep = (valid.unsqueeze(0) & (targets.unsqueeze(0) != targets.unsqueeze(1))) | eye
    scores = scores.masked_fill(~keep, float("-inf"))
    per_row = torch.logsumexp(scores, dim=1) - scores.diagonal()
    return masked_mean(per_row, valid)


def cloze_positions(real: torch.Tensor, prob: float) -> torch.Tensor:
    """The positions a Cloze (masked-item) objective hides: real (B, L) bool (True = an item) →
    (B, L) bool.

    One draw u (B, L) ~ U[0, 1) from torch's default RNG on real's device: a real position is
    hidden iff u < prob (independently, probability `prob`); a row with real items of which none
    is hidden gets the one with the smallest u — uniform over its real positions, since the u are
    i.i.d. — so every non-empty row hides at least one. Padding is never hidden. No device sync
    (no data-dependent shape); the draw depends only on real's shape, never on item ids.
    """
    u = torch.rand(real.shape, device=real.device)
    hidden = (u < prob) & real
    smallest = torch.where(real, u, torch.full_like(u, 2.0)).argmin(dim=1, keepdim=True)
    fallback = torch.arange(real.shape[1], device=real.device).unsqueeze(0) == smallest
    return hidden | (fallback & real & ~hidden.any(dim=1, keepdim=True))


def append_column(seq: torch.Tensor, column: torch.Tensor, max_len: int) -> torch.Tensor:
    """[seq, column]: seq (B, L) and column (B, 1) → (B, L'), the oldest column dropped when
    L + 1 > max_len (so L' <= max_len whenever L <= max_len).

    How a Cloze model reads one column more than a batch holds — the last target in training, a
    [MASK] to predict at in evaluation — without outgrowing its position table. Left padding stays
    on the left.
    """
    out = torch.cat([seq, column], dim=1)
    return out[:, 1:] if out.shape[1] > max_len else out


def cloze_sequences(batch: TrainBatch, max_len: int) -> torch.Tensor:
    """The sequence a Cloze objective reads from a next-item batch: (B, L') int64,
    [items, targets[:, -1]] with the oldest column dropped when L + 1 > max_len (L' <= max_len).

    Left-padded rows keep their padding on the left. A row whose last target is 0 (none) gets a
    padding slot at the right end: masked as a key, never hidden, never a target. Earlier targets
    are not read (they repeat the items shifted by one; with batch unit "prefixes" they are 0).
    """
    return append_column(batch.items, batch.targets[:, -1:], max_len)


def cloze_inputs(seq: torch.Tensor, mask_id: int, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cloze draw on seq (B, L) int64 (0 = padding): (inputs, targets), both (B, L) int64.

    M = `cloze_positions`(seq != 0, prob) (torch's default RNG); inputs = seq with the positions
    of M replaced by mask_id; targets = seq on M, 0 (no target) elsewhere — so a loss over every
    position with "0 = ignored" (`full_softmax_loss`, `in_batch_softmax_loss`) reads M only.
    """
    hidden = cloze_positions(seq != 0, prob)
    inputs = torch.where(hidden, torch.full_like(seq, mask_id), seq)
    return inputs, torch.where(hidden, seq, torch.zeros_like(seq))
