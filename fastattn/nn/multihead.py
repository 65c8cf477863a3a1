"""`MultiheadAttention`: a drop-in for `torch.nn.MultiheadAttention` on the fused kernel."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as torch_F

from .._dispatch import BACKENDS
from ..functional import dif_attention
from .checks import check_choice, check_int, check_probability, visible_keys, warn_once


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention` that runs `fastattn.dif_attention` (no L×S buffer).

    A subclass of torch's module: same constructor, same parameters (`in_proj_weight`,
    `in_proj_bias`, `out_proj.weight`, `out_proj.bias`, or `q_proj_weight`/`k_proj_weight`/
    `v_proj_weight` when kdim/vdim differ from embed_dim), same initialization, so
    `load_state_dict` works both ways and `isinstance(m, torch.nn.MultiheadAttention)` holds.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) → (attn_output, weights or None), with torch's
    shapes: query (L, N, E) or (N, L, E) with ``batch_first=True`` (or unbatched (L, E)), key
    (S, N, kdim), value (S, N, vdim); attn_output like query.

    Fused (the kernel runs):
      - ``key_padding_mask`` (N, S): bool (True = padding) or additive with entries 0 / -inf
        (or <= -1e4, which underflows exactly like -inf);
      - ``attn_mask`` None, or the causal pattern (key j visible to query i iff j <= i) as a bool
        (L, S) mask (True = hidden, ``~torch.ones(L, S).tril().bool()``), as an additive one
        (``torch.nn.Transformer.generate_square_subsequent_mask``), or as (N·num_heads, L, S)
        copies of it; ``is_causal=True`` means causal without a mask (with a mask it is taken as
        the hint that the mask is causal, unchecked, as torch does);
      - ``need_weights=False`` (or ``ignore_need_weights=True`` at construction: the caller
        discards the weights, so need_weights=True returns None for them and stays fused);
      - dropout on the attention probabilities in training (inside the kernel).
    Runs torch's own forward (correct, not fused), with a warning the first time per reason:
    need_weights=True, any other attn_mask (a non-causal pattern, a soft additive bias),
    ``add_bias_kv=True``, ``add_zero_attn=True``, nested tensors.

    One difference from torch: a query row whose keys are all masked gives attention output 0
    (so attn_output = out_proj.bias there) where torch gives NaN.

    Extra keyword-only arguments: ``backend`` ("auto" | "triton" | "cpp" | "torch", as in
    `fastattn.dif_attention`) and ``ignore_need_weights``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, *, backend: str = "auto",
                 ignore_need_weights: bool = False) -> None:
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        check_probability("dropout", dropout)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None:
                check_int(name, dim)
        check_choice("backend", backend, BACKENDS)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend
        self.ignore_need_weights = bool(ignore_need_weights)

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, *, backend: str = "auto",
                   ignore_need_weights: bool = False) -> "MultiheadAttention":
        """A fastattn module with `module`'s configuration and (shared, not copied) parameters."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        ref = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device=ref.device, dtype=ref.dtype,
                  backend=backend, ignore_need_weights=ignore_need_weights)
        for name, param in module.named_parameters(recurse=True):
            owner, _, leaf = name.rpartition(".")
            setattr(new.get_submodule(owner) if owner else new, leaf, param)
        new.train(module.training)
        return new

    def _causal_from_mask(self, attn_mask: torch.Tensor, lq: int, lk: int, batch: int) -> Optional[str]:
        """None if attn_mask is the causal pattern (bool or additive, 2-D or per batch·head), else the reason."""
        if attn_mask.dim() == 3:
            if attn_mask.shape != (batch * self.num_heads, lq, lk):
                raise ValueError(f"attn_mask must have shape (L={lq}, S={lk}) or (N*num_heads="
                                 f"{batch * self.num_heads}, L={lq}, S={lk}), got {tuple(attn_mask.shape)}")
        elif attn_mask.dim() != 2 or attn_mask.shape != (lq, lk):
            raise ValueError(f"attn_mask must have shape (L={lq}, S={lk}) or (N*num_heads, L, S), "
                             f"got {tuple(attn_mask.shape)}")
        visible = visible_keys(attn_mask, "attn_mask")
        if visible is None:
            return "attn_mask is a soft additive bias (entries other than 0 and -inf)"
        causal = torch.ones(lq, lk, dtype=torch.bool, device=attn_mask.device).tril()
        if not bool((visible == causal).all()):
            return "attn_mask is not the causal pattern (key j visible to query i iff j <= i)"
        return None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        def torch_forward(reason: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            return self._torch_forward(reason, query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)

        if need_weights and not self.ignore_need_weights:
            return torch_forward("need_weights=True (pass need_weights=False, or build the module with "
                                 "ignore_need_weights=True when the weights are discarded)")
        if self.bias_k is not None or self.add_zero_attn:
            return torch_forward("add_bias_kv / add_zero_attn are not fused")
        if query.is_nested or key.is_nested or value.is_nested:
            return torch_forward("nested tensors are not fused")
        q_in, k_in, v_in, batched = self._batch_first(query, key, value)
        n, lq, e = q_in.shape
        lk = k_in.shape[1]
        if attn_mask is not None and not is_causal:
            reason = self._causal_from_mask(attn_mask, lq, lk, n)
            if reason is not None:
                return torch_forward(reason)
        causal = bool(is_causal) or attn_mask is not None
        padding: Optional[torch.Tensor] = None
        if key_padding_mask is not None:
            kpm = key_padding_mask if batched else key_padding_mask.unsqueeze(0)
            if kpm.shape != (n, lk):
                raise ValueError(f"key_padding_mask must have shape (N={n}, S={lk}), got "
                                 f"{tuple(key_padding_mask.shape)}")
            visible = visible_keys(kpm, "key_padding_mask")
            if visible is None:
                return torch_forward("key_padding_mask is a soft additive bias (entries other than 0 and -inf)")
            padding = ~visible

        q, k, v = self._project(q_in, k_in, v_in)
        heads, d = self.num_heads, self.head_dim
        q, k, v = (t.view(n, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (N, H, L, d)
        context = dif_attention(q, k, v, causal=causal, key_padding_mask=padding,
                                dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        out = self.out_proj(context.transpose(1, 2).reshape(n, lq, e))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _torch_forward(self, reason: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor], need_weights: bool,
                       attn_mask: Optional[torch.Tensor], average_attn_weights: bool,
                       is_causal: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """torch's own forward (saying why, once per reason)."""
        warn_once(f"fastattn.nn.MultiheadAttention runs torch's attention: {reason}")
        mask, hint = attn_mask, is_causal
        if is_causal and attn_mask is None:  # torch needs the mask itself with the is_causal hint
            length_dim = 1 if (self.batch_first and query.dim() == 3) else 0
            lq, lk = query.shape[length_dim], key.shape[length_dim]
            mask = ~torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
            hint = False
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=mask, average_attn_weights=average_attn_weights, is_causal=hint)

    def _batch_first(self, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """query, key, value as (N, L, E) batch-first views, checked against the module's dims, and
        whether the call was batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                raise ValueError(f"{name} must be a 2-D (unbatched) or 3-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be batched (3-D) or all unbatched (2-D), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        if not batched:
            q_in, k_in, v_in = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, _, e = q_in.shape
        if e != self.embed_dim:
            raise ValueError(f"query must have embed_dim={self.embed_dim} features, got {e}")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != n:
            raise ValueError(f"key and value must share (batch, length) with query's batch {n}, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if k_in.shape[2] != self.kdim or v_in.shape[2] != self.vdim:
            raise ValueError(f"key / value must have kdim={self.kdim} / vdim={self.vdim} features, got "
                             f"{k_in.shape[2]} / {v_in.shape[2]}")
        return q_in, k_in, v_in, batched

    def _project(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v input projections (N, L, E) with torch's weight layout."""
        e = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self attention: one matmul
                return torch_F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return (torch_F.linear(query, w_q, b_q), torch_F.linear(key, w_k, b_k),
                torch_F.linear(value, w_v, b_v))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")
