"""nn.Module forms of the functional API: `DIFAttention`, `MultiheadAttention` and `FullItemCrossEntropy`."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as torch_F

from ._dispatch import BACKENDS
from .functional import dif_attention, full_item_cross_entropy
from .ops.cross_entropy.targets import SoftTarget

FUSIONS = ("sum", "concat", "gate")


class FullItemCrossEntropy(torch.nn.Module):
    """Module form of `fastattn.full_item_cross_entropy` (same options, same math).

    forward(hidden (..., D), item_weight (V, D), target, bias=None) → loss (float32).
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, temperature: float = 1.0,
                 reduction: str = "mean", backend: str = "auto", grad_filter: float = 0.0) -> None:
        super().__init__()
        self.ignore_index, self.label_smoothing, self.temperature = ignore_index, label_smoothing, temperature
        self.reduction, self.backend, self.grad_filter = reduction, backend, grad_filter

    def forward(self, hidden: torch.Tensor, item_weight: torch.Tensor, target: Union[torch.Tensor, SoftTarget],
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return full_item_cross_entropy(
            hidden, item_weight, target, bias=bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, temperature=self.temperature,
            reduction=self.reduction, backend=self.backend, grad_filter=self.grad_filter)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"grad_filter={self.grad_filter}")


# ---------------------------------------------------------------- DIF-SR attention layer
def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_probability(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


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
        _check_int("hidden", hidden)
        _check_int("heads", heads)
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if isinstance(attribute_dims, (int, str, torch.Tensor)):
            raise ValueError(f"attribute_dims must be a sequence of ints (one per feature), got {attribute_dims!r}")
        dims = tuple(attribute_dims)
        for f, dim in enumerate(dims):
            _check_int(f"attribute_dims[{f}]", dim)
            if dim % heads != 0:
                raise ValueError(f"attribute_dims[{f}] ({dim}) must be divisible by heads ({heads})")
        _check_choice("fusion", fusion, FUSIONS)
        _check_probability("attn_dropout", attn_dropout)
        _check_probability("hidden_dropout", hidden_dropout)
        _check_positive("layer_norm_eps", layer_norm_eps)
        _check_choice("backend", backend, BACKENDS)
        _check_bool("use_position", use_position)
        _check_bool("causal", causal)
        if fusion != "sum" and max_len is None:
            raise ValueError(f"max_len is required for fusion={fusion!r} (its mixing layer is sized by it)")
        if max_len is not None:
            _check_int("max_len", max_len)
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
        self.out_dropout = torch.nn.Dropout(hidden_dropout)
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


# ---------------------------------------------------------------- torch.nn.MultiheadAttention drop-in
# Additive mask entries at or below this underflow exp() in fp32 after max-subtraction (exp(-1e4) == 0),
# so they hide a key exactly like -inf; RecBole's masks use -10000.
_MASKED_AT_OR_BELOW = -1e4
_warned_reasons: set[str] = set()


def warn_once(message: str) -> None:
    """warnings.warn(message) the first time this process sees it: fallbacks say so once, not per call."""
    if message not in _warned_reasons:
        _warned_reasons.add(message)
        warnings.warn(message, stacklevel=3)


def visible_keys(mask: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """True where a mask lets a key through: bool masks (True = hidden) or additive masks whose entries are
    0 (visible) or <= -1e4 / -inf (hidden). None for any other additive mask (a soft bias, not a mask)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or float tensor (as in torch.nn.MultiheadAttention), got {mask.dtype}; "
                        "convert an integer mask with mask.bool() if nonzero means hidden")
    visible = mask == 0
    if not bool((visible | (mask <= _MASKED_AT_OR_BELOW)).all()):
        return None
    return visible


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
        _check_int("embed_dim", embed_dim)
        _check_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        _check_probability("dropout", dropout)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None:
                _check_int(name, dim)
        _check_choice("backend", backend, BACKENDS)
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
            warn_once(f"fastattn.nn.MultiheadAttention runs torch's attention: {reason}")
            mask, hint = attn_mask, is_causal
            if is_causal and attn_mask is None:  # torch needs the mask itself with the is_causal hint
                length_dim = 1 if (self.batch_first and query.dim() == 3) else 0
                lq, lk = query.shape[length_dim], key.shape[length_dim]
                mask = ~torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
                hint = False
            return super(MultiheadAttention, self).forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=mask, average_attn_weights=average_attn_weights, is_causal=hint)

        if need_weights and not self.ignore_need_weights:
            return torch_forward("need_weights=True (pass need_weights=False, or build the module with "
                                 "ignore_need_weights=True when the weights are discarded)")
        if self.bias_k is not None or self.add_zero_attn:
            return torch_forward("add_bias_kv / add_zero_attn are not fused")
        if query.is_nested or key.is_nested or value.is_nested:
            return torch_forward("nested tensors are not fused")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                raise ValueError(f"{name} must be a 2-D (unbatched) or 3-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be batched (3-D) or all unbatched (2-D), got "
                             f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        # Work batch first: (N, L, E).
        if not batched:
            q_in, k_in, v_in = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, e = q_in.shape
        lk = k_in.shape[1]
        if e != self.embed_dim:
            raise ValueError(f"query must have embed_dim={self.embed_dim} features, got {e}")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != n:
            raise ValueError(f"key and value must share (batch, length) with query's batch {n}, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if k_in.shape[2] != self.kdim or v_in.shape[2] != self.vdim:
            raise ValueError(f"key / value must have kdim={self.kdim} / vdim={self.vdim} features, got "
                             f"{k_in.shape[2]} / {v_in.shape[2]}")

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
