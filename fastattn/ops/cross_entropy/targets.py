"""Target distributions over the whole catalog without a dense rows×items matrix.

Row i's distribution is `base[i]` on every item plus a sparse CSR part (duplicates add up):

    t_ij = base_i + Σ_{e in row i, indices[e] = j} values[e]

Hard targets, label smoothing and the MQSA-TED transition teacher are all of this form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np
import torch


@dataclass(frozen=True)
class SoftTarget:
    """A soft target per row: dense weight `base` plus a CSR sparse part.

    base (N,) float: weight on every item; indptr (N+1,) int64; indices (nnz,) int64 in [0, V);
    values (nnz,) float. Every row must sum to 1 over the catalog (base·V + Σ values), or to 0:
    a row of mass 0 is ignored, like `ignore_index` for hard targets.
    """

    base: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.base.shape[0]

    def row_ids(self) -> torch.Tensor:
        """(nnz,) int64: the row of each sparse entry."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.num_rows, device=self.indptr.device), counts)

    def mass(self, num_items: int) -> torch.Tensor:
        """(N,) float64: Σ_j t_ij for each row."""
        sparse = torch.zeros(self.num_rows, dtype=torch.float64, device=self.base.device)
        sparse.index_add_(0, self.row_ids(), self.values.double())
        return self.base.double() * num_items + sparse

    def rows(self, row_index: torch.Tensor) -> "SoftTarget":
        """The sub-target of the given rows (any shape; flattened), e.g. teacher rows of a batch's items."""
        row_index = row_index.reshape(-1).to(torch.int64)
        start, stop = self.indptr[row_index], self.indptr[row_index + 1]
        counts = stop - start
        indptr = torch.zeros(row_index.numel() + 1, dtype=torch.int64, device=self.indptr.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        # Position of every output entry inside its source row, then the source entry index.
        within = torch.arange(int(indptr[-1]), device=self.indptr.device) - torch.repeat_interleave(indptr[:-1], counts)
        source = torch.repeat_interleave(start, counts) + within
        return SoftTarget(self.base[row_index], indptr, self.indices[source], self.values[source])

    def to(self, device: Union[str, torch.device]) -> "SoftTarget":
        return SoftTarget(*(t.to(device) for t in (self.base, self.indptr, self.indices, self.values)))

    def to_dense(self, num_items: int) -> torch.Tensor:
        """(N, V) float64 — for tests and small catalogs only."""
        dense = self.base.double()[:, None].repeat(1, num_items)
        dense.index_put_((self.row_ids(), self.indices), self.values.double(), accumulate=True)
        return dense


def validate_soft_target(target: SoftTarget, num_rows: int, num_items: int, device: torch.device,
                         atol: float = 1e-3) -> torch.Tensor:
    """Check shapes, dtypes, ranges and row sums; return the (N,) float64 row mass (0 or 1)."""
    for name in ("base", "indptr", "indices", "values"):
        t = getattr(target, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"target.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"target.{name} is on {t.device} but hidden is on {device}")
    if target.base.shape != (num_rows,) or not target.base.dtype.is_floating_point:
        raise ValueError(f"target.base must be a float tensor of shape (N={num_rows},), "
                         f"got {tuple(target.base.shape)} {target.base.dtype}")
    if target.indptr.shape != (num_rows + 1,) or target.indptr.dtype != torch.int64:
        raise ValueError(f"target.indptr must be int64 of shape (N+1={num_rows + 1},), "
                         f"got {tuple(target.indptr.shape)} {target.indptr.dtype}")
    nnz = target.indices.shape[0]
    if target.indices.dim() != 1 or target.indices.dtype != torch.int64:
        raise ValueError(f"target.indices must be a 1-D int64 tensor, got {tuple(target.indices.shape)} "
                         f"{target.indices.dtype}")
    if target.values.shape != (nnz,) or not target.values.dtype.is_floating_point:
        raise ValueError(f"target.values must be a float tensor of shape (nnz={nnz},), "
                         f"got {tuple(target.values.shape)} {target.values.dtype}")
    if int(target.indptr[0]) != 0 or int(target.indptr[-1]) != nnz or bool((target.indptr.diff() < 0).any()):
        raise ValueError(f"target.indptr must start at 0, be non-decreasing and end at nnz={nnz}")
    if nnz and (int(target.indices.min()) < 0 or int(target.indices.max()) >= num_items):
        raise ValueError(f"target.indices must lie in [0, {num_items}) (the number of items), got "
                         f"[{int(target.indices.min())}, {int(target.indices.max())}]")
    if bool((target.base < 0).any()) or bool((target.values < 0).any()):
        raise ValueError("target.base and target.values must be non-negative")
    mass = target.mass(num_items)
    bad = ~((mass - 1).abs() <= atol) & ~(mass.abs() <= atol)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"target rows must sum to 1 (or 0 to ignore the row) within {atol}: "
                         f"row {row} sums to {float(mass[row]):.6g}")
    return torch.where(mass.abs() <= atol, torch.zeros_like(mass), mass)


def ted_teacher(sequences: Iterable[Sequence[int]], num_items: int, tau: float = 0.1,
                pad_id: int | None = 0) -> SoftTarget:
    """MQSA-TED's transition teacher as a `SoftTarget` with one row per item, never V×V.

    From next-item transition counts c(i→j) over the sequences (pairs touching `pad_id` are
    skipped), each row is max-normalized r_ij = c_ij / max_j c_ij and the teacher is
    softmax_j(r_ij / τ) over all `num_items` items: unobserved items have r = 0, so

        t_ij = base_i + sparse_ij,  base_i = 1 / Z_i,  sparse_ij = (exp(r_ij/τ) − 1) / Z_i,
        Z_i = (V − nnz_i) + Σ_observed exp(r_ij/τ).

    Items with no observed successor get the uniform distribution (base = 1/V).
    `sequences`: iterables of item ids in [0, num_items).
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
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
    ratio = counts / row_max[rows]
    lifted = np.exp(ratio / tau)  # r/τ <= 1/τ: for τ = 0.1 at most e^10, safe in float64
    nnz_per_row = np.bincount(rows, minlength=num_items)
    z = (num_items - nnz_per_row) + np.bincount(rows, weights=lifted, minlength=num_items)
    indptr = np.zeros(num_items + 1, np.int64)
    np.cumsum(nnz_per_row, out=indptr[1:])
    return SoftTarget(
        base=torch.from_numpy(1.0 / z).float(),
        indptr=torch.from_numpy(indptr),
        indices=torch.from_numpy(cols.astype(np.int64)),
        values=torch.from_numpy((lifted - 1.0) / z[rows]).float(),
    )
