"""`DIFAttention`: the multi-head decoupled (DIF-SR) self-attention sublayer."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .._dispatch import BACKENDS
from ..functional import dif_attention
from .dropout import Dropout
from .checks import check_bool, check_choice, check_int, check_positive, check_probability

FUSIONS = ("sum", "concat", "gate")


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to `visible`; rows with no visible entry give 0 (no NaN)."""
    empty = ~visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    dtype = None if scores.dtype in (torch.float32, torch.float64) else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=dtype).to(scores.dtype)
    return probs.masked_fill(empty, 0.0)


class DIFAttention(torch.nn.Module):
    """Multi-head decoupled (DIF-SR) self-attention sublayer, with output projection, residual and LayerNorm.

    Streams, each projected and split into `heads` heads (B, H, L, d):

    - item: q, k, v = hidden W_q, hidden W_k, hidden W_v   (hidden → hidden, head dim d = hidden / heads)
    - position (``use_position=True``): q_p, k_p = position W_qp, position W_kp   (hidden → hidden, d)
    - attribute feature f: q_f, k_f = attributes[f] W_qf, attributes[f] W_kf
      (attribute_dims[f] → attribute_dims[f], head dim attribute_dims[f] / heads)

    Per head, with S_item = q kᵀ, S_pos = q_p k_pᵀ, S_f = q_f k_fᵀ (each (L, L))::

        fusion="sum":    S = S_item + S_pos + Σ_f S_f
        fusion="concat": S[i, :] = Linear([S_item[i, :] | S_pos[i, :] | S_1[i, :] | …])        (S·max_len → max_len)
        fusion="gate":   g[i] = softmax_streams(MLP(S_stream[i, :])),  S[i, :] = Σ_streams g[i]_s · S_s[i, :]
        P   = softmax_j(S / sqrt(d))  over visible keys (j <= i when causal, not padding); empty rows → 0
        ctx = dropout(P) v            (values from the item stream only)
        out = LayerNorm(hidden + dropout(ctx W_o + b_o))

    "sum" is one softmax of summed scores, so it runs on the fused kernel
    (`fastattn.dif_attention`, no L×L buffer; `backend` chooses it). "concat" and "gate" mix a
    row's scores across key positions and streams, which one softmax-of-sums cannot express: they
    run a plain torch path that materializes the (B, H, L, streams, max_len) scores, whatever
    `backend` says. They follow DIF-SR's official `DIFMultiHeadAttention` (concat: one Linear
    over the stacked score rows; gate: Linear–ReLU–Linear energy per stream, softmax over
    streams) with two deliberate differences: (1) scores of invisible keys (future, padding)
    are set to 0 *before* mixing — the official layer mixes them in, which leaks future items
    into a query's attention weights; (2) batches are left padded and shorter than max_len, so
    the key axis is zero-padded on the left to max_len: key slot max_len-1 is always the latest
    item, which makes the result independent of how much left padding a batch has.

    With ``use_position=False`` and no attribute_dims the layer is plain causal multi-head
    self-attention (SASRec) on the fused kernel.

    Args:
        hidden: model width D; heads: number of heads (must divide hidden and every attribute dim).
        attribute_dims: width of each attribute feature stream (may be empty).
        fusion: "sum" | "concat" | "gate".
        attn_dropout: dropout on attention probabilities (inside the kernel for "sum").
        hidden_dropout: dropout on the projected output before the residual.
        layer_norm_eps: LayerNorm epsilon.
        backend: "auto" | "triton" | "cpp" | "torch", passed to `fastattn.dif_attention`.
        use_position: add the position score stream (forward then requires `position`).
        causal: key j visible to query i iff j <= i.
        max_len: longest sequence; required by "concat" and "gate" (their mixing layers are
            sized by it), optional otherwise.

    forward(hidden (B, L, D), position (B, L, D) or None, attributes: sequence of (B, L, Da_f),
    key_padding_mask (B, L) bool, True = padding) → (B, L, D).

    Optional keyword arguments of forward (AutoCDSR): ``domains`` (B, L) integer domain ids makes
    the layer return ``(output, acd)`` with acd (B, H, L) float32 = Σ_j P_ij [dom(i) != dom(j)]
    (pre-dropout P, computed inside the fused kernel; only for fusion "sum", else ValueError);
    ``causal`` (bool) overrides the constructor's causal flag for this call.
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        attribute_dims: Sequence[int] = (),
        fusion: str = "sum",
        attn_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        backend: str = "auto",
        *,
        use_position: bool = True,
        causal: bool = True,
        max_len: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_int("hidden", hidden)
        check_int("heads", heads)
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if isinstance(attribute_dims, (int, str, torch.Tensor)):
            raise ValueError(f"attribute_dims must be a sequence of ints (one per feature), got {attribute_dims!r}")
        dims = tuple(attribute_dims)
        for f, dim in enumerate(dims):
            check_int(f"attribute_dims[{f}]", dim)
            if dim % heads != 0:
                raise ValueError(f"attribute_dims[{f}] ({dim}) must be divisible by heads ({heads})")
        check_choice("fusion", fusion, FUSIONS)
        check_probability("attn_dropout", attn_dropout)
        check_probability("hidden_dropout", hidden_dropout)
        check_positive("layer_norm_eps", layer_norm_eps)
        check_choice("backend", backend, BACKENDS)
        check_bool("use_position", use_position)
        check_bool("causal", causal)
        if fusion != "sum" and max_len is None:
            raise ValueError(f"max_len is required for fusion={fusion!r} (its mixing layer is sized by it)")
        if max_len is not None:
            check_int("max_len", max_len)
        self.hidden, self.heads, self.attribute_dims = hidden, heads, dims
        self.head_dim = hidden // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.fusion, self.attn_dropout, self.backend = fusion, float(attn_dropout), backend
        self.use_position, self.causal, self.max_len = use_position, causal, max_len

        self.in_proj = torch.nn.Linear(hidden, 3 * hidden)  # [q | k | v] of the item stream
        self.pos_proj = torch.nn.Linear(hidden, 2 * hidden) if use_position else None  # [q_p | k_p]
        self.attr_proj = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * dim) for dim in dims)  # [q_f | k_f]
        streams = 1 + int(self.use_position) + len(dims)
        self.fusion_layer: Optional[torch.nn.Module] = None
        if fusion == "concat":
            self.fusion_layer = torch.nn.Linear(streams * max_len, max_len)
        elif fusion == "gate":
            self.fusion_layer = torch.nn.Sequential(
                torch.nn.Linear(max_len, max_len), torch.nn.ReLU(), torch.nn.Linear(max_len, 1))
        self.dense = torch.nn.Linear(hidden, hidden)
        self.out_dropout = Dropout(hidden_dropout, backend=backend)
        self.norm = torch.nn.LayerNorm(hidden, eps=layer_norm_eps)

    def _split_heads(self, x: torch.Tensor, parts: int, dim: int) -> tuple[torch.Tensor, ...]:
        """(B, L, parts·H·dim) → `parts` tensors (B, H, L, dim)."""
        b, length, _ = x.shape
        return x.view(b, length, parts, self.heads, dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _check_inputs(self, hidden: torch.Tensor, position: Optional[torch.Tensor],
                      attributes: Sequence[torch.Tensor], key_padding_mask: Optional[torch.Tensor]) -> None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self.hidden:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"hidden must have shape (B, L, {self.hidden}), got {shape}")
        b, length, _ = hidden.shape
        if self.use_position:
            if position is None:
                raise ValueError("position (B, L, hidden) is required: this layer was built with use_position=True")
            if position.shape != hidden.shape:
                raise ValueError(f"position must have shape {tuple(hidden.shape)}, got {tuple(position.shape)}")
        elif position is not None:
            raise ValueError("position was given but this layer was built with use_position=False")
        if len(attributes) != len(self.attribute_dims):
            raise ValueError(f"attributes must hold {len(self.attribute_dims)} tensors (one per attribute_dims "
                             f"entry), got {len(attributes)}")
        for f, (a, dim) in enumerate(zip(attributes, self.attribute_dims)):
            if a.shape != (b, length, dim):
                raise ValueError(f"attributes[{f}] must have shape (B={b}, L={length}, {dim}), got {tuple(a.shape)}")
        if key_padding_mask is not None and (not isinstance(key_padding_mask, torch.Tensor)
                                             or key_padding_mask.dtype != torch.bool
                                             or key_padding_mask.shape != (b, length)):
            got = (f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                   if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__)
            raise ValueError(f"key_padding_mask must be a bool tensor of shape (B={b}, L={length}) (True = padding; "
                             f"convert an integer mask with mask.bool()), got {got}")
        if self.fusion != "sum" and length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len} of fusion={self.fusion!r}")

    def forward(
        self,
        hidden: torch.Tensor,
        position: Optional[torch.Tensor] = None,
        attributes: Sequence[torch.Tensor] = (),
        key_padding_mask: Optional[torch.Tensor] = None,
        *,
        domains: Optional[torch.Tensor] = None,
        causal: Optional[bool] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(attributes, torch.Tensor):
            raise TypeError(f"attributes must be a sequence of (B, L, Da_f) tensors, one per attribute_dims entry, "
                            f"got a single tensor of shape {tuple(attributes.shape)} (wrap it in a list)")
        attributes = tuple(attributes)
        self._check_inputs(hidden, position, attributes, key_padding_mask)
        if domains is not None and self.fusion != "sum":
            raise ValueError(f"domains (the a_cd output) needs fusion='sum' (the fused kernel), "
                             f"but this layer has fusion={self.fusion!r}")
        if causal is not None and not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool or None, got {causal!r}")
        is_causal = self.causal if causal is None else causal
        b, length, _ = hidden.shape
        q, k, v = self._split_heads(self.in_proj(hidden), 3, self.head_dim)
        attr_q: list[torch.Tensor] = []
        attr_k: list[torch.Tensor] = []
        if self.pos_proj is not None:
            pq, pk = self._split_heads(self.pos_proj(position), 2, self.head_dim)
            attr_q.append(pq)
            attr_k.append(pk)
        for proj, a, dim in zip(self.attr_proj, attributes, self.attribute_dims):
            aq, ak = self._split_heads(proj(a), 2, dim // self.heads)
            attr_q.append(aq)
            attr_k.append(ak)
        dropout_p = self.attn_dropout if self.training else 0.0
        acd: Optional[torch.Tensor] = None
        if self.fusion == "sum":
            result = dif_attention(q, k, v, attr_q, attr_k, causal=is_causal, key_padding_mask=key_padding_mask,
                                   scale=self.scale, dropout_p=dropout_p, domains=domains, backend=self.backend)
            context, acd = result if domains is not None else (result, None)
        else:
            context = self._mixed_attention(q, k, v, attr_q, attr_k, key_padding_mask, dropout_p, is_causal)
        context = context.transpose(1, 2).reshape(b, length, self.hidden)
        out = self.norm(hidden + self.out_dropout(self.dense(context)))
        return out if acd is None else (out, acd)

    def _mixed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attr_q: Sequence[torch.Tensor], attr_k: Sequence[torch.Tensor],
                         key_padding_mask: Optional[torch.Tensor], dropout_p: float,
                         causal: Optional[bool] = None) -> torch.Tensor:
        """Torch path of "concat"/"gate": materializes the per-stream scores (B, H, L, S, max_len)."""
        b, _, length, _ = q.shape
        assert self.fusion_layer is not None and self.max_len is not None
        per_stream = [q @ k.transpose(-1, -2)] + [qa @ ka.transpose(-1, -2) for qa, ka in zip(attr_q, attr_k)]
        scores = torch.stack(per_stream, dim=-2)  # (B, H, Lq, S, Lk)
        visible = torch.ones(b, 1, length, length, dtype=torch.bool, device=q.device)
        if self.causal if causal is None else causal:
            visible = visible & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if key_padding_mask is not None:
            visible = visible & ~key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(~visible.unsqueeze(-2), 0.0)  # invisible keys never reach the mixer
        pad = self.max_len - length
        scores = torch.nn.functional.pad(scores, (pad, 0))  # key slot max_len-1 = latest item
        if self.fusion == "concat":
            fused = self.fusion_layer(scores.flatten(-2))  # (B, H, Lq, max_len)
        else:
            gate = torch.softmax(self.fusion_layer(scores).squeeze(-1), dim=-1)  # (B, H, Lq, S)
            fused = (scores * gate.unsqueeze(-1)).sum(dim=-2)
        probs = _masked_softmax(fused[..., pad:] * self.scale, visible)
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return probs @ v

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, heads={self.heads}, attribute_dims={self.attribute_dims}, "
                f"fusion={self.fusion!r}, use_position={self.use_position}, causal={self.causal}, "
                f"max_len={self.max_len}, attn_dropout={self.attn_dropout}, backend={self.backend!r}")
