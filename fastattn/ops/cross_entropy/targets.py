"""Target distributions over the whole catalog without a dense rows×items matrix.

Row i's distribution is `base[i]` on every item plus a sparse CSR part (duplicates add up):

    t_ij = base_i + Σ_{e in row i, indices[e] = j} values[e]

Hard targets, label smoothing and the MQSA-TED transition teacher
(`fastattn.models.mqsa_ted.ted_teacher`) are all of this form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..checks import check_values


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
        """(nnz,) int64: the row of each sparse entry (no device sync: the size is nnz)."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.num_rows, device=self.indptr.device), counts,
                                       output_size=self.indices.shape[0])

    def max_row_nnz(self) -> int:
        """The most sparse entries any row has (0 without rows): the `width` that `rows` needs. Reads
        the value on the host — call it once when the target is built, not per training step."""
        return int((self.indptr[1:] - self.indptr[:-1]).max()) if self.num_rows else 0

    def mass(self, num_items: int) -> torch.Tensor:
        """(N,) float64: Σ_j t_ij for each row."""
        sparse = torch.zeros(self.num_rows, dtype=torch.float64, device=self.base.device)
        sparse.index_add_(0, self.row_ids(), self.values.double())
        return self.base.double() * num_items + sparse

    def rows(self, row_index: Union[torch.Tensor, int, Sequence[int]], *, width: Optional[int] = None
             ) -> "SoftTarget":
        """The sub-target of the given rows (integer ids in [0, N), any shape; flattened), e.g. teacher
        rows of a batch's items. An id outside [0, N) raises IndexError (no negative indexing).

        width=None: exactly the rows' entries; their count is a data-dependent size, read on the
        host (one device sync). width=K (>= `max_row_nnz()`): every output row holds exactly K
        entries, its own followed by zeros (value 0 at item 0, which changes no loss or gradient),
        so no value is read on the host; the id and width checks then run only where they cost no
        sync (`fastattn.ops.checks`: CPU tensors; a device-side assert on CUDA).
        """
        row_index = torch.as_tensor(row_index, device=self.indptr.device)
        if row_index.dtype.is_floating_point or row_index.dtype.is_complex or row_index.dtype == torch.bool:
            raise TypeError(f"SoftTarget.rows: row_index must hold integer row ids, got {row_index.dtype}")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 0):
            raise ValueError(f"SoftTarget.rows: width must be an int >= 0 or None, got {width!r}")
        row_index = row_index.reshape(-1).to(torch.int64)
        bad = (row_index < 0) | (row_index >= self.num_rows)
        if self.num_rows == 0 and row_index.numel():
            self._bad_row(row_index, bad)
        safe = row_index.masked_fill(bad, 0)
        start = self.indptr[safe]
        counts = self.indptr[safe + 1] - start
        if width is not None:
            return self._padded_rows(row_index, bad, safe, start, counts, width)
        # One host sync for both the output size and the range check.
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

    def _padded_rows(self, row_index: torch.Tensor, bad: torch.Tensor, safe: torch.Tensor, start: torch.Tensor,
                     counts: torch.Tensor, width: int) -> "SoftTarget":
        """`rows` with `width` entries per output row (see there): shapes from the arguments only."""
        check_values(lambda: ~bad.any(), row_index.device, "SoftTarget.rows: row_index holds an id outside "
                     f"[0, {self.num_rows}) (the rows of this target)", error=IndexError,
                     detail=lambda: self._bad_row_message(row_index, bad))
        check_values(lambda: (counts <= width).all(), row_index.device,
                     f"SoftTarget.rows: a row has more than width={width} entries (use width >= max_row_nnz())")
        n, device = row_index.numel(), self.indptr.device
        slot = torch.arange(width, device=device)
        used = slot < counts[:, None]  # (n, width)
        source = torch.where(used, start[:, None] + slot, 0).reshape(-1)
        used = used.reshape(-1)
        if self.indices.shape[0] == 0:  # nothing to gather from: every slot is padding
            source = torch.zeros_like(source)
            indices, values = source, torch.zeros(source.shape, dtype=self.values.dtype, device=device)
        else:
            indices = torch.where(used, self.indices[source], 0)
            values = torch.where(used, self.values[source], 0.0)
        indptr = torch.arange(n + 1, device=device) * width
        return SoftTarget(self.base[safe], indptr, indices, values)

    def _bad_row(self, row_index: torch.Tensor, bad: torch.Tensor) -> None:
        raise IndexError(self._bad_row_message(row_index, bad))

    def _bad_row_message(self, row_index: torch.Tensor, bad: torch.Tensor) -> str:
        return (f"SoftTarget.rows: row_index holds {int(row_index[bad][0])}, outside [0, {self.num_rows}) "
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
    _check_soft_values(target, num_items, nnz, device)
    mass = target.mass(num_items)
    bad = ~((mass - 1).abs() <= atol) & ~(mass.abs() <= atol)

    def first_bad_row() -> str:
        row = int(bad.nonzero()[0])
        return (f"target rows must sum to 1 (or 0 to ignore the row) within {atol}: "
                f"row {row} sums to {float(mass[row]):.6g}")

    check_values(lambda: ~bad.any(), device, f"target rows must sum to 1 (or 0 to ignore the row) within {atol}",
                 detail=first_bad_row)
    return torch.where(mass.abs() <= atol, torch.zeros_like(mass), mass)


def _check_soft_values(target: SoftTarget, num_items: int, nnz: int, device: torch.device) -> None:
    """The value checks of `validate_soft_target` (CSR layout, index range, signs), each only where
    it costs no device sync (`fastattn.ops.checks`)."""
    indptr, indices = target.indptr, target.indices
    check_values(lambda: (indptr[0] == 0) & (indptr[-1] == nnz) & (indptr.diff() >= 0).all(), device,
                 f"target.indptr must start at 0, be non-decreasing and end at nnz={nnz}")
    check_values(lambda: ((indices >= 0) & (indices < num_items)).all(), device,
                 f"target.indices must lie in [0, {num_items}) (the number of items)",
                 detail=lambda: (f"target.indices must lie in [0, {num_items}) (the number of items), got "
                                 f"[{int(indices.min())}, {int(indices.max())}]"))
    check_values(lambda: (target.base >= 0).all() & (target.values >= 0).all(), device,
                 "target.base and target.values must be non-negative")
