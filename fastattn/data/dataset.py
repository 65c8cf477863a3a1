"""In-memory sequence data sets: one chronological item sequence per user, stored as CSR arrays.

Item ids run 1..num_items (0 is the padding item), domain ids 0..num_domains-1, and every item
feature is a 0-padded (num_items + 1, A) matrix of attribute ids (0 = no attribute). The readers
in `fastattn.data.readers` and the generator in `fastattn.data.synthetic` produce these objects.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

__all__ = ["ItemFeature", "SequenceDataset", "gather_ranges"]


def _int64_array(value: object, what: str, ndim: int) -> np.ndarray:
    """`value` as a contiguous int64 array with `ndim` dimensions (ValueError naming `what`)."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def gather_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the slices values[starts[i]:ends[i]] without a Python loop.

    values (nnz, ...), starts / ends (n,) int64 with ends >= starts. Returns (indptr (n + 1,), out)
    where out[indptr[i]:indptr[i + 1]] == values[starts[i]:ends[i]].
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts
    indptr = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    index = np.arange(indptr[-1], dtype=np.int64) + np.repeat(starts - indptr[:-1], lengths)
    return indptr, values[index]


@dataclass
class ItemFeature:
    """One multi-valued categorical item feature (e.g. categories, genres, tags).

    name: the feature's name ("attributes", "class", "category", ...).
    values (num_items + 1, A) int64: the attribute ids of each item, 0-padded on the right; row 0
        (the padding item) is all 0; A >= 1 is the most values any item has.
    num_values: vocabulary size INCLUDING the padding id 0, i.e. the embedding table size; every
        entry of `values` is in [0, num_values).
    """

    name: str
    values: np.ndarray
    num_values: int

    def __post_init__(self) -> None:
        self.values = _int64_array(self.values, f"feature {self.name!r} values", 2)
        self.num_values = int(self.num_values)
        if self.values.shape[0] < 1 or self.values.shape[1] < 1:
            raise ValueError(f"feature {self.name!r}: values must have shape (num_items + 1, A >= 1), "
                             f"got {self.values.shape}")
        if self.num_values < 1:
            raise ValueError(f"feature {self.name!r}: num_values must be >= 1 (it counts the padding id 0)")
        if self.values.size and (self.values.min() < 0 or self.values.max() >= self.num_values):
            raise ValueError(f"feature {self.name!r}: attribute ids must lie in [0, {self.num_values}), "
                             f"got [{self.values.min()}, {self.values.max()}]")
        if self.values[0].any():
            raise ValueError(f"feature {self.name!r}: row 0 (the padding item) must be all 0")

    @property
    def max_values(self) -> int:
        """A: the width of `values` (most attribute ids of one item)."""
        return int(self.values.shape[1])


@dataclass
class SequenceDataset:
    """Chronological item sequences (one per user / session) in CSR layout.

    name: a label for logs ("Beauty", "ml-100k", "synthetic", ...).
    num_items: item ids are 1..num_items; 0 is the padding item.
    indptr (U + 1,) int64: sequence u is items[indptr[u]:indptr[u + 1]].
    items (nnz,) int64: item ids, chronological within each sequence.
    domains (nnz,) int64 or None: the domain id (0..num_domains-1) of each interaction; None for
        single-domain data.
    num_domains: the number of domains (1 when `domains` is None).
    features: item features, each with num_items + 1 rows.
    split (U,) int8 or None: a predefined split per sequence (0 train, 1 valid, 2 test), as in
        KuaiRand; None means leave-one-out (see `fastattn.data.splits`).
    user_ids (U,) or None: the original user / sequence id of each sequence (ints or str tokens).
    item_ids (num_items + 1,) or None: the original id of each item when the reader remapped them
        (entry 0 is a placeholder for the padding item: -1 or "[PAD]"); None = ids kept as read.
    domain_ids (num_domains,) or None: the original domain value of each domain id when remapped.
    """

    name: str
    num_items: int
    indptr: np.ndarray
    items: np.ndarray
    domains: Optional[np.ndarray] = None
    num_domains: int = 1
    features: tuple[ItemFeature, ...] = ()
    split: Optional[np.ndarray] = None
    user_ids: Optional[np.ndarray] = None
    item_ids: Optional[np.ndarray] = None
    domain_ids: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.num_items = int(self.num_items)
        self.num_domains = int(self.num_domains)
        self.indptr = _int64_array(self.indptr, "indptr", 1)
        self.items = _int64_array(self.items, "items", 1)
        self.features = tuple(self.features)
        where = f"dataset {self.name!r}"
        if self.num_items < 1:
            raise ValueError(f"{where}: num_items must be >= 1, got {self.num_items}")
        if len(self.indptr) < 1 or self.indptr[0] != 0 or self.indptr[-1] != len(self.items):
            raise ValueError(f"{where}: indptr must start at 0 and end at len(items) = {len(self.items)}")
        if np.any(np.diff(self.indptr) < 0):
            raise ValueError(f"{where}: indptr must be non-decreasing")
        if self.items.size and (self.items.min() < 1 or self.items.max() > self.num_items):
            raise ValueError(f"{where}: item ids must lie in 1..{self.num_items}, "
                             f"got [{self.items.min()}, {self.items.max()}]")
        if self.domains is not None:
            self.domains = _int64_array(self.domains, "domains", 1)
            if self.domains.shape != self.items.shape:
                raise ValueError(f"{where}: domains has shape {self.domains.shape}, "
                                 f"items {self.items.shape}")
            if self.num_domains < 1:
                raise ValueError(f"{where}: num_domains must be >= 1")
            if self.domains.size and (self.domains.min() < 0 or self.domains.max() >= self.num_domains):
                raise ValueError(f"{where}: domain ids must lie in [0, {self.num_domains}), "
                                 f"got [{self.domains.min()}, {self.domains.max()}]")
        elif self.num_domains != 1:
            raise ValueError(f"{where}: num_domains is {self.num_domains} but domains is None")
        for feature in self.features:
            if not isinstance(feature, ItemFeature):
                raise ValueError(f"{where}: features must be ItemFeature objects, got {type(feature).__name__}")
            if feature.values.shape[0] != self.num_items + 1:
                raise ValueError(f"{where}: feature {feature.name!r} has {feature.values.shape[0]} rows, "
                                 f"expected num_items + 1 = {self.num_items + 1}")
        if len({f.name for f in self.features}) != len(self.features):
            raise ValueError(f"{where}: feature names must be unique")
        if self.split is not None:
            split = np.asarray(self.split)
            if split.shape != (self.num_users,):
                raise ValueError(f"{where}: split must have shape ({self.num_users},), got {split.shape}")
            if split.size and (not np.issubdtype(split.dtype, np.integer) or split.min() < 0 or split.max() > 2):
                raise ValueError(f"{where}: split values must be 0 (train), 1 (valid) or 2 (test)")
            self.split = np.ascontiguousarray(split, dtype=np.int8)
        if self.user_ids is not None and len(self.user_ids) != self.num_users:
            raise ValueError(f"{where}: user_ids has {len(self.user_ids)} entries for {self.num_users} sequences")
        if self.item_ids is not None and len(self.item_ids) != self.num_items + 1:
            raise ValueError(f"{where}: item_ids has {len(self.item_ids)} entries, expected num_items + 1")
        if self.domain_ids is not None and len(self.domain_ids) != self.num_domains:
            raise ValueError(f"{where}: domain_ids has {len(self.domain_ids)} entries for {self.num_domains} domains")

    @property
    def num_users(self) -> int:
        """U: the number of sequences."""
        return len(self.indptr) - 1

    @property
    def num_interactions(self) -> int:
        """nnz: the total number of interactions."""
        return len(self.items)

    def lengths(self) -> np.ndarray:
        """(U,) int64: the length of every sequence."""
        return np.diff(self.indptr)

    def sequence(self, u: int) -> np.ndarray:
        """(len_u,) int64: the items of sequence u, oldest first (a view)."""
        if not -self.num_users <= u < self.num_users:
            raise IndexError(f"sequence {u} out of range for {self.num_users} sequences")
        u %= self.num_users
        return self.items[self.indptr[u]:self.indptr[u + 1]]

    def domain_sequence(self, u: int) -> Optional[np.ndarray]:
        """(len_u,) int64: the domains of sequence u, or None for single-domain data."""
        if self.domains is None:
            return None
        u %= self.num_users
        return self.domains[self.indptr[u]:self.indptr[u + 1]]

    def select(self, index: np.ndarray, starts: Optional[np.ndarray] = None,
               ends: Optional[np.ndarray] = None) -> "SequenceDataset":
        """A new data set holding sequences `index` (in that order), optionally cut to the absolute
        item ranges [starts, ends) (each inside its sequence); drops `split`."""
        index = np.asarray(index, dtype=np.int64)
        if starts is None:
            starts = self.indptr[index]
        if ends is None:
            ends = self.indptr[index + 1]
        indptr, items = gather_ranges(self.items, starts, ends)
        domains = None if self.domains is None else gather_ranges(self.domains, starts, ends)[1]
        user_ids = None if self.user_ids is None else np.asarray(self.user_ids)[index]
        return replace(self, indptr=indptr, items=items, domains=domains, split=None, user_ids=user_ids)

    def fingerprint(self) -> str:
        """A 16-hex-digit digest of the data's content (not its name), stable across processes and
        machines: sha256 over num_items, num_domains, indptr, items, domains, split and every
        feature's name, num_values and values, each hashed as little-endian int64 bytes with a tag
        and its length, so that equal data (e.g. a renamed copy of a file) gives equal digests and
        any changed interaction, domain, split or attribute gives a different one."""
        digest = hashlib.sha256(b"fastattn.SequenceDataset/1")

        def part(tag: str, value: object) -> None:
            data = np.ascontiguousarray(np.asarray(value, dtype=np.int64).astype("<i8", copy=False))
            digest.update(f"|{tag}:{data.size}:".encode())
            digest.update(data.tobytes())

        part("num_items", self.num_items)
        part("num_domains", self.num_domains)
        part("indptr", self.indptr)
        part("items", self.items)
        if self.domains is not None:
            part("domains", self.domains)
        if self.split is not None:
            part("split", self.split)
        for feature in self.features:
            part(f"feature {feature.name!r}", [feature.num_values, *feature.values.shape])
            part("values", feature.values)
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        """One line: users, items, interactions, mean length, domains, features."""
        lengths = self.lengths()
        mean = float(lengths.mean()) if len(lengths) else 0.0
        text = (f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, "
                f"{self.num_interactions:,} interactions, mean length {mean:.1f}"
                f" (max {int(lengths.max()) if len(lengths) else 0})")
        if self.domains is not None:
            counts = np.bincount(self.domains, minlength=self.num_domains)
            text += f", {self.num_domains} domains ({'/'.join(f'{c:,}' for c in counts)})"
        if self.features:
            text += ", features " + ", ".join(
                f"{f.name} ({f.num_values - 1:,} values, <= {f.max_values} per item)" for f in self.features)
        if self.split is not None:
            counts = np.bincount(self.split.astype(np.int64), minlength=3)
            text += f", split {counts[0]:,}/{counts[1]:,}/{counts[2]:,} train/valid/test"
        return text

    def __repr__(self) -> str:
        return f"SequenceDataset({self.summary()})"
