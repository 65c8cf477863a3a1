"""Train / validation / test splits of a `SequenceDataset`.

Leave-one-out (docs/training.md, 'Evaluation protocol'; used when `ds.split is None`): for every
user with at least 3 items, the last item is the test target (history = all earlier items), the
second last is the validation target (history = all items before it) and the training sequence
is everything before the validation item. Predefined split (KuaiRand, `ds.split` given): split-0
sequences are trained on whole; each split-1 / split-2 sequence is evaluated once, predicting its
last item from all earlier ones.

Data that leaves nothing to train on or to evaluate is refused (ValueError naming the data set,
how many sequences were dropped and why) instead of training on nothing and reporting metrics
over zero users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .dataset import SequenceDataset, gather_ranges

__all__ = ["EvalSet", "Splits", "split_dataset"]


@dataclass
class EvalSet:
    """Held-out next items, one row per evaluated sequence.

    indptr (n + 1,) int64, items (h,) int64: the histories in CSR, chronological (history i is
        items[indptr[i]:indptr[i + 1]], never empty).
    domains (h,) int64 or None: the domain of each history item.
    target (n,) int64: the held-out next item of each row.
    target_domain (n,) int64 or None: its domain.
    users (n,) int64 or None: the index of each row's sequence in the source data set.
    """

    indptr: np.ndarray
    items: np.ndarray
    domains: Optional[np.ndarray]
    target: np.ndarray
    target_domain: Optional[np.ndarray]
    users: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = len(self.target)
        if len(self.indptr) != n + 1 or self.indptr[0] != 0 or self.indptr[-1] != len(self.items):
            raise ValueError(f"EvalSet: indptr must have {n + 1} entries from 0 to len(items) = {len(self.items)}")
        if (self.domains is None) != (self.target_domain is None):
            raise ValueError("EvalSet: domains and target_domain must both be given or both be None")
        if self.domains is not None and len(self.domains) != len(self.items):
            raise ValueError("EvalSet: domains and items differ in length")
        if self.target_domain is not None and len(self.target_domain) != n:
            raise ValueError("EvalSet: target_domain and target differ in length")

    def __len__(self) -> int:
        return len(self.target)

    def lengths(self) -> np.ndarray:
        """(n,) int64: the history length of every row."""
        return np.diff(self.indptr)

    def history(self, i: int) -> np.ndarray:
        """(len_i,) int64: the history of row i, oldest first."""
        return self.items[self.indptr[i]:self.indptr[i + 1]]


@dataclass
class Splits:
    """train: the training sequences (next-item at every position; each has >= 2 items).
    valid / test: the evaluation rows.
    skipped_eval: sequences evaluated nowhere because they are too short (leave-one-out: fewer
        than 3 items; predefined split: a valid/test sequence with fewer than 2 items).
    dropped_train: sequences with no training sequence of >= 2 items (leave-one-out: fewer than
        4 items; predefined: split-0 sequences of length < 2).
    """

    train: SequenceDataset
    valid: EvalSet
    test: EvalSet
    skipped_eval: int = 0
    dropped_train: int = 0

    def summary(self) -> str:
        return (f"train {self.train.num_users:,} sequences / {self.train.num_interactions:,} items, "
                f"valid {len(self.valid):,}, test {len(self.test):,}"
                f" (skipped {self.skipped_eval:,} short sequences from evaluation, "
                f"{self.dropped_train:,} from training)")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _eval_set(ds: SequenceDataset, users: np.ndarray, target_pos: np.ndarray) -> EvalSet:
    """Rows predicting items[target_pos[i]] from everything before it in sequence users[i]."""
    starts = ds.indptr[users]
    indptr, items = gather_ranges(ds.items, starts, target_pos)
    domains = None if ds.domains is None else gather_ranges(ds.domains, starts, target_pos)[1]
    target_domain = None if ds.domains is None else ds.domains[target_pos]
    return EvalSet(indptr=indptr, items=items, domains=domains, target=ds.items[target_pos],
                   target_domain=target_domain, users=users)


def split_dataset(ds: SequenceDataset) -> Splits:
    """Split `ds` for training and evaluation (see the module docstring for both protocols).

    Train sequences keep the data set's features, domains and mappings; their `split` is None.
    Sequences too short for a split are counted in `Splits.skipped_eval` / `dropped_train`.
    Raises ValueError when the training, validation or test part would be empty.
    """
    lengths = ds.lengths()
    ends = ds.indptr[1:]
    where = f"data set {ds.name!r}"
    if ds.split is None:
        evaluated = np.flatnonzero(lengths >= 3)
        train_users = np.flatnonzero(lengths >= 4)  # items[:-2] keeps >= 2 items
        longest = int(lengths.max()) if len(lengths) else 0
        if not len(evaluated):
            raise ValueError(f"{where}: no user has the 3 interactions leave-one-out needs (a history item, "
                             f"the validation and the test target): {_count(ds.num_users, 'user')}, all "
                             f"dropped (longest sequence: {longest})")
        if not len(train_users):
            raise ValueError(f"{where}: no user has the 4 interactions leave-one-out training needs (2 to "
                             f"train on, the validation and the test target): {_count(ds.num_users, 'user')}, all "
                             f"dropped from training (longest sequence: {longest})")
        train = ds.select(train_users, ends=ends[train_users] - 2)
        valid = _eval_set(ds, evaluated, ends[evaluated] - 2)
        test = _eval_set(ds, evaluated, ends[evaluated] - 1)
        return Splits(train=train, valid=valid, test=test, skipped_eval=int(ds.num_users - len(evaluated)),
                      dropped_train=int(ds.num_users - len(train_users)))
    split = ds.split
    train_users = np.flatnonzero((split == 0) & (lengths >= 2))
    valid_users = np.flatnonzero((split == 1) & (lengths >= 2))
    test_users = np.flatnonzero((split == 2) & (lengths >= 2))
    for name, users, code in (("training", train_users, 0), ("evaluation", valid_users, 1),
                              ("testing", test_users, 2)):
        if not len(users):
            total = int(np.count_nonzero(split == code))
            why = (f"{_count(total, name + ' sequence')}, none with the 2 items a split sequence needs"
                   if total else f"no sequence is marked {name!r}, {_count(ds.num_users, 'sequence')} in all")
            raise ValueError(f"{where}: the predefined {name} split is empty ({why})")
    return Splits(train=ds.select(train_users),
                  valid=_eval_set(ds, valid_users, ends[valid_users] - 1),
                  test=_eval_set(ds, test_users, ends[test_users] - 1),
                  skipped_eval=int(np.count_nonzero((split != 0) & (lengths < 2))),
                  dropped_train=int(np.count_nonzero((split == 0) & (lengths < 2))))
