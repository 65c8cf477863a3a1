"""The C++ CPU kernels behind `AttentionKernels` (csrc/attention.cpp), the eager stream-list
call, and their fake kernels.

The operators `fastattn::attn_fwd`, `attn_bwd`, `attn_fwd_streams`, `attn_bwd_streams` and
`attn_dropout_rows` are registered by the compiled extension (see `fastattn.ops.cpp_extension`);
the fake (meta) implementations here give torch.compile and `torch.library.opcheck` their output
shapes and dtypes.

backend="cpp" of `fastattn.dif_attention` is `cpp_stream_attention`: the score streams go to the
kernels as a list (one GEMM per stream into the same scores) in the layout they come in (e.g.
the (B, H, L, D) views of a fused QKV projection), so nothing is concatenated or copied. Traced
calls take the operator `fastattn::dif_attention_streams` (+ `_backward`), plain eager calls its
autograd.Function twin `CppStreamAttention` (same bodies, bit-identical results). The older
`fastattn::dif_attention` operator (function.py, concatenated streams) drives `CppAttentionKernels`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..autograd_guard import no_second_derivative
from ..cpp_extension import cpp_ops, cpp_unavailable_reason
from ..eager import eager_call_ok
from .function import draw_seed_tensor
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


# ---------------------------------------------------------------- the stream-list operators
# Bodies shared by the operator `fastattn::dif_attention_streams` (traced calls) and its eager twin
# `CppStreamAttention` (plain calls), so both give bit-identical results.
def _streams_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor],
                     attr_k: Sequence[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                     dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                     scale: float, causal: bool, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, acd (0,) without domains) of the streams [q, *attr_q]·[k, *attr_k]; seed: the int64
    0-dim CPU tensor of the Philox key (None: no dropout), read only here."""
    return _ops().attn_fwd_streams([q, *attr_q], [k, *attr_k], v, key_padding_mask, dom_q, dom_k, scale, causal,
                                   dropout_p, _seed_int(seed))


def _streams_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor],
                      attr_k: Sequence[torch.Tensor], out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                      acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor],
                      key_padding_mask: Optional[torch.Tensor], dom_q: Optional[torch.Tensor],
                      dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor], scale: float, causal: bool,
                      dropout_p: float) -> list[torch.Tensor]:
    """[dq, dk, dv, *d attr_q, *d attr_k]; acd and grad_acd given iff acd's gradient term is used."""
    dqs, dks, dv = _ops().attn_bwd_streams([q, *attr_q], [k, *attr_k], v, out, dout, lse, acd, grad_acd,
                                           key_padding_mask, dom_q, dom_k, scale, causal, dropout_p, _seed_int(seed))
    return [dqs[0], dks[0], dv, *dqs[1:], *dks[1:]]


def _backward_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor],
                   attr_k: Sequence[torch.Tensor], *_: Any) -> list[torch.Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, *attr_q, *attr_k)]


def _forward_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor],
                  attr_k: Sequence[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                  dom_q: Optional[torch.Tensor], *_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_output_like(q, v, dom_q is not None)


streams_op = torch.library.custom_op("fastattn::dif_attention_streams", _streams_forward, mutates_args=())
streams_op.register_fake(_forward_fake)
streams_backward_op = torch.library.custom_op("fastattn::dif_attention_streams_backward", _streams_backward,
                                              mutates_args=())
streams_backward_op.register_fake(_backward_fake)

_SECOND_DERIVATIVE = ("dif_attention with backend='cpp' cannot be differentiated twice (its backward is a fused "
                      "kernel without a derivative); use backend='torch' for higher-order gradients")


def _guarded_backward(backward: Callable[..., list[torch.Tensor]], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, attrs: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                      acd: Optional[torch.Tensor], dout: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor],
                      key_padding_mask: Optional[torch.Tensor], dom_q: Optional[torch.Tensor],
                      dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor], opts: AttentionOptions,
                      ) -> tuple[Optional[torch.Tensor], ...]:
    """dq, dk, dv, *d attrs through `backward` (the backward operator or its body), computed outside
    the graph; under create_graph=True differentiating them raises instead of giving zeros."""
    n = len(attrs) // 2
    if dout is None:
        dout = torch.zeros_like(out)
    if grad_acd is None or acd is None or dom_q is None:  # acd unused downstream: its gradient term is zero
        acd, grad_acd = None, None
    with torch.no_grad():
        grads: tuple[Optional[torch.Tensor], ...] = tuple(backward(
            q, k, v, list(attrs[:n]), list(attrs[n:]), out, dout, lse, acd, grad_acd, key_padding_mask, dom_q,
            dom_k, seed, opts.scale, opts.causal, opts.dropout_p))
    if torch.is_grad_enabled():
        grads = no_second_derivative(grads, _SECOND_DERIVATIVE, (out, dout, grad_acd))
    return grads


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, attr_q, attr_k, key_padding_mask, dom_q, dom_k, seed, scale, causal, dropout_p = inputs
    out, lse, acd = output
    ctx.save_for_backward(q, k, v, *attr_q, *attr_k, out, lse, acd, key_padding_mask, dom_q, dom_k, seed)
    ctx.opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)


def _operator_backward(ctx: Any, dout: Optional[torch.Tensor], _dlse: Optional[torch.Tensor],
                       grad_acd: Optional[torch.Tensor]) -> tuple[Any, ...]:
    *streams, out, lse, acd, key_padding_mask, dom_q, dom_k, seed = ctx.saved_tensors
    q, k, v, *attrs = streams
    g = _guarded_backward(streams_backward_op, q, k, v, attrs, out, lse, acd, dout, grad_acd, key_padding_mask,
                          dom_q, dom_k, seed, ctx.opts)
    n = len(attrs) // 2
    return (g[0], g[1], g[2], list(g[3:3 + n]), list(g[3 + n:])) + (None,) * 7


streams_op.register_autograd(_operator_backward, setup_context=_setup_context)


class CppStreamAttention(torch.autograd.Function):
    """The eager twin of `fastattn::dif_attention_streams` (fastattn/ops/eager.py): the same bodies
    and gradient, without the operator dispatch. Streams are flat arguments (q, k, v, *attr_q,
    *attr_k): tensors inside a list would not be tracked by autograd."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, opts: AttentionOptions, key_padding_mask: Optional[torch.Tensor], domains: Domains,
        seed: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *attrs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(attrs) // 2
        dom_q, dom_k = _domain_args(domains)
        out, lse, acd = _streams_forward(q, k, v, attrs[:n], attrs[n:], key_padding_mask, dom_q, dom_k, seed,
                                         opts.scale, opts.causal, opts.dropout_p)
        ctx.save_for_backward(q, k, v, *attrs, out, lse, acd)
        ctx.opts, ctx.seed, ctx.key_padding_mask, ctx.domains = opts, seed, key_padding_mask, domains
        ctx.mark_non_differentiable(lse)
        return out, lse, acd

    @staticmethod
    def backward(ctx: Any, dout: Optional[torch.Tensor], _dlse: Optional[torch.Tensor],
                 grad_acd: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        *streams, out, lse, acd = ctx.saved_tensors
        q, k, v, *attrs = streams
        dom_q, dom_k = _domain_args(ctx.domains)
        grads = _guarded_backward(_streams_backward, q, k, v, attrs, out, lse, acd, dout, grad_acd,
                                  ctx.key_padding_mask, dom_q, dom_k, ctx.seed, ctx.opts)
        return (None, None, None, None, *grads)


def cpp_stream_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor], attr_k: Sequence[torch.Tensor],
    opts: AttentionOptions, key_padding_mask: Optional[torch.Tensor], domains: Domains,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, acd | None) of validated streams on the C++ kernels (backend "cpp" of op.py): plain eager
    calls through `CppStreamAttention`, traced ones through the operator."""
    dom_q, dom_k = _domain_args(domains)
    seed = draw_seed_tensor(q.device) if opts.has_dropout else None
    if eager_call_ok((q, k, v, *attr_q, *attr_k, key_padding_mask, dom_q, dom_k)):
        out, _, acd = CppStreamAttention.apply(opts, key_padding_mask, domains, seed, q, k, v, *attr_q, *attr_k)
    else:
        out, _, acd = streams_op(q, k, v, list(attr_q), list(attr_k), key_padding_mask, dom_q, dom_k, seed,
                                 opts.scale, opts.causal, opts.dropout_p)
    return out, (acd if domains is not None else None)


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

    @torch.library.register_fake("fastattn::attn_fwd_streams")
    def _attn_fwd_streams_fake(
        q: list[torch.Tensor], k: list[torch.Tensor], v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
        dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], scale: float, causal: bool,
        dropout_p: float, seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward_output_like(q[0], v, dom_q is not None)

    @torch.library.register_fake("fastattn::attn_bwd_streams")
    def _attn_bwd_streams_fake(
        q: list[torch.Tensor], k: list[torch.Tensor], v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
        lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor], dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor],
        scale: float, causal: bool, dropout_p: float, seed: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        def like(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        return [like(t) for t in q], [like(t) for t in k], like(v)

    @torch.library.register_fake("fastattn::attn_dropout_rows")
    def _attn_dropout_rows_fake(seed: int, dropout_p: float, lk: int, first_row: int, num_rows: int) -> torch.Tensor:
        return torch.empty((num_rows, lk), dtype=torch.bool)


# Registered at import when the operators exist, so opcheck / torch.compile see them before any call.
if cpp_unavailable_reason() is None:
    _register_fakes()
