"""Attention's backend table: what `fastattn.dif_attention` dispatches to after validation.

Every entry takes the validated streams and returns (out (B,H,Lq,Dv), acd (B,H,Lq) or None):

- "torch": the plain-torch reference (reference.py), differentiable by torch's autograd (to any
  order) and traced op by op by torch.compile;
- "cpp": the C++ kernels on the list of score streams, one GEMM per stream, in the layout the
  streams come in (`cpp.cpp_stream_attention`, operator `fastattn::dif_attention_streams`);
- "triton": the fused kernels behind the operator `fastattn::dif_attention_triton` (function.py),
  with the streams concatenated along the head dim ([q | qa_1 | …]) so a kernel sees one QK head
  dim; autograd splits the gradients back.
  The dropout seed is drawn on the streams' device, as a tensor (no host read). Plain eager
  calls take the operators' autograd.Function twins (no dispatch overhead; ops/eager.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from . import cpp as _cpp  # noqa: F401  (registers the C++ operators' fake kernels, for tracing)
from ..eager import eager_call_ok
from .function import DIFAttentionTritonEager, dif_attention_triton_op, draw_seed_tensor
from .options import AttentionOptions
from .reference import dif_attention_reference

Domains = Optional[tuple[torch.Tensor, torch.Tensor]]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[torch.Tensor], Sequence[torch.Tensor],
                      AttentionOptions, Optional[torch.Tensor], Domains], tuple[torch.Tensor, Optional[torch.Tensor]]]


def _torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor],
           attr_k: Sequence[torch.Tensor], opts: AttentionOptions, key_padding_mask: Optional[torch.Tensor],
           domains: Domains) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return dif_attention_reference(q, k, v, attr_q, attr_k, opts, key_padding_mask, None, domains)


def _fused(operator: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           eager: type[torch.autograd.Function], *backend_args: Any) -> Attention:
    """Call `operator`, or in plain eager mode its autograd.Function twin `eager` (ops/eager.py)."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr_q: Sequence[torch.Tensor],
            attr_k: Sequence[torch.Tensor], opts: AttentionOptions, key_padding_mask: Optional[torch.Tensor],
            domains: Domains) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        dom_q, dom_k = domains if domains is not None else (None, None)
        args = (torch.cat([q, *attr_q], dim=-1), torch.cat([k, *attr_k], dim=-1), v, key_padding_mask, dom_q, dom_k,
                draw_seed_tensor(q.device) if opts.has_dropout else None, opts.scale, opts.causal, opts.dropout_p,
                *backend_args)
        call = eager.apply if eager_call_ok((q, k, v, *attr_q, *attr_k, key_padding_mask, dom_q, dom_k)) else operator
        out, _, acd = call(*args)
        return out, (acd if domains is not None else None)
    return run


BACKENDS: dict[str, Attention] = {
    "torch": _torch, "cpp": _cpp.cpp_stream_attention,
    "triton": _fused(dif_attention_triton_op, DIFAttentionTritonEager)}
