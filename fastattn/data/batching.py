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

__all__ = ["eval_batches", "num_train_batches", "train_batches", "train_order"]


def _trainable(train: SequenceDataset) -> np.ndarray:
    """Indices of the sequences with at least one (input, next item) pair."""
    return np.flatnonzero(train.lengths() >= 2)


def num_train_batches(train: SequenceDataset, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches `train_batches` yields per epoch (sequences of length >= 2 only)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(_trainable(train))
    return n // batch_size if drop_last else -(-n // batch_size)


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
                  seed: int = 0, epoch: int = 0, drop_last: bool = False) -> Iterator[TrainBatch]:
    """Next-item training batches over every sequence s with len(s) >= 2, once per epoch.

    Row of sequence s: items = s[:-1][-max_len:], targets = s[1:][-max_len:], both left padded with
    0 to the longest row of the batch (L <= max_len). attributes / target_attributes hold
    feature.values[items] / [targets] (B, L, A_f) per feature of `train.features`; domains /
    target_domains (B, L) when `train.domains` is not None (0 at padding). The order is
    `train_order(train, shuffle=..., seed=..., epoch=...)`; drop_last drops a final short batch.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
    order = train_order(train, shuffle=shuffle, seed=seed, epoch=epoch)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    lengths = train.lengths()
    for start in range(0, stop, batch_size):
        users = order[start:start + batch_size]
        ends = train.indptr[users + 1]
        counts = np.minimum(lengths[users] - 1, max_len)
        width = int(counts.max())
        in_index, valid = _window(ends, counts, width, shift=1)
        tgt_index = in_index + 1
        items = np.where(valid, train.items[in_index], 0)
        targets = np.where(valid, train.items[tgt_index], 0)
        domains = target_domains = None
        if train.domains is not None:
            domains = _take(train.domains, in_index, valid)
            target_domains = _take(train.domains, tgt_index, valid)
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
