"""autograd.Function of decoupled attention, shared by the fused backends.

The score streams are concatenated along the head dim ([q | qa_1 | …], [k | ka_1 | …]) so a
backend sees one QK head dim; their gradients are split back afterwards. A backend is any
object with the `AttentionKernels` methods (Triton now, the C++ kernels later).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from ..autograd_guard import no_second_derivative
from .options import AttentionOptions


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
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


class DIFAttentionFunction(torch.autograd.Function):
    """out, acd = f(q, k, v, *attr_q, *attr_k); acd is None unless domains are given."""

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
        # The kernels' backward is not itself differentiable: compute it outside the graph and,
        # under create_graph=True, make differentiating its result raise instead of giving zeros.
        with torch.no_grad():
            grads = _first_order_grads(ctx, dout, grad_acd)
        if torch.is_grad_enabled():
            grads = no_second_derivative(grads, (
                f"dif_attention with backend={ctx.kernels.name!r} cannot be differentiated twice (its backward "
                "is a fused kernel without a derivative); use backend='torch' for higher-order gradients"),
                (ctx.saved_tensors[3], dout, grad_acd))
        return grads


def _first_order_grads(ctx: Any, dout: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor]
                       ) -> tuple[Optional[torch.Tensor], ...]:
    """The gradients DIFAttentionFunction.backward returns, from the fused kernels."""
    q_cat, k_cat, v, out, lse, acd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dout = dout.contiguous()
    # D_i = Σ_j P_ij dP_ij = dO_i·O_i; the acd term folds g_i·acd_i into it (see triton_bwd).
    # At least float32 (float64 stays float64: the C++ kernels take float64 for gradcheck).
    acc = torch.promote_types(out.dtype, torch.float32)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)
    domains = ctx.domains
    if grad_acd is None or acd is None:
        grad_acd, domains = None, None
    else:
        grad_acd = grad_acd.to(acc).contiguous()
        delta = delta + grad_acd * acd
    dq_cat, dk_cat, dv = ctx.kernels.backward(
        q_cat, k_cat, v, dout, lse, delta.contiguous(), grad_acd, ctx.opts, ctx.seed,
        ctx.key_padding_mask, domains,
    )
    dq_parts = dq_cat.split(ctx.split_sizes, dim=-1)
    dk_parts = dk_cat.split(ctx.split_sizes, dim=-1)
    return (None, None, None, None, dq_parts[0], dk_parts[0], dv, *dq_parts[1:], *dk_parts[1:])
