"""Target distributions over the whole catalog without a dense rows×items matrix.

Row i's distribution is `base[i]` on every item plus a sparse CSR part (duplicates add up):

    t_ij = base_i + Σ_{e in row i, indices[e] = j} values[e]

Hard targets, label smoothing and the MQSA-TED transition teacher are all of this form.
"""
from __future__ import annotations

import math
import numbers
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

    def __post_init__(self) -> None:
        for name in ("base", "indptr", "indices", "values"):
            part = getattr(self, name)
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"SoftTarget.{name} must be a torch.Tensor, got {type(part).__name__}")

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

    def rows(self, row_index: Union[torch.Tensor, int, Sequence[int]]) -> "SoftTarget":
        """The sub-target of the given rows (integer ids in [0, N), any shape; flattened), e.g. teacher
        rows of a batch's items. An id outside [0, N) raises IndexError (no negative indexing)."""
        row_index = torch.as_tensor(row_index, device=self.indptr.device)
        if row_index.dtype.is_floating_point or row_index.dtype.is_complex or row_index.dtype == torch.bool:
            raise TypeError(f"SoftTarget.rows: row_index must hold integer row ids, got {row_index.dtype}")
        row_index = row_index.reshape(-1).to(torch.int64)
        bad = (row_index < 0) | (row_index >= self.num_rows)
        if self.num_rows == 0 and row_index.numel():
            self._bad_row(row_index, bad)
        safe = row_index.masked_fill(bad, 0)
        start = self.indptr[safe]
        counts = self.indptr[safe + 1] - start
        # One host sync for both the output size and the range check (the training loop's only one here).
        total, num_bad = torch.stack([counts.sum(), bad.sum()]).tolist()
        if num_bad:
            self._bad_row(row_index, bad)
        indptr = torch.zeros(row_index.numel() + 1, dtype=torch.int64, device=self.indptr.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        # Position of every output entry inside its source row, then the source entry index.
        within = (torch.arange(total, device=self.indptr.device)
                  - torch.repeat_interleave(indptr[:-1], counts, output_size=total))
        source = torch.repeat_interleave(start, counts, output_size=total) + within
        return SoftTarget(self.base[row_index], indptr, self.indices[source], self.values[source])

    def _bad_row(self, row_index: torch.Tensor, bad: torch.Tensor) -> None:
        raise IndexError(f"SoftTarget.rows: row_index holds {int(row_index[bad][0])}, outside [0, {self.num_rows}) "
                         f"(the rows of this target)")

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
        t = getattr(target, name)  # tensors: checked by SoftTarget itself
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
