"""The operators of decoupled attention, one autograd formula shared by the fused backends.

- `fastattn::dif_attention` / `dif_attention_backward` (`custom_op`, backend="cpp"): the C++
  kernels, opaque to torch.compile.
- `fastattn::dif_attention_triton` / `dif_attention_triton_backward`: the Triton kernels, as
  `torch.library.triton_op`s so torch.compile sees each kernel launch (a `custom_op` under the
  interpreter: see ops/triton_registration.py).
- `DIFAttentionEager` / `DIFAttentionTritonEager`: the same bodies and autograd formula as
  autograd.Functions, which plain eager calls take instead of the operator dispatch (ops/eager.py).

The score streams are concatenated along the head dim ([q | qa_1 | …], [k | ka_1 | …]) so a
backend sees one QK head dim; their gradients are split back afterwards. A backend is any
object with the `AttentionKernels` methods. The dropout seed is an int64 tensor on the kernels'
device, read only by the kernels: no host sync, and a captured CUDA graph draws anew per replay.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch

from ..autograd_guard import no_second_derivative
from ..eager import eager_function
from ..triton_registration import triton_operator
from .options import AttentionOptions, forward_output_like


class AttentionKernels(Protocol):
    """What a fused backend provides (streams already concatenated; the backend takes any strides)."""

    name: str  # the `backend` value that selects it, for error messages

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions, seed: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """→ out (B,H,Lq,Dv), lse (B,H,Lq) fp32 base-2, acd (B,H,Lq) fp32 or None. seed: the int64
        0-dim Philox key on the kernels' device (None without dropout)."""
        ...

    @staticmethod
    def backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor], opts: AttentionOptions,
        seed: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
        domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ dq, dk, dv for the concatenated q, k and v (the forward's out, lse, acd and seed);
        acd and grad_acd (float32, float64 for float64 inputs) are given iff domains are."""
        ...


def draw_seed(device: torch.device | str = "cpu") -> int:
    """The value `draw_seed_tensor(device)` draws, as an int (tests: the seed a call will draw
    after the same torch.manual_seed; on CUDA this reads the device)."""
    return int(draw_seed_tensor(device).item())


def draw_seed_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """A dropout seed in [0, 2**63 - 1): an int64 0-dim tensor on `device`, drawn by torch's
    generator of that device, so torch.manual_seed reproduces a run and torch.compile traces it.

    On CUDA the draw is a device kernel of the CUDA generator: no host sync, and safe under
    CUDA-graph capture (each replay draws a fresh seed, hence fresh masks). On CPU it is the
    default CPU generator's draw. The kernels use it as the 64-bit Philox key and the element
    index as the counter (see `triton_fwd.dropout_keep`), so calls with different seeds share no
    random stream.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device)


class DIFAttentionFunction(torch.autograd.Function):
    """out, acd = f(q, k, v, *attr_q, *attr_k); acd is None unless domains are given. Kept for
    direct use with a kernels class (tests); `dif_attention` calls the operators below, which
    torch.compile can trace."""

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
        seed = draw_seed_tensor(q.device) if opts.has_dropout else None
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


def guarded_grads(kernels: AttentionKernels, opts: AttentionOptions, seed: Optional[torch.Tensor],
                  key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
                  saved: tuple[Optional[torch.Tensor], ...], dout: Optional[torch.Tensor],
                  grad_acd: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
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


def _first_order_grads(kernels: AttentionKernels, opts: AttentionOptions, seed: Optional[torch.Tensor],
                       key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
                       saved: tuple[Optional[torch.Tensor], ...], dout: Optional[torch.Tensor],
                       grad_acd: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """dq_cat, dk_cat, dv from the fused kernels (no guard)."""
    q_cat, k_cat, v, out, lse, acd = saved
    if dout is None:
        dout = torch.zeros_like(out)
    dout = dout.contiguous()
    if grad_acd is None or acd is None:  # acd unused downstream: its gradient term is zero
        acd, grad_acd, domains = None, None, None
    else:
        grad_acd = grad_acd.to(acd.dtype).contiguous()
    return kernels.backward(q_cat, k_cat, v, dout, out, lse, acd, grad_acd, opts, seed, key_padding_mask, domains)


# ---------------------------------------------------------------- the operators torch.compile sees
def kernels_of(backend: str) -> AttentionKernels:
    """The kernels behind `fastattn::dif_attention`'s backend argument ("cpp"; imported on first
    use). The Triton kernels have operators of their own (below)."""
    if backend == "cpp":
        from .cpp import CppAttentionKernels
        return CppAttentionKernels
    raise ValueError(f"fastattn::dif_attention: backend must be 'cpp' (the Triton kernels are the operator "
                     f"fastattn::dif_attention_triton), got {backend!r}")


def _domains(dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    return None if dom_q is None or dom_k is None else (dom_q, dom_k)


def _forward(kernels: AttentionKernels, q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor,
             key_padding_mask: Optional[torch.Tensor], dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor],
             seed: Optional[torch.Tensor], scale: float, causal: bool, dropout_p: float,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both forward operators' body: (out, lse, acd), acd (0,) without domains."""
    opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)
    out, lse, acd = kernels.forward(q_cat, k_cat, v, opts, seed, key_padding_mask, _domains(dom_q, dom_k))
    if acd is None or dom_q is None:
        acd = lse.new_empty((0,))
    return out, lse, acd


def _backward_kernels(kernels: AttentionKernels, q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor,
                      dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, acd: Optional[torch.Tensor],
                      grad_acd: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], dom_q: Optional[torch.Tensor],
                      dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor], scale: float, causal: bool,
                      dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both backward operators' body: dq_cat, dk_cat, dv."""
    opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)
    dq, dk, dv = kernels.backward(q_cat, k_cat, v, dout, out, lse, acd, grad_acd, opts, seed, key_padding_mask,
                                  _domains(dom_q, dom_k))
    # An operator's outputs may not alias its inputs (a kernel could return a view of one).
    return tuple(g.clone() if g._base is not None else g for g in (dq, dk, dv))  # type: ignore[return-value]


def _forward_fake(q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  dom_q: Optional[torch.Tensor], *_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_output_like(q_cat, v, dom_q is not None)


def _backward_fake(q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, *_: Any
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q_cat, k_cat, v))  # type: ignore[return-value]


def _dif_attention(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused decoupled attention on the concatenated streams q_cat (B,H,Lq,DQK), k_cat (B,H,Lk,DQK),
    v (B,H,Lk,DV) → out (B,H,Lq,DV) in q's dtype, lse (B,H,Lq) base-2 and acd (B,H,Lq), or (0,)
    without domains; lse/acd float32 (float64 for float64 inputs). seed: int64 0-dim CPU tensor,
    the Philox key (None: no dropout). backend: "cpp"."""
    return _forward(kernels_of(backend), q_cat, k_cat, v, key_padding_mask, dom_q, dom_k, seed, scale, causal,
                    dropout_p)


dif_attention_op = torch.library.custom_op("fastattn::dif_attention", _dif_attention, mutates_args=())
dif_attention_op.register_fake(_forward_fake)


def _dif_attention_backward(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_cat, dk_cat, dv of `fastattn::dif_attention` (an operator so that a traced backward
    reads the seed tensor only inside the kernel call); out, lse, acd: the forward's outputs (acd
    and grad_acd given iff dom_q, dom_k are)."""
    return _backward_kernels(kernels_of(backend), q_cat, k_cat, v, dout, out, lse, acd, grad_acd, key_padding_mask,
                             dom_q, dom_k, seed, scale, causal, dropout_p)


dif_attention_backward_op = torch.library.custom_op("fastattn::dif_attention_backward", _dif_attention_backward,
                                                    mutates_args=())
dif_attention_backward_op.register_fake(_backward_fake)


def _triton_kernels() -> AttentionKernels:
    from .triton_backend import TritonAttentionKernels  # imports triton: only when a Triton operator runs
    return TritonAttentionKernels


def _triton_forward_kernels() -> tuple[Any, ...]:
    from . import triton_fwd
    return triton_fwd.KERNELS


def _triton_backward_kernels() -> tuple[Any, ...]:
    from . import triton_bwd
    return triton_bwd.KERNELS


def _dif_attention_triton(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fastattn::dif_attention` on the Triton kernels (CUDA tensors; CPU ones under the
    interpreter): float32/float16/bfloat16 inputs, lse/acd float32. seed: int64 0-dim tensor on
    q's device (None: no dropout), read by the kernels only. No host read of any tensor value."""
    return _forward(_triton_kernels(), q_cat, k_cat, v, key_padding_mask, dom_q, dom_k, seed, scale, causal,
                    dropout_p)


dif_attention_triton_op = triton_operator("fastattn::dif_attention_triton", fake=_forward_fake,
                                          kernels=_triton_forward_kernels)(_dif_attention_triton)


def _dif_attention_triton_backward(
    q_cat: torch.Tensor, k_cat: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    dom_q: Optional[torch.Tensor], dom_k: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    scale: float, causal: bool, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_cat, dk_cat, dv of `fastattn::dif_attention_triton` (arguments as `dif_attention_backward`)."""
    return _backward_kernels(_triton_kernels(), q_cat, k_cat, v, dout, out, lse, acd, grad_acd, key_padding_mask,
                             dom_q, dom_k, seed, scale, causal, dropout_p)


dif_attention_triton_backward_op = triton_operator("fastattn::dif_attention_triton_backward", fake=_backward_fake,
                                                   kernels=_triton_backward_kernels)(_dif_attention_triton_backward)


# ---------------------------------------------------------------- one autograd formula for both
class _KernelsViaOperator:
    """`AttentionKernels.backward` through a backward operator (the C++ one takes the backend name
    as its last argument, the Triton one none), so a traced backward calls the operator."""

    def __init__(self, backward_op: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 backend_args: tuple[str, ...], name: str) -> None:
        self.backward_op, self.backend_args, self.name = backward_op, backend_args, name

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor], opts: AttentionOptions,
                 seed: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                 domains: Optional[tuple[torch.Tensor, torch.Tensor]],
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dom_q, dom_k = domains if domains is not None else (None, None)
        return self.backward_op(q, k, v, dout, out, lse, acd, grad_acd, key_padding_mask, dom_q, dom_k, seed,
                                opts.scale, opts.causal, opts.dropout_p, *self.backend_args)


def _autograd_formula(backward_op: Callable[..., Any]) -> tuple[Callable[..., None], Callable[..., Any]]:
    """(setup_context, backward) of a forward operator (inputs q_cat, k_cat, v, key_padding_mask,
    dom_q, dom_k, seed, scale, causal, dropout_p[, backend]) through `backward_op` (its backward
    operator, or that operator's body for the eager path), guarded by `guarded_grads`."""
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        q_cat, k_cat, v, key_padding_mask, dom_q, dom_k, seed, scale, causal, dropout_p, *backend_args = inputs
        out, lse, acd = output
        ctx.save_for_backward(q_cat, k_cat, v, out, lse, acd, key_padding_mask, dom_q, dom_k, seed)
        ctx.opts = AttentionOptions(scale=scale, causal=causal, dropout_p=dropout_p)
        ctx.backend_args, ctx.n_inputs = tuple(backend_args), len(inputs)

    def backward(ctx: Any, dout: Optional[torch.Tensor], _dlse: Optional[torch.Tensor],
                 grad_acd: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        q_cat, k_cat, v, out, lse, acd, key_padding_mask, dom_q, dom_k, seed = ctx.saved_tensors
        domains = _domains(dom_q, dom_k)
        name = ctx.backend_args[0] if ctx.backend_args else "triton"
        kernels = _KernelsViaOperator(backward_op, ctx.backend_args, name)
        dq, dk, dv = guarded_grads(kernels, ctx.opts, seed,  # type: ignore[arg-type]
                                   key_padding_mask, domains, (q_cat, k_cat, v, out, lse, acd if domains else None),
                                   dout, grad_acd if domains else None)
        return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)

    return setup_context, backward


def _register(forward_op: Any, backward_op: Callable[..., Any], forward_body: Callable[..., Any],
              backward_body: Callable[..., Any], name: str) -> type[torch.autograd.Function]:
    """Register the operator's autograd; return its eager twin (fastattn/ops/eager.py): the same
    bodies and formula without the operator dispatch."""
    setup_context, backward = _autograd_formula(backward_op)
    forward_op.register_autograd(backward, setup_context=setup_context)
    return eager_function(name, forward_body, *_autograd_formula(backward_body))


DIFAttentionEager = _register(dif_attention_op, dif_attention_backward_op, _dif_attention,
                              _dif_attention_backward, "DIFAttentionEager")
DIFAttentionTritonEager = _register(dif_attention_triton_op, dif_attention_triton_backward_op,
                                    _dif_attention_triton, _dif_attention_triton_backward,
                                    "DIFAttentionTritonEager")
