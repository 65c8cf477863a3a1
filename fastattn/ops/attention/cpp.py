"""The C++ CPU kernels behind `AttentionKernels` (csrc/attention.cpp), and their fake kernels.

The operators `fastattn::attn_fwd`, `attn_bwd` and `attn_dropout_rows` are registered by the
compiled extension (see `fastattn.ops.cpp_extension`); the fake (meta) implementations here give
torch.compile and `torch.library.opcheck` their output shapes and dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..cpp_extension import cpp_ops, cpp_unavailable_reason
from .options import AttentionOptions, forward_output_like

Domains = Optional[tuple[torch.Tensor, torch.Tensor]]


def _ops() -> object:
    """torch.ops.fastattn with the fake kernels registered (see `cpp_ops`)."""
    ops = cpp_ops()
    _register_fakes()
    return ops


def _domain_args(domains: Domains) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    return (None, None) if domains is None else (domains[0], domains[1])


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    """The C++ kernels take the seed as an int64 argument: read from a CPU tensor (no device sync;
    they run inside an opaque operator, so no trace sees this read)."""
    return int(seed) if seed is not None else 0


class CppAttentionKernels:
    """`AttentionKernels` on CPU tensors: fused flash-style C++ kernels, any float dtype, any strides
    (the operators copy their inputs to contiguous compute-dtype buffers)."""

    name = "cpp"

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions, seed: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor], domains: Domains,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """q (B,H,Lq,DQK), k (B,H,Lk,DQK), v (B,H,Lk,DV) → out (B,H,Lq,DV) in q's dtype, lse
        (B,H,Lq) base-2 (+inf on rows without a visible key) and acd (B,H,Lq) or None; lse and
        acd are float32, or float64 for float64 inputs."""
        dom_q, dom_k = _domain_args(domains)
        out, lse, acd = _ops().attn_fwd(
            q, k, v, key_padding_mask, dom_q, dom_k, opts.scale, opts.causal, opts.dropout_p, _seed_int(seed))
        return out, lse, acd if domains is not None else None

    @staticmethod
    def backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor], opts: AttentionOptions,
        seed: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], domains: Domains,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv (shapes and dtypes of q, k, v). The C++ kernels take D_i from here:
        delta (B,H,Lq) = rowsum(dout·out) (+ grad_acd·acd), in lse's dtype (float32, or float64)."""
        dom_q, dom_k = _domain_args(domains)
        delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1)
        if grad_acd is not None and acd is not None:
            delta = delta + grad_acd * acd
        return _ops().attn_bwd(
            q, k, v, dout, lse, delta.contiguous(), grad_acd, key_padding_mask, dom_q, dom_k,
            opts.scale, opts.causal, opts.dropout_p, _seed_int(seed))


def cpp_dropout_keep_rows(seed: int, dropout_p: float, lk: int, first_row: int, n_rows: int) -> torch.Tensor:
    """Bool (n_rows, Lk): rows [first_row, first_row + n_rows) of the flattened (B·H·Lq, Lk) mask
    of probabilities the C++ kernels keep for `seed`, flat row (b·H + h)·Lq + i — any window of
    any call, however large. Equal to the Triton kernels' mask (`triton_fwd.dropout_keep_rows`):
    both run Philox-4x32-10 on the same key and counters (see `triton_fwd.dropout_keep`)."""
    return _ops().attn_dropout_rows(seed, dropout_p, lk, first_row, n_rows)


def cpp_dropout_keep_mask(seed: int, dropout_p: float, batch: int, heads: int, lq: int, lk: int) -> torch.Tensor:
    """The bool (B,H,Lq,Lk) mask of probabilities the C++ kernels keep for `seed` (tests, debugging)."""
    return cpp_dropout_keep_rows(seed, dropout_p, lk, 0, batch * heads * lq).view(batch, heads, lq, lk)


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Register the fake kernels once, after the extension has defined the operators."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED = True

    @torch.library.register_fake("fastattn::attn_fwd")
    def _attn_fwd_fake(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
        dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], scale: float, causal: bool,
        dropout_p: float, seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward_output_like(q, v, dom_q is not None)

    @torch.library.register_fake("fastattn::attn_bwd")
    def _attn_bwd_fake(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
        delta: torch.Tensor, grad_acd: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
        dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], scale: float, causal: bool,
        dropout_p: float, seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            torch.empty_like(k, memory_format=torch.contiguous_format), \
            torch.empty_like(v, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastattn::attn_dropout_rows")
    def _attn_dropout_rows_fake(seed: int, dropout_p: float, lk: int, first_row: int, num_rows: int) -> torch.Tensor:
        return torch.empty((num_rows, lk), dtype=torch.bool)


# Registered at import when the operators exist, so opcheck / torch.compile see them before any call.
if cpp_unavailable_reason() is None:
    _register_fakes()
