"""Functional API of fastattn: validation, backend dispatch and the math in the docstrings."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._dispatch import resolve_backend
from .ops.attention.function import DIFAttentionFunction
from .ops.attention.options import AttentionOptions
from .ops.attention.reference import dif_attention_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Widest concatenated QK / V head dim the Triton tiles take (see ops/attention/triton_fwd.py).
_TRITON_MAX_HEAD_DIM = 256

Domains = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _check_4d(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    return t


def _validate_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attr_q: Sequence[torch.Tensor], attr_k: Sequence[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor], dropout_p: float, scale: Optional[float],
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t)
    if len(attr_q) != len(attr_k):
        raise ValueError(f"attr_q and attr_k must have the same length, got {len(attr_q)} and {len(attr_k)}")
    named = [("q", q), ("k", k), ("v", v)]
    named += [(f"attr_q[{i}]", _check_4d(f"attr_q[{i}]", t)) for i, t in enumerate(attr_q)]
    named += [(f"attr_k[{i}]", _check_4d(f"attr_k[{i}]", t)) for i, t in enumerate(attr_k)]
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all streams must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    b, h, lq, dk = q.shape
    lk = k.shape[2]
    if k.shape[:2] != (b, h) or k.shape[3] != dk:
        raise ValueError(f"k must have shape (B={b}, H={h}, Lk, Dk={dk}), got {tuple(k.shape)}")
    if v.shape[:3] != (b, h, lk):
        raise ValueError(f"v must have shape (B={b}, H={h}, Lk={lk}, Dv), got {tuple(v.shape)}")
    for i, (qa, ka) in enumerate(zip(attr_q, attr_k)):
        if qa.shape[:3] != (b, h, lq):
            raise ValueError(f"attr_q[{i}] must have shape (B={b}, H={h}, Lq={lq}, Da), got {tuple(qa.shape)}")
        if ka.shape[:3] != (b, h, lk) or ka.shape[3] != qa.shape[3]:
            raise ValueError(
                f"attr_k[{i}] must have shape (B={b}, H={h}, Lk={lk}, Da={qa.shape[3]}), got {tuple(ka.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (b, lk):
            raise ValueError(f"key_padding_mask must have shape (B={b}, Lk={lk}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")


def dif_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attr_q: Sequence[torch.Tensor] = (),
    attr_k: Sequence[torch.Tensor] = (),
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    domains: Optional[Domains] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decoupled (DIF-SR) attention: several score streams summed inside one softmax.

    Shapes follow `torch.nn.functional.scaled_dot_product_attention`:

    - q (B, H, Lq, Dk), k (B, H, Lk, Dk), v (B, H, Lk, Dv): the item stream; values come from it only.
    - attr_q / attr_k: equally long sequences of (B, H, Lq, Da_f) / (B, H, Lk, Da_f) tensors,
      one pair per extra score stream (position, each attribute); every Da_f may differ and
      need not be a power of two.
    - key_padding_mask: optional bool (B, Lk), True = padding key.
    - dtypes: float32, float16 or bfloat16 (float64 on backend="torch"), all streams alike;
      accumulation is float32, the output has the input dtype.

    Math, for keys j visible to query i (j <= i when causal, not padding)::

        S_ij  = scale · (q_i·k_j + Σ_f qa_f,i·ka_f,j)     (scale defaults to 1/sqrt(Dk))
        P_i   = softmax_j(S_i)                            (a row with no visible key: P_i = 0)
        out_i = Σ_j dropout(P)_ij v_j

    Dropout (dropout_p > 0) is applied to P inside the kernel with a counter-based RNG seeded
    from torch's default generator, so `torch.manual_seed` reproduces a run, and the backward
    regenerates the same mask. Gradients flow to every input tensor that requires them.

    backend: "auto" (Triton for CUDA tensors, else the torch reference), "triton" (fused
    flash-style kernels; on a CPU only under TRITON_INTERPRET=1) or "torch" (the reference that
    materializes the Lq×Lk scores). An explicit backend that cannot run raises
    `fastattn.BackendUnavailable` with the reason.

    Returns out (B, H, Lq, Dv).
    """
    if isinstance(attr_q, torch.Tensor) or isinstance(attr_k, torch.Tensor):
        raise TypeError("attr_q and attr_k must be sequences of tensors (wrap a single stream in a tuple)")
    attr_q, attr_k = tuple(attr_q), tuple(attr_k)
    _validate_attention(q, k, v, attr_q, attr_k, key_padding_mask, dropout_p, scale)
    if domains is not None:
        raise NotImplementedError("domains= (the cross-domain attention mass a_cd) is not implemented yet")
    opts = AttentionOptions(
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        causal=bool(causal),
        dropout_p=float(dropout_p),
    )
    streams = (q, k, v, *attr_q, *attr_k)
    dqk = q.shape[-1] + sum(a.shape[-1] for a in attr_q)
    too_wide = None
    if max(dqk, v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
        too_wide = (f"the summed QK head dim ({dqk}) and the V head dim ({v.shape[-1]}) must each be "
                    f"<= {_TRITON_MAX_HEAD_DIM} for the Triton tiles")
    chosen = resolve_backend(backend, streams, too_wide)
    if chosen == "torch":
        out, _ = dif_attention_reference(q, k, v, attr_q, attr_k, opts, key_padding_mask)
        return out
    from .ops.attention.triton_backend import TritonAttentionKernels

    out, _ = DIFAttentionFunction.apply(
        TritonAttentionKernels, opts, key_padding_mask, None, q, k, v, *attr_q, *attr_k
    )
    return out
