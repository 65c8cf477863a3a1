"""The torch backend of full-catalog cross-entropy: eager ops over chunks of items, so it
never holds N×V either (extra memory O(N·chunk)). Same contract as the Triton kernels."""
from __future__ import annotations

from typing import Optional

import torch

from .._common import in_compute_dtype, item_chunks


def _logits(h32: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
            start: int, stop: int) -> torch.Tensor:
    z = h32 @ weight[start:stop].to(h32.dtype).T
    if bias is not None:
        z += bias[start:stop].to(h32.dtype)
    return z.mul_(scale)


class ChunkedCrossEntropyKernels:
    @staticmethod
    def lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """(N,) natural-log LSE_i (float32; float64 for float64 inputs) of z_ij = scale·(h_i·E_j + b_j)."""
        h32 = in_compute_dtype(hidden)
        lse = torch.full((hidden.shape[0],), float("-inf"), dtype=h32.dtype, device=hidden.device)
        for start, stop in item_chunks(hidden.shape[0], weight.shape[0]):
            lse = torch.logaddexp(lse, torch.logsumexp(_logits(h32, weight, bias, scale, start, stop), dim=1))
        return lse

    @staticmethod
    def backward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor, grad_filter: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """dH (N,D), dE (V,D), db (V,) in fp32 for dz = scale·(coef_p·softmax − coef_base − coef_t·onehot).
        Exact: grad_filter (a Triton tile skip) drops nothing here."""
        h32 = in_compute_dtype(hidden)
        n = hidden.shape[0]
        dh = torch.zeros_like(h32)
        de = torch.empty(weight.shape, dtype=h32.dtype, device=weight.device)
        db = torch.empty(weight.shape[0], dtype=h32.dtype, device=weight.device) if bias is not None else None
        for start, stop in item_chunks(n, weight.shape[0]):
            dz = _logits(h32, weight, bias, scale, start, stop).sub_(lse[:, None]).exp_()
            dz.mul_(coef_p[:, None]).sub_(coef_base[:, None])
            # The hard-target term, one cell per row, without boolean indexing (a host sync on a GPU):
            # rows whose target lies outside this chunk add 0 to a clamped, harmless cell.
            hit = (target >= start) & (target < stop)
            col = (target - start).clamp(0, stop - start - 1)[:, None]
            dz.scatter_add_(1, col, torch.where(hit, -coef_t, 0.0).to(dz.dtype)[:, None])
            dz.mul_(scale)
            dh.addmm_(dz, weight[start:stop].to(h32.dtype))
            torch.mm(dz.T, h32, out=de[start:stop])
            if db is not None:
                db[start:stop] = dz.sum(dim=0)
        return dh, de, db
