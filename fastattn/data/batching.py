"""Padded mini-batches (`TrainBatch`, `EvalBatch`) cut from CSR sequences with numpy fancy indexing.

Every row is LEFT padded with 0 to the longest row of its batch (at most `max_len`), so the
latest item is always in the last column. A batch is built by one gather over the flat item
array: for row b with n_b real positions in a batch of width L, column j reads flat position
end_b - L + j (targets) when j >= L - n_b, padding otherwise.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .batch import EvalBatch, TrainBatch
from .dataset import ItemFeature, SequenceDataset
from .splits import EvalSet

__all__ = ["BATCH_UNITS", "batch_rows", "eval_batches", "num_train_batches", "prefix_sequences", "train_batches",
           "train_order"]


def _trainable(train: SequenceDataset) -> np.ndarray:
    """Indices of the sequences with at least one (input, next item) pair."""
    return np.flatnonzero(train.lengths() >= 2)


BATCH_UNITS = ("sequences", "targets", "prefixes")
BUCKET_BATCHES = 100  # "targets" batches are cut from pools this many batches long, sorted by length


def prefix_sequences(train: SequenceDataset, max_len: int) -> SequenceDataset:
    """RecBole's prefix augmentation: every (history, next item) pair of `train` as its own row.

    For a sequence s of n items and k = 2..n, the row s[max(0, k - max_len - 1):k] (the next item
    s[k-1] after at most max_len history items), rows of one sequence in order, sequences in
    order. Trained with unit="prefixes", only the last position of each row carries a target,
    so an epoch has exactly the samples of a prefix-augmented trainer (RecBole's SequentialDataset).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lengths = train.lengths()
    pairs = np.maximum(lengths - 1, 0)
    seq = np.repeat(np.arange(len(lengths), dtype=np.int64), pairs)
    # k = 2..n within each sequence: a running count restarted at every sequence
    first = np.repeat(np.cumsum(pairs) - pairs, pairs)
    k = np.arange(len(seq), dtype=np.int64) - first + 2
    ends = train.indptr[seq] + k
    starts = np.maximum(train.indptr[seq], ends - (max_len + 1))
    return train.select(seq, starts, ends)


def num_train_batches(train: SequenceDataset, batch_size: int, *, drop_last: bool = False,
                      unit: str = "sequences", max_len: Optional[int] = None, shuffle: bool = True,
                      seed: int = 0, epoch: int = 0, bucket_batches: int = BUCKET_BATCHES) -> int:
    """How many batches `train_batches` yields for the same arguments (sequences of length >= 2)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if unit in ("targets", "prefixes"):  # depends on the epoch's order: count the real partition
        return len(batch_rows(train, batch_size, max_len or 1 << 62, unit=unit, shuffle=shuffle, seed=seed,
                              epoch=epoch, drop_last=drop_last, bucket_batches=bucket_batches))
    n = len(_trainable(train))
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_rows(train: SequenceDataset, batch_size: int, max_len: int, *, unit: str = "sequences",
               shuffle: bool = True, seed: int = 0, epoch: int = 0, drop_last: bool = False,
               bucket_batches: int = BUCKET_BATCHES) -> list[np.ndarray]:
    """The sequence indices of every batch of one epoch, in order.

    unit="sequences": `batch_size` sequences per batch, in `train_order`.
    unit="prefixes": `batch_size` rows of `prefix_sequences(train, max_len)` per batch (indices
    into those rows), length-bucketed as below.
    unit="targets": about `batch_size` next-item targets per batch (a batch ends where the running
    count crosses a multiple of batch_size; a sequence is never split) — RecBole's notion of a
    training sample, so the number of optimizer steps per epoch matches a prefix-augmented trainer. Sequences are
    sorted by length within pools of `bucket_batches` batches (less padding, but a batch of long
    sequences holds few users), then the batch order is shuffled; bucket_batches=0 keeps the
    shuffled order (every batch a random set of users, more padding). All randomness comes from
    (seed, epoch).
    """
    if unit not in BATCH_UNITS:
        raise ValueError(f"unit must be one of {BATCH_UNITS}, got {unit!r}")
    if not isinstance(bucket_batches, int) or isinstance(bucket_batches, bool) or bucket_batches < 0:
        raise ValueError(f"bucket_batches must be an int >= 0, got {bucket_batches!r}")
    if unit == "prefixes":
        train = prefix_sequences(train, max_len)
    order = train_order(train, shuffle=shuffle, seed=seed, epoch=epoch)
    if unit == "sequences":
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        return [order[i:i + batch_size] for i in range(0, stop, batch_size)]
    lengths = np.minimum(train.lengths()[order] - 1, max_len)  # the bucketing key
    # what a batch counts: next-item targets, or rows (one target each) for prefixes
    counts = lengths if unit == "targets" else np.ones_like(lengths)
    mean = max(1.0, float(counts.mean())) if len(counts) else 1.0
    pool = max(1, int(bucket_batches * batch_size / mean)) if bucket_batches else max(1, len(order))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        rows, c = order[start:start + pool], counts[start:start + pool]
        if bucket_batches:
            by_length = np.argsort(lengths[start:start + pool], kind="stable")
            rows, c = rows[by_length], c[by_length]
        # a batch ends at the sequence where the running target count reaches a multiple of batch_size
        total = np.cumsum(c)
        marks = np.arange(1, -(-int(total[-1]) // batch_size) + 1, dtype=np.int64) * batch_size
        ends = np.unique(np.minimum(np.searchsorted(total, marks) + 1, len(rows)))
        starts = np.concatenate([[0], ends[:-1]])
        batches.extend(rows[a:b] for a, b in zip(starts, ends))
    if drop_last and batches:
        last = np.minimum(train.lengths()[batches[-1]] - 1, max_len)
        if int(last.sum() if unit == "targets" else len(last)) < batch_size:
            batches.pop()
    if shuffle:
        rng = np.random.default_rng([int(seed), int(epoch), 1])
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def train_order(train: SequenceDataset, *, shuffle: bool = True, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """(n,) int64: the sequences of one epoch in batch order (every sequence of length >= 2 once).

    The permutation comes from numpy's Generator seeded with (seed, epoch), so any epoch can be
    reproduced (or resumed) on its own.
    """
    order = _trainable(train)
    if shuffle:
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = order[rng.permutation(len(order))]
    return order


def _window(ends: np.ndarray, counts: np.ndarray, width: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, valid) both (B, width): column j of row b reads flat position ends[b] - shift - width + j,
    valid when j >= width - counts[b] (left padding)."""
    cols = np.arange(width, dtype=np.int64)
    valid = cols[None, :] >= (width - counts)[:, None]
    index = (ends - shift - width)[:, None] + cols[None, :]
    return np.where(valid, index, 0), valid


def _take(values: np.ndarray, index: np.ndarray, valid: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(valid, values[index], 0))


def _attributes(features: Sequence[ItemFeature], items: np.ndarray) -> tuple[torch.Tensor, ...]:
    """One (B, L, A_f) tensor per feature: the attributes of each item (row 0 = padding = all 0)."""
    return tuple(torch.from_numpy(f.values[items]) for f in features)


def train_batches(train: SequenceDataset, batch_size: int, max_len: int, *, shuffle: bool = True,
                  seed: int = 0, epoch: int = 0, drop_last: bool = False,
                  unit: str = "sequences", bucket_batches: int = BUCKET_BATCHES) -> Iterator[TrainBatch]:
    """Next-item training batches over every sequence s with len(s) >= 2, once per epoch.

    Row of sequence s: items = s[:-1][-max_len:], targets = s[1:][-max_len:], both left padded with
    0 to the longest row of the batch (L <= max_len). unit="prefixes": the rows are
    `prefix_sequences(train, max_len)` and every target but the last column's is 0 (one
    next-item sample per row, as a prefix-augmented trainer has). attributes / target_attributes hold
    feature.values[items] / [targets] (B, L, A_f) per feature of `train.features`; domains /
    target_domains (B, L) when `train.domains` is not None (0 at padding). Which sequences form
    each batch: `batch_rows` (`unit` = "sequences", "targets" or "prefixes"); drop_last drops a
    final short batch.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
    rows_of = batch_rows(train, batch_size, max_len, unit=unit, shuffle=shuffle, seed=seed, epoch=epoch,
                         drop_last=drop_last, bucket_batches=bucket_batches)
    if unit == "prefixes":
        train = prefix_sequences(train, max_len)
    lengths = train.lengths()
    for users in rows_of:
        ends = train.indptr[users + 1]
        counts = np.minimum(lengths[users] - 1, max_len)
        width = int(counts.max())
        in_index, valid = _window(ends, counts, width, shift=1)
        tgt_index = in_index + 1
        items = np.where(valid, train.items[in_index], 0)
        targets = np.where(valid, train.items[tgt_index], 0)
        has_target = valid
        if unit == "prefixes":  # all inputs stay; only the last column's target is a sample
            has_target = valid.copy()
            has_target[:, :-1] = False
            targets[:, :-1] = 0
        domains = target_domains = None
        if train.domains is not None:
            domains = _take(train.domains, in_index, valid)
            target_domains = _take(train.domains, tgt_index, has_target)
        yield TrainBatch(items=torch.from_numpy(items), targets=torch.from_numpy(targets),
                         attributes=_attributes(train.features, items),
                         target_attributes=_attributes(train.features, targets),
                         domains=domains, target_domains=target_domains)


def eval_batches(evalset: EvalSet, features: Union[Sequence[ItemFeature], SequenceDataset],
                 batch_size: int, max_len: int) -> Iterator[EvalBatch]:
    """Evaluation batches in row order (no shuffling).

    items (B, L): the last max_len history items, left padded (L = the longest row, <= max_len);
    attributes (B, L, A_f) from `features` (a data set's `.features`, or the data set itself);
    domains (B, L) and target_domain (B,) when the eval set has domains; target (B,);
    exclude (B, M): item 0 followed by the WHOLE history (not only its last max_len items), -1 in
    unused slots, M = 1 + the longest history in the batch.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
    if isinstance(features, SequenceDataset):
        features = features.features
    features = tuple(features)
    lengths = evalset.lengths()
    for start in range(0, len(evalset), batch_size):
        rows = np.arange(start, min(start + batch_size, len(evalset)), dtype=np.int64)
        ends = evalset.indptr[rows + 1]
        counts = np.minimum(lengths[rows], max_len)
        width = max(1, int(counts.max()))
        index, valid = _window(ends, counts, width, shift=0)
        items = np.where(valid, evalset.items[index], 0)
        full = lengths[rows]
        # exclude = [0, whole history..., -1 padding]: histories left aligned after the 0
        cols = np.arange(int(full.max()), dtype=np.int64)[None, :]
        in_history = cols < full[:, None]
        hist_index = np.where(in_history, evalset.indptr[rows][:, None] + cols, 0)
        exclude = np.empty((len(rows), cols.shape[1] + 1), dtype=np.int64)
        exclude[:, 0] = 0
        exclude[:, 1:] = np.where(in_history, evalset.items[hist_index], -1)
        domains: Optional[torch.Tensor] = None
        target_domain: Optional[torch.Tensor] = None
        if evalset.domains is not None:
            domains = _take(evalset.domains, index, valid)
            assert evalset.target_domain is not None
            target_domain = torch.from_numpy(np.ascontiguousarray(evalset.target_domain[rows]))
        yield EvalBatch(items=torch.from_numpy(items), target=torch.from_numpy(evalset.target[rows].copy()),
                        exclude=torch.from_numpy(exclude), attributes=_attributes(features, items),
                        domains=domains, target_domain=target_domain)
