"""The operator `fastattn::dif_attention` (and an autograd.Function) of decoupled attention,
shared by the fused backends.

The score streams are concatenated along the head dim ([q | qa_1 | …], [k | ka_1 | …]) so a
backend sees one QK head dim; their gradients are split back afterwards. A backend is any
object with the `AttentionKernels` methods (Triton now, the C++ kernels later).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from ..autograd_guard import no_second_derivative
from .options import AttentionOptions, forward_output_like


class AttentionKernels(Protocol):
    """What a fused backend provides (streams already concatenated; the backend takes any strides)."""

    name: str  # the `backend` value that selects it, for error messages

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions, seed: int,
        key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """→ out (B,H,Lq,Dv), lse (B,H,Lq) fp32 base-2, acd (B,H,Lq) fp32 or None."""
        ...

    @staticmethod
    def backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
        delta: torch.Tensor, grad_acd: Optional[torch.Tensor], opts: AttentionOptions, seed: int,
        key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ dq, dk, dv for the concatenated q, k and v."""
        ...


def draw_seed() -> int:
    """Dropout seed in [0, 2**63 - 1) from torch's default (CPU) generator, so torch.manual_seed
    reproduces a run; a CPU draw, so no device sync.

    The kernels use it as the 64-bit Philox key and the element index as the counter (see
    `triton_fwd.dropout_keep`), so calls with different seeds share no random stream.
    """
    return int(draw_seed_tensor().item())


def draw_seed_tensor() -> torch.Tensor:
    """The draw of `draw_seed` as an int64 0-dim CPU tensor (traceable by torch.compile: no host read)."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


class DIFAttentionFunction(torch.autograd.Function):
    """out, acd = f(q, k, v, *attr_q, *attr_k); acd is None unless domains are given. Kept for
    direct use with a kernels class (tests); `dif_attention` calls the operator
    `fastattn::dif_attention` below, which torch.compile can trace."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        kernels: AttentionKernels,
        opts: AttentionOptions,
        key_padding_mask: Optional[torch.Tensor],
        domains: Optional[tuple[torch.Tensor, torch.Tensor]],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *attrs: torch.Tensor,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        n_attr = len(attrs) // 2
        q_cat = torch.cat([q, *attrs[:n_attr]], dim=-1).contiguous()
        k_cat = torch.cat([k, *attrs[n_attr:]], dim=-1).contiguous()
        v = v.contiguous()
        seed = draw_seed() if opts.has_dropout else 0
        out, lse, acd = kernels.forward(q_cat, k_cat, v, opts, seed, key_padding_mask, domains)
        ctx.save_for_backward(q_cat, k_cat, v, out, lse, acd)
        ctx.kernels, ctx.opts, ctx.seed = kernels, opts, seed
        ctx.key_padding_mask, ctx.domains = key_padding_mask, domains
        ctx.split_sizes = [q.shape[-1]] + [a.shape[-1] for a in attrs[:n_attr]]
        if acd is not None:
            ctx.mark_non_differentiable(lse)
        return out, acd

    @staticmethod
    def backward(ctx: Any, dout: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        q_cat, k_cat, v, out, lse, acd = ctx.saved_tensors
        dq_cat, dk_cat, dv = guarded_grads(ctx.kernels, ctx.opts, ctx.seed, ctx.key_padding_mask, ctx.domains,
                                           (q_cat, k_cat, v, out, lse, acd), dout, grad_acd)
        dq_parts = dq_cat.split(ctx.split_sizes, dim=-1)
        dk_parts = dk_cat.split(ctx.split_sizes, dim=-1)
        return (None, None, None, None, dq_parts[0], dk_parts[0], dv, *dq_parts[1:], *dk_parts[1:])


def guarded_grads(kernels: AttentionKernels, opts: AttentionOptions, seed: int, key_padding_mask: Optional[torch.Tensor],
                  domains: Optional[tuple[torch.Tensor, torch.Tensor]], saved: tuple[Optional[torch.Tensor], ...],
                  dout: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """dq_cat, dk_cat, dv from the fused kernels; saved = (q_cat, k_cat, v, out, lse, acd | None)."""
    # The kernels' backward is not itself differentiable: compute it outside the graph and,
    # under create_graph=True, make differentiating its result raise instead of giving zeros.
    with torch.no_grad():
        grads = _first_order_grads(kernels, opts, seed, key_padding_mask, domains, saved, dout, grad_acd)
    if torch.is_grad_enabled():
        grads = no_second_derivative(grads, (
            f"dif_attention with backend={kernels.name!r} cannot be differentiated twice (its backward "
            "is a fused kernel without a derivative); use backend='torch' for higher-order gradients"),
            (saved[3], dout, grad_acd))
    return grads


def _first_order_grads(kernels: AttentionKernels, opts: AttentionOptions, seed: int,
                       key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
                       saved: tuple[Optional[torch.Tensor], ...], dout: Optional[torch.Tensor],
                       grad_acd: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """dq_cat, dk_cat, dv from the fused kernels (no guard)."""
    q_cat, k_cat, v, out, lse, acd = saved
    if dout is None:
        dout = torch.zeros_like(out)
    dout = dout.contiguous()
    # D_i = Σ_j P_ij dP_ij = dO_i·O_i; the acd term folds g_i·acd_i into it (see triton_bwd).
    # At least float32 (float64 stays float64: the C++ kernels take float64 for gradcheck).
    acc = torch.promote_types(out.dtype, torch.float32)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)
    if grad_acd is None or acd is None:
        grad_acd, domains = None, None
    else:
        grad_acd = grad_acd.to(acc).contiguous()
        delta = delta + grad_acd * acd
    return kernels.backward(q_cat, k_cat, v, dout, lse, delta.contiguous(), grad_acd, opts, seed,
                            key_padding_mask, domains)


# ---------------------------------------------------------------- the operator torch.compile sees
def kernels_of(backend: str) -> AttentionKernels:
    """The fused kernels behind a resolved backend name ("cpp" or "triton"), imported on first use."""
    if backend == "cpp":
        from .cpp import CppAttentionKernels
        return CppAttentionKernels
    if backend == "triton":
        from .triton_backend import TritonAttentionKernels
        return TritonAttentionKernels
    raise ValueError(f"fastattn::dif_attention: backend must be 'cpp' or 'triton', got {backend!r}")


def _domains(dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    return None if dom_q is None or dom_k is None else (dom_q, dom_k)


@torch.library.custom_op("fastattn::dif_attention", mutates_args=())
def dif_attention_op(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused decoupled attention on the concatenated streams q_cat (B,H,Lq,DQK), k_cat (B,H,Lk,DQK),
    v (B,H,Lk,DV) → out (B,H,Lq,DV) in q's dtype, lse (B,H,Lq) base-2 and acd (B,H,Lq), or (0,)
    without domains; lse/acd float32 (float64 for float64 inputs). seed: int64 0-dim CPU tensor,
    the Philox key (None: no dropout). backend: "cpp" or "triton"."""
    opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)
    out, lse, acd = kernels_of(backend).forward(
        q_cat, k_cat, v, opts, int(seed) if seed is not None else 0, key_padding_mask, _domains(dom_q, dom_k))
    if acd is None or dom_q is None:
        acd = lse.new_empty((0,))
    return out, lse, acd


@dif_attention_op.register_fake
def _dif_attention_fake(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_output_like(q_cat, v, dom_q is not None)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q_cat, k_cat, v, key_padding_mask, dom_q, dom_k, seed, scale, causal, dropout_p, backend = inputs
    out, lse, acd = output
    ctx.save_for_backward(q_cat, k_cat, v, out, lse, acd, key_padding_mask, dom_q, dom_k, seed)
    ctx.opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)
    ctx.backend = backend


@torch.library.custom_op("fastattn::dif_attention_backward", mutates_args=())
def dif_attention_backward_op(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
    delta: torch.Tensor, grad_acd: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_cat, dk_cat, dv of `fastattn::dif_attention` (an operator so that a traced backward
    reads the seed tensor only inside the kernel call); delta (B,H,Lq) = rowsum(dout·out) (+ grad_acd·acd)."""
    opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)
    dq, dk, dv = kernels_of(backend).backward(q_cat, k_cat, v, dout, lse, delta, grad_acd, opts,
                                              int(seed) if seed is not None else 0, key_padding_mask,
                                              _domains(dom_q, dom_k))
    # An operator's outputs may not alias its inputs (a kernel could return a view of one).
    return tuple(g.clone() if g._base is not None else g for g in (dq, dk, dv))  # type: ignore[return-value]


@dif_attention_backward_op.register_fake
def _dif_attention_backward_fake(q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, *_: Any
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q_cat, k_cat, v))  # type: ignore[return-value]


class _KernelsViaOperator:
    """`AttentionKernels.backward` through `fastattn::dif_attention_backward`, with the seed as a tensor."""

    def __init__(self, backend: str, seed: Optional[torch.Tensor]) -> None:
        self.name, self.seed = backend, seed

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                 delta: torch.Tensor, grad_acd: Optional[torch.Tensor], opts: AttentionOptions, _seed: int,
                 key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dom_q, dom_k = domains if domains is not None else (None, None)
        return dif_attention_backward_op(q, k, v, dout, lse, delta, grad_acd, key_padding_mask, dom_q, dom_k,
                                         self.seed, opts.scale, opts.causal, opts.dropout_p, self.name)


def _backward(ctx: Any, dout: Optional[torch.Tensor], _dlse: Optional[torch.Tensor],
              grad_acd: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    q_cat, k_cat, v, out, lse, acd, key_padding_mask, dom_q, dom_k, seed = ctx.saved_tensors
    domains = _domains(dom_q, dom_k)
    dq, dk, dv = guarded_grads(_KernelsViaOperator(ctx.backend, seed), ctx.opts, 0,  # type: ignore[arg-type]
                               key_padding_mask, domains, (q_cat, k_cat, v, out, lse, acd if domains else None),
                               dout, grad_acd if domains else None)
    return (dq, dk, dv) + (None,) * 8


dif_attention_op.register_autograd(_backward, setup_context=_setup_context)
