"""Functional API of fastattn: validation, backend dispatch and the math in the docstrings."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._autocast import autocast_device, autocast_inputs, autocast_off
from ._dispatch import BackendUnavailable, resolve_backend
from .ops.attention.op import BACKENDS as ATTENTION_BACKENDS
from .ops._common import MAX_HIDDEN_DIM, MAX_QK_DIM, MAX_V_DIM
from .ops.attention.options import AttentionOptions
from .ops.checks import check_values, is_finite_number
from .ops.dropout import philox_dropout, philox_dropout_applies
from .ops.cross_entropy import cpp as _cross_entropy_cpp  # noqa: F401  (the C++ operators' fakes)
from .ops.cross_entropy.function import RowTargets, full_item_cross_entropy_rows
from .ops.cross_entropy.targets import SoftTarget, validate_soft_target
from .ops.topk.op import BACKENDS as TOPK_BACKENDS

# SoftTarget and BackendUnavailable are re-exported: this is the path models and integrations use
# (they import nothing from fastattn.ops).
__all__ = ["BackendUnavailable", "SoftTarget", "dif_attention", "full_item_cross_entropy", "topk_items"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Domains = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _check_4d(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(t.shape)}")
    if t.shape[3] == 0:
        raise ValueError(f"{name} has head dim D = 0 (shape {tuple(t.shape)}): every stream needs D >= 1")
    return t


def _validate_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attr_q: Sequence[torch.Tensor], attr_k: Sequence[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor], dropout_p: float, scale: Optional[float], causal: bool,
) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
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
            # As torch.nn.MultiheadAttention and scaled_dot_product_attention (torch 2.13): an integer
            # mask is ambiguous (1 = padding here, 1 = token in e.g. an `attention_mask`).
            raise TypeError(f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}; "
                            "convert with mask.bool() if nonzero means padding")
        if key_padding_mask.shape != (b, lk):
            raise ValueError(f"key_padding_mask must have shape (B={b}, Lk={lk}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not is_finite_number(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")


def _normalize_domains(domains: object, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dom_q (B,Lq), dom_k (B,Lk)) int64 contiguous from a (B,L) tensor or a pair; raises on bad input."""
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    if isinstance(domains, torch.Tensor):
        if lq != lk:
            raise ValueError(f"domains must be a pair (dom_q (B,Lq), dom_k (B,Lk)) when Lq ({lq}) != Lk ({lk})")
        pair = (("domains", domains), ("domains", domains))
    elif isinstance(domains, (tuple, list)) and len(domains) == 2:
        pair = (("domains[0]", domains[0]), ("domains[1]", domains[1]))
    else:
        raise TypeError("domains must be a (B, L) integer tensor or a pair (dom_q (B,Lq), dom_k (B,Lk)), "
                        f"got {type(domains).__name__}")
    out = []
    for (name, t), length in zip(pair, (lq, lk)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64 domain ids), got {t.dtype}")
        if t.shape != (b, length):
            raise ValueError(f"{name} must have shape (B={b}, L={length}), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        out.append(t.to(torch.int64).contiguous())
    return out[0], out[1]


# Over 60 lines only by its docstring, the API reference; the body is under 50.
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
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Decoupled (DIF-SR) attention: several score streams summed inside one softmax.

    Shapes follow `torch.nn.functional.scaled_dot_product_attention`:

    - q (B, H, Lq, Dk), k (B, H, Lk, Dk), v (B, H, Lk, Dv): the item stream; values come from it only.
    - attr_q / attr_k: equally long sequences of (B, H, Lq, Da_f) / (B, H, Lk, Da_f) tensors,
      one pair per extra score stream (position, each attribute); every Da_f may differ and
      need not be a power of two.
    - key_padding_mask: optional bool (B, Lk), True = padding key.
    - domains: optional integer (B, L) domain ids for self attention, or a pair
      (dom_q (B, Lq), dom_k (B, Lk)) for cross attention; then the cross-domain attention
      mass is returned too (AutoCDSR's a_cd).
    - dtypes: float32, float16 or bfloat16 (float64 on backend="cpp" or "torch"), all streams alike;
      accumulation is float32, the output has the input dtype. Under `torch.autocast` the
      float inputs (not float64) are first cast to the autocast dtype, as for
      F.scaled_dot_product_attention (fastattn/_autocast.py), so the output has that dtype.

    Math, for keys j visible to query i (j <= i when causal, not padding)::

        S_ij  = scale · (q_i·k_j + Σ_f qa_f,i·ka_f,j)     (scale defaults to 1/sqrt(Dk))
        P_i   = softmax_j(S_i)                            (a row with no visible key: P_i = 0)
        out_i = Σ_j dropout(P)_ij v_j
        acd_i = Σ_j P_ij · [dom_q(i) != dom_k(j)]         (pre-dropout P; 0 on empty rows)

    acd is computed inside the same kernel (one extra multiply-add per score) and has an exact
    gradient: dS_ij gains g_i · P_ij · ([dom_q(i) != dom_k(j)] − acd_i).

    Dropout (dropout_p > 0) is applied to P inside the kernel with a counter-based RNG seeded
    from torch's default generator, so `torch.manual_seed` reproduces a run, and the backward
    regenerates the same mask. Gradients flow to every input tensor that requires them. The fused
    backends are differentiable once: differentiating their gradients again (create_graph=True)
    raises RuntimeError; backend="torch" gives higher-order gradients.

    Any layout is accepted for every tensor (transposed, sliced with a step, expanded with stride
    0; e.g. a sequence-first `(tokens == 0).T` mask) with the same result as contiguous copies.
    Edge input: B, H, Lq or Lk = 0 give empty or all-zero outputs and gradients; a query with no
    visible key gets out = 0, acd = 0 and zero gradients (never NaN); a head dim of 0, a
    non-bool `causal` or a non-bool mask (as in torch.nn.MultiheadAttention) raise, naming the
    argument. NaN/Inf in q reach only that query's row; in k only rows that see that key; NaN/Inf
    in v can reach every row of its (batch, head), even rows that cannot see the key (0·NaN, as in
    torch's scaled_dot_product_attention).

    backend: "auto" (Triton for CUDA tensors, the C++ kernels for CPU tensors, else the torch
    reference), "triton" (fused flash-style kernels; on a CPU only under TRITON_INTERPRET=1),
    "cpp" (fused C++ CPU kernels, compiled at install or on first use) or "torch" (the
    reference that materializes the Lq×Lk scores). An explicit backend that cannot run raises
    `fastattn.BackendUnavailable` with the reason.

    Returns out (B, H, Lq, Dv); with domains, (out, acd) with acd (B, H, Lq) float32.
    """
    if isinstance(attr_q, torch.Tensor) or isinstance(attr_k, torch.Tensor):
        raise TypeError("attr_q and attr_k must be sequences of tensors (wrap a single stream in a tuple)")
    attr_q, attr_k = tuple(attr_q), tuple(attr_k)
    amp = autocast_device(q)
    if amp is not None:  # torch.autocast: cast inputs, rerun with autocast off (fastattn/_autocast.py)
        with autocast_off(amp):
            q, k, v, *attrs = autocast_inputs((q, k, v, *attr_q, *attr_k), amp)
            return dif_attention(q, k, v, attrs[:len(attr_q)], attrs[len(attr_q):], causal=causal,
                                 key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                                 domains=domains, backend=backend)
    _validate_attention(q, k, v, attr_q, attr_k, key_padding_mask, dropout_p, scale, causal)
    domain_pair = _normalize_domains(domains, q, k) if domains is not None else None
    opts = AttentionOptions(
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        causal=causal,
        dropout_p=float(dropout_p),
    )
    streams = (q, k, v, *attr_q, *attr_k)
    dqk = q.shape[-1] + sum(a.shape[-1] for a in attr_q)
    too_wide = None
    if dqk > MAX_QK_DIM or v.shape[-1] > MAX_V_DIM:
        too_wide = (f"the fused tiles take a summed QK head dim <= {MAX_QK_DIM} and a V head dim <= "
                    f"{MAX_V_DIM}, got {dqk} and {v.shape[-1]}")
    chosen = resolve_backend(backend, streams, too_wide)
    out, acd = ATTENTION_BACKENDS[chosen](q, k, v, attr_q, attr_k, opts, key_padding_mask, domain_pair)
    if domain_pair is None:
        return out
    return out, acd.float()


# ---------------------------------------------------------------- full-catalog cross-entropy
_REDUCTIONS = ("mean", "sum", "none")


def check_item_table(hidden: object, item_weight: object, bias: object, *, weight_name: str = "item_weight",
                     bias_name: str = "bias", shard: bool = False) -> None:
    """Types, dtypes, devices and shapes of hidden (..., D), an item table (V, D) and its bias (V,) |
    None, with errors naming `weight_name` / `bias_name`. `shard`: the table is one rank's rows
    (`fastattn.distributed`): V = 0 is allowed and the bias's row count is left to the shard check,
    which all ranks run together (a rank-local error there would leave the others waiting)."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(item_weight, torch.Tensor):
        raise TypeError(f"{weight_name} must be a torch.Tensor, got {type(item_weight).__name__}")
    if hidden.dim() < 1 or hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a float tensor of shape (..., D), got {hidden.dtype} {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a hidden size D >= 1 (its last dimension), got shape {tuple(hidden.shape)}")
    rows = "V_r" if shard else "V >= 1"
    if item_weight.dim() != 2 or item_weight.shape[1] != hidden.shape[-1] or (item_weight.shape[0] == 0 and not shard):
        raise ValueError(f"{weight_name} must have shape ({rows}, D={hidden.shape[-1]}), got {tuple(item_weight.shape)}")
    for name, t in ((weight_name, item_weight), (bias_name, bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None and (bias.dim() != 1 if shard else bias.shape != (item_weight.shape[0],)):
        expected = "(V_r,)" if shard else f"(V={item_weight.shape[0]},)"
        raise ValueError(f"{bias_name} must have shape {expected}, got {tuple(bias.shape)}")


def _row_targets(target: object, rows: int, num_items: int, device: torch.device, ignore_index: int,
                 label_smoothing: float) -> RowTargets:
    """Resolve hard or soft targets (with label smoothing) into per-row coefficients."""
    eps = label_smoothing
    empty_i = torch.zeros(0, dtype=torch.int64, device=device)
    if isinstance(target, SoftTarget):
        if target.num_rows != rows:
            raise ValueError(f"target (SoftTarget) has {target.num_rows} rows but hidden has {rows}")
        mass = validate_soft_target(target, rows, num_items, device).float()
        used = mass > 0
        # An ignored row (mass within atol of 0) contributes exactly nothing, so its tiny weights go too.
        nnz = target.indices.shape[0]
        used_entry = torch.repeat_interleave(used, target.indptr.diff(), output_size=nnz)
        # Label smoothing mixes every used row with the uniform distribution, as F.cross_entropy does.
        return RowTargets(
            index=torch.full((rows,), -1, dtype=torch.int64, device=device),
            weight=torch.zeros(rows, device=device),
            base=torch.where(used, target.base.float() * (1 - eps) + eps / num_items, 0.0),
            mass=used * (mass * (1 - eps) + eps),
            indptr=target.indptr.contiguous(), indices=target.indices.contiguous(),
            values=torch.where(used_entry, target.values.float() * (1 - eps), 0.0),
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an int64 tensor or a fastattn.SoftTarget, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 item indices, got {target.dtype}")
    if target.numel() != rows:
        raise ValueError(f"target must have one entry per row of hidden ({rows}), got shape {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but hidden is on {device}")
    target = target.reshape(-1)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_items))
    # Value check without a device sync: on CPU tensors only, a device-side assert on CUDA (ops/checks.py).
    check_values(lambda: ~bad.any(), device,
                 f"target holds an id outside [0, {num_items}) (the number of items) "
                 f"and not ignore_index={ignore_index}",
                 detail=lambda: (f"target holds {int(target[bad][0])}, outside [0, {num_items}) (the number of "
                                 f"items) and not ignore_index={ignore_index}"))
    used = valid.float()
    return RowTargets(
        index=torch.where(valid, target, torch.full_like(target, -1)).contiguous(),
        weight=used * (1 - eps), base=used * (eps / num_items), mass=used,
        indptr=torch.zeros(rows + 1, dtype=torch.int64, device=device), indices=empty_i,
        values=torch.zeros(0, device=device), has_base=eps > 0,
    )


# Over 60 lines only by its docstring, the API reference; the body is under 50.
def full_item_cross_entropy(
    hidden: torch.Tensor,
    item_weight: torch.Tensor,
    target: Union[torch.Tensor, SoftTarget],
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    grad_filter: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy over the whole item catalog without materializing the N×V logits.

    - hidden (..., D): sequence representations, flattened to N rows; item_weight (V, D);
      bias (V,) or None; all float32, float16 or bfloat16 (float64 on "cpp"/"torch"), alike.
    - target: int64 item ids with hidden's leading shape (or N entries), `ignore_index` to skip
      a row; or a `fastattn.SoftTarget` (a distribution per row: base + sparse CSR part).

    Math, with z_ij = (h_i·E_j + b_j) / temperature and target distribution t_i::

        loss_i = logsumexp_j(z_ij) − Σ_j t_ij z_ij
        hard target y_i with label smoothing ε:  t_ij = (1 − ε)·[j = y_i] + ε / V

    (as `torch.nn.functional.cross_entropy`). reduction: "mean" over non-ignored rows (0 with
    zero gradients when every row is ignored), "sum", or "none" (per-row losses shaped like
    hidden's leading dims, 0 on ignored rows). The loss is float32 (float64 for float64
    inputs; float32 under `torch.autocast`, which first casts hidden, item_weight and bias, if not
    float64, to the autocast dtype as for F.linear: fastattn/_autocast.py); gradients reach hidden,
    item_weight and bias in their dtypes. Extra memory is O(N + V) plus one tile or chunk of
    logits, never O(N·V).

    An ignored row (target = ignore_index, or a SoftTarget row of mass 0) contributes exactly 0
    to the loss and to every gradient whatever it holds (NaN and inf included); NaN or inf in a
    used row, in item_weight or in bias propagates, as in F.cross_entropy. N = 0 rows gives a
    loss of 0 (empty for "none") and zero gradients. Differentiable once: differentiating the
    gradient again (create_graph=True) raises an error naming this function.

    backend: "auto" (Triton for CUDA tensors, the C++ kernels for CPU tensors, else the chunked
    torch implementation), "triton" (tiled kernels: forward saves only LSE, deterministic
    backward; D <= 256), "cpp" (C++ CPU kernels, BLAS per chunk of items) or "torch" (eager,
    chunked over items). An explicit backend that cannot run raises
    `fastattn.BackendUnavailable`.

    grad_filter in [0, 1): gradient filtering on the Triton backend (off at 0, the default; the
    other backends are always exact). The backward then skips each tile of rows × items in which
    every softmax probability is below grad_filter, no row's target lies and no row has label
    smoothing or a dense soft-target base, so a dropped logit gradient entry is
    |∂loss/∂z_ij| = |g_i|·m_i·p_ij < grad_filter·|g_i|·m_i (g_i: the gradient reaching row i's loss,
    m_i: its target mass) and row i's hidden gradient moves by at most
    |g_i|·m_i·(Σ_dropped p_ij)·max_j‖E_j‖/temperature. 2**-12 is below bfloat16's rounding
    of the largest entry (Cut Cross-Entropy's choice); the loss itself is never filtered.
    """
    amp = autocast_device(hidden)
    if amp is not None:  # torch.autocast: cast inputs, rerun with autocast off (fastattn/_autocast.py)
        with autocast_off(amp):
            hidden, item_weight, bias = autocast_inputs((hidden, item_weight, bias), amp)
            return full_item_cross_entropy(hidden, item_weight, target, bias=bias, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, temperature=temperature,
                                           reduction=reduction, backend=backend, grad_filter=grad_filter)
    check_item_table(hidden, item_weight, bias)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not isinstance(temperature, (int, float)) or not (is_finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if isinstance(grad_filter, bool) or not isinstance(grad_filter, (int, float)) or not 0.0 <= grad_filter < 1.0:
        raise ValueError(f"grad_filter must be a float in [0, 1) (0: exact gradients), got {grad_filter!r}")
    lead_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    targets = _row_targets(target, h2.shape[0], item_weight.shape[0], hidden.device, ignore_index,
                           float(label_smoothing))
    # An ignored row contributes exactly 0 whatever it holds (NaN, inf): zero it before the kernels,
    # without a host sync; where() also gives it an exactly zero gradient. (Every backend takes
    # any strides: the Triton launchers make what their kernels assume contiguous.)
    h2 = torch.where((targets.mass > 0)[:, None], h2, 0.0)
    too_wide = None if hidden.shape[-1] <= MAX_HIDDEN_DIM else (
        f"the Triton tiles take a hidden size <= {MAX_HIDDEN_DIM}, got {hidden.shape[-1]}")
    chosen = resolve_backend(backend, [h2, item_weight], too_wide)
    loss, _ = full_item_cross_entropy_rows(h2, item_weight, bias, targets, 1.0 / float(temperature), chosen,
                                           float(grad_filter))
    if reduction == "none":
        return loss.reshape(lead_shape)
    if reduction == "sum":
        return loss.sum()
    count = (targets.mass > 0).sum()
    return loss.sum() / count.clamp_min(1)


def topk_items(
    hidden: torch.Tensor,
    item_weight: torch.Tensor,
    k: int,
    *,
    bias: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k items of the whole catalog by score h·E_j + b_j, chunked over items.

    hidden (..., D), item_weight (V, D), bias (V,) or None; exclude: optional int64 (..., M)
    item ids to skip per row (entries < 0 are ignored — pad the user's history with -1).
    Returns (scores float32, indices int64), each (..., k), best first. No gradient; never an
    N×V buffer. Every backend ranks alike: scores in float32 (float64 for float64 inputs);
    excluded items and items scoring NaN or -inf are ineligible; +inf ranks first; equal scores
    go to the lower item id. A row with fewer than k eligible items (an all-NaN row has none)
    ends with score -inf and index -1. N = 0 rows gives (..., k) empty results. Under
    `torch.autocast` the inputs are cast as for full_item_cross_entropy (fastattn/_autocast.py).

    backend: "auto" (the C++ kernels on CPU when built, else torch), "cpp" or "torch" (eager,
    chunked over items; also what CUDA tensors use — the work there is one GEMM per chunk).
    """
    amp = autocast_device(hidden)
    if amp is not None:  # torch.autocast: cast inputs, rerun with autocast off (fastattn/_autocast.py)
        with autocast_off(amp):
            hidden, item_weight, bias = autocast_inputs((hidden, item_weight, bias), amp)
            return topk_items(hidden, item_weight, k, bias=bias, exclude=exclude, backend=backend)
    check_item_table(hidden, item_weight, bias)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= item_weight.shape[0]:
        raise ValueError(f"k must be an int in [1, {item_weight.shape[0]}] (the number of items), got {k!r}")
    lead_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.int64:
            raise TypeError("exclude must be an int64 tensor of item ids (-1 for unused slots)")
        if exclude.shape[:-1] != lead_shape or exclude.dim() != hidden.dim():
            raise ValueError(f"exclude must have shape {(*lead_shape, 'M')}, got {tuple(exclude.shape)}")
        if exclude.device != hidden.device:
            raise ValueError(f"exclude is on {exclude.device} but hidden is on {hidden.device}")
        check_values(lambda: (exclude < item_weight.shape[0]).all(), exclude.device,
                     f"exclude holds item ids >= {item_weight.shape[0]} (the number of items)")
        exclude = exclude.reshape(h2.shape[0], -1)
    if backend == "triton":
        raise BackendUnavailable("backend='triton' cannot run: top-k has no Triton kernel (use 'auto' or 'torch')")
    # The reason makes "auto" on CUDA tensors pick the chunked torch version, never "triton".
    chosen = resolve_backend(backend, [h2], extra_reason="top-k has no Triton kernel")
    scores, index = TOPK_BACKENDS[chosen](h2, item_weight, k, bias, exclude)
    return scores.reshape(*lead_shape, k), index.reshape(*lead_shape, k)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, backend: str = "auto") -> torch.Tensor:
    """`torch.nn.functional.dropout` (x any shape and float dtype; out = x·keep/(1 − p), keep
    i.i.d. Bernoulli(1 − p)) whose mask, on CPU tensors with backend "auto" or "cpp", comes from
    the C++ Philox generator of the attention kernels — about 10× faster than torch's CPU draw,
    a different (equally distributed) mask, reproducible under torch.manual_seed. backend
    "torch", CUDA tensors, torch.compile tracing, p = 0 or 1: torch's own dropout.
    """
    if not is_finite_number(p) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p!r}")
    if backend not in ("auto", "triton", "cpp", "torch"):
        raise ValueError(f"dropout: backend must be 'auto', 'triton', 'cpp' or 'torch', got {backend!r}")
    if training and backend in ("auto", "cpp") and philox_dropout_applies(x, float(p)):
        return philox_dropout(x, float(p))
    return torch.nn.functional.dropout(x, float(p), training)
