"""The operators of full-catalog cross-entropy (forward and one autograd formula):
`fastattn::full_item_cross_entropy` (`custom_op`; backend "cpp" or "torch", the chunked eager
kernels) and `fastattn::full_item_cross_entropy_triton` with its kernels' backward
`fastattn::full_item_cross_entropy_triton_backward` (`torch.library.triton_op`s, so torch.compile
sees each kernel launch; `custom_op`s under the interpreter, see ops/triton_registration.py).
`CrossEntropyEager` / `CrossEntropyTritonEager`: the same bodies and autograd formula as
autograd.Functions, which plain eager calls take instead of the operator dispatch (ops/eager.py).

Per row i, with z_ij = scale·(h_i·E_j + b_j), target t_ij = w_i·[j = y_i] + base_i + sparse_ij
and mass_i = Σ_j t_ij (1, or 0 for an ignored row):

    loss_i = mass_i·LSE_i − Σ_j t_ij z_ij
    Σ_j t_ij z_ij = w_i z_{i,y_i} + base_i·scale·(h_i·Σ_j E_j + Σ_j b_j) + Σ_sparse value·z_ij

The kernels give LSE and the dense + hard-target part of the gradient; the sparse part (cost
∝ its nonzeros) is added here, deterministically and without reading a tensor value on the
host. The C++ kernels do it in two passes over the entries (`sparse_gather`: per row,
`sparse_scatter`: per item, deterministic without sorting); the others by segment sums of
gathered rows, per item over the entries sorted by item (stable).
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch

from .._common import compute_dtype
from ..autograd_guard import no_second_derivative
from ..eager import eager_call_ok, eager_function
from ..triton_registration import triton_operator

_NOT_TWICE = ("full_item_cross_entropy cannot be differentiated twice: its fused backward has no derivative "
              "(for second derivatives use the materialized logits, e.g. F.cross_entropy(hidden @ item_weight.T, "
              "target))")


class CrossEntropyKernels(Protocol):
    @staticmethod
    def lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        ...

    @staticmethod
    def backward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor, grad_filter: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        ...


@dataclass(frozen=True)
class RowTargets:
    """Targets resolved per row (all (N,) unless noted): hard index (-1: none) with weight,
    dense base, total mass, and the CSR sparse part (indptr (N+1,), indices/values (nnz,)).
    has_base: False when the caller knows every base is 0 (hard targets without label
    smoothing), which skips the dense base term without reading `base` on the host."""

    index: torch.Tensor
    weight: torch.Tensor
    base: torch.Tensor
    mass: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    has_base: bool = True

    @property
    def has_sparse(self) -> bool:
        return self.indices.numel() > 0


def _row_dots(h32: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """h_rows·E_cols + b_cols in h32's dtype (the compute dtype), (len(rows),)."""
    dots = (h32[rows] * weight[cols].to(h32.dtype)).sum(dim=-1)
    return dots + bias[cols].to(h32.dtype) if bias is not None else dots


def row_losses(kernels: CrossEntropyKernels, scale: float, targets: RowTargets, hidden: torch.Tensor,
               weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (N,) and LSE (N,), compute dtype, of hidden (N,D), weight (V,D), bias (V,) | None."""
    lse = _used_rows_lse(kernels, targets, hidden, weight, bias, scale)
    h32 = hidden.to(compute_dtype(hidden.dtype))
    safe_index = targets.index.clamp_min(0)
    linear = targets.weight * _row_dots(h32, weight, bias, torch.arange(hidden.shape[0], device=hidden.device),
                                        safe_index)
    if targets.has_base:
        total = h32 @ weight.to(h32.dtype).sum(dim=0)
        if bias is not None:
            total = total + bias.to(h32.dtype).sum()
        linear = linear + targets.base * total
    if targets.has_sparse:
        linear = linear + _sparse_dots(kernels, h32, weight, bias, targets)
    # mass 0 (ignored rows) must give 0 even where lse is large.
    return torch.where(targets.mass > 0, targets.mass * lse, torch.zeros_like(lse)) - scale * linear, lse


def _sparse_table_sums(kernels: CrossEntropyKernels, table: torch.Tensor, t: RowTargets, acc: torch.dtype
                       ) -> torch.Tensor:
    """(N, C) in acc: row i = Σ_e value_e·table[indices_e] over row i's sparse entries (0 for none);
    table (V, C)."""
    gather = getattr(kernels, "sparse_gather", None)
    if gather is not None and table.dtype == acc:  # the C++ kernels: row-parallel, no nnz×C block
        return gather(t.indptr, t.indices, t.values, table)
    return _chunked_segment_sums(
        t.indptr, t.indices.shape[0], table.shape[1],
        lambda e0, e1: t.values[e0:e1].to(acc)[:, None] * table[t.indices[e0:e1]].to(acc))


def _sparse_dots(kernels: CrossEntropyKernels, h32: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 t: RowTargets) -> torch.Tensor:
    """(N,) Σ_e value_e·(h_i·E_j + b_j) over row i's sparse entries, in h32's dtype; exactly 0 for a
    row without entries whatever h_i holds (NaN included)."""
    acc = h32.dtype
    if getattr(kernels, "sparse_gather", None) is None or weight.dtype != acc:
        rows = _sparse_rows(t)
        return _chunked_segment_sums(  # each entry's dot product reads a D-wide gathered row
            t.indptr, t.indices.shape[0], h32.shape[1],
            lambda e0, e1: t.values[e0:e1] * _row_dots(h32, weight, bias, rows[e0:e1], t.indices[e0:e1]))
    dots = (_sparse_table_sums(kernels, weight, t, acc) * h32).sum(dim=1)
    if bias is not None:
        dots = dots + _sparse_table_sums(kernels, bias[:, None], t, acc)[:, 0]
    return torch.where(t.indptr[1:] > t.indptr[:-1], dots, torch.zeros_like(dots))


def _sparse_item_sums(kernels: CrossEntropyKernels, t: RowTargets, x: torch.Tensor, num_items: int) -> torch.Tensor:
    """(V, C): row j = Σ_e value_e·x[row(e)] over the sparse entries of item j; x (N, C) in the compute dtype."""
    scatter = getattr(kernels, "sparse_scatter", None)
    if scatter is not None:  # the C++ kernels: one pass over the entries, no sort
        return scatter(t.indptr, t.indices, t.values, x, num_items)
    # Entries sorted by item (stable), one segment sum per item: deterministic, no atomics, and
    # no data-dependent size (a sparse coalesce would sync on a GPU).
    rows = _sparse_rows(t)
    order = torch.argsort(t.indices, stable=True)
    item_offsets = torch.searchsorted(t.indices[order], torch.arange(num_items + 1, device=x.device))
    return _chunked_segment_sums(
        item_offsets, order.shape[0], x.shape[1],
        lambda e0, e1: t.values[order[e0:e1]].to(x.dtype)[:, None] * x[rows[order[e0:e1]]])


# Entries per block of the segment-sum paths: a block holds (entries, C) products, so MQSA-TED's
# teacher rows (N·width entries, N up to B·L) never become one nnz×D tensor (it took 24 GiB and
# more at B 256, L 200).
SPARSE_BLOCK_ELEMENTS = 1 << 24


def _chunked_segment_sums(offsets: torch.Tensor, nnz: int, width: int,
                          block: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Σ per segment (offsets (S+1,), rising from 0 to nnz) of block(e0, e1), the (e1 − e0, ...)
    terms of entries [e0, e1), in blocks of SPARSE_BLOCK_ELEMENTS // width entries (width: the
    values a block computes per entry, e.g. its gathered row's D).
    A segment's length within a block comes from the offsets clamped to it, on the device: no
    host read, the same blocks and summation order at every run (deterministic)."""
    step = max(1, SPARSE_BLOCK_ELEMENTS // max(1, width))
    total: Optional[torch.Tensor] = None
    for e0 in range(0, max(nnz, 1), step):
        e1 = min(nnz, e0 + step)
        lengths = offsets[1:].clamp(e0, e1) - offsets[:-1].clamp(e0, e1)
        part = torch.segment_reduce(block(e0, e1), "sum", lengths=lengths, axis=0)
        total = part if total is None else total + part
    assert total is not None
    return total


def _used_rows_lse(kernels: CrossEntropyKernels, targets: RowTargets, hidden: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """kernels.lse of every row; with kernels that skip unused rows (`skips_unused_rows`: the C++
    ones, where reading a mask on the host costs nothing), of the rows with some target only, and 0
    for the others (rows of zero target mass: their loss is 0 and the backward skips them too).
    Called inside the operators' bodies, never traced: the data-dependent row count is fine."""
    if not getattr(kernels, "skips_unused_rows", False):
        return kernels.lse(hidden, weight, bias, scale)
    used = (targets.mass != 0) | (targets.weight != 0)
    if targets.has_base:
        used |= targets.base != 0
    if targets.has_sparse:
        used |= targets.indptr[1:] > targets.indptr[:-1]
    if bool(used.all()):
        return kernels.lse(hidden, weight, bias, scale)
    rows = used.nonzero().squeeze(1)
    lse = torch.zeros(hidden.shape[0], dtype=compute_dtype(hidden.dtype), device=hidden.device)
    return lse.index_copy_(0, rows, kernels.lse(hidden.index_select(0, rows), weight, bias, scale))


def _gradients(kernels: CrossEntropyKernels, scale: float, t: RowTargets, hidden: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], lse: torch.Tensor, grad_loss: torch.Tensor, grad_filter: float
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dhidden, dweight, dbias (None without bias) in the inputs' dtypes."""
    acc = compute_dtype(hidden.dtype)
    g = grad_loss.to(acc).contiguous()
    dh, de, db = kernels.backward(
        hidden, weight, bias, scale, lse, (g * t.mass).contiguous(), (g * t.base).contiguous(),
        t.index, (g * t.weight).contiguous(), grad_filter,
    )
    if t.has_sparse:
        # dz_e = −scale·g_row(e)·value_e: dH_i += Σ_e dz_e E_j, dE_j (and db_j) += Σ_e dz_e [h_i | 1].
        row_coef = -scale * g
        dh = dh + row_coef[:, None] * _sparse_table_sums(kernels, weight, t, acc)
        n = hidden.shape[0]
        rhs = torch.cat([hidden.to(acc), torch.ones(n, 1, dtype=acc, device=hidden.device)], dim=1)
        both = _sparse_item_sums(kernels, t, row_coef[:, None] * rhs, weight.shape[0])
        de = de + both[:, :-1]
        if db is not None:
            db = db + both[:, -1]
    return (dh.to(hidden.dtype), de.to(weight.dtype),
            db.to(bias.dtype) if bias is not None and db is not None else None)


# ---------------------------------------------------------------- the operators torch.compile sees
def kernels_of(backend: str) -> CrossEntropyKernels:
    """The kernels behind `fastattn::full_item_cross_entropy`'s backend argument: "cpp" or "torch"
    (chunked eager). The Triton kernels have operators of their own (below)."""
    if backend == "cpp":
        from .cpp import CppCrossEntropyKernels
        return CppCrossEntropyKernels
    if backend == "torch":
        from .chunked import ChunkedCrossEntropyKernels
        return ChunkedCrossEntropyKernels
    raise ValueError(f"fastattn::full_item_cross_entropy: backend must be 'cpp' or 'torch' (the Triton kernels "
                     f"are the operator fastattn::full_item_cross_entropy_triton), got {backend!r}")


def _targets(index: torch.Tensor, row_weight: torch.Tensor, base: torch.Tensor, mass: torch.Tensor,
             indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, has_base: bool) -> RowTargets:
    return RowTargets(index=index, weight=row_weight, base=base, mass=mass, indptr=indptr, indices=indices,
                      values=values, has_base=has_base)


def _full_item_cross_entropy_fake(hidden: torch.Tensor, *_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    return hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n,), dtype=dtype)


def _full_item_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
    row_weight: torch.Tensor, base: torch.Tensor, mass: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
    values: torch.Tensor, scale: float, has_base: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (N,) and LSE (N,) (float32; float64 for float64 inputs; the LSE is kept for the
    backward, callers drop it) of hidden (N,D), weight (V,D), bias (V,) | None against the
    `RowTargets` given field by field (module docstring); row_weight is RowTargets.weight.
    backend: "cpp" or "torch"."""
    targets = _targets(index, row_weight, base, mass, indptr, indices, values, has_base)
    return row_losses(kernels_of(backend), scale, targets, hidden, weight, bias)


full_item_cross_entropy_op = torch.library.custom_op("fastattn::full_item_cross_entropy", _full_item_cross_entropy,
                                                     mutates_args=())
full_item_cross_entropy_op.register_fake(_full_item_cross_entropy_fake)


def _triton_lse_kernels() -> tuple[Any, ...]:
    from . import triton_fwd
    return triton_fwd.KERNELS


def _triton_backward_kernels() -> tuple[Any, ...]:
    from . import triton_bwd
    return triton_bwd.KERNELS


def _full_item_cross_entropy_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
    row_weight: torch.Tensor, base: torch.Tensor, mass: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
    values: torch.Tensor, scale: float, has_base: bool, grad_filter: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fastattn::full_item_cross_entropy` on the Triton kernels (CUDA tensors; CPU ones under the
    interpreter; float32/float16/bfloat16): per-row loss (N,) and LSE (N,), float32. grad_filter:
    the backward's tile skip threshold (triton_bwd.py; 0: exact)."""
    targets = _targets(index, row_weight, base, mass, indptr, indices, values, has_base)
    return row_losses(TritonOperatorKernels, scale, targets, hidden, weight, bias)


full_item_cross_entropy_triton_op = triton_operator(
    "fastattn::full_item_cross_entropy_triton", fake=_full_item_cross_entropy_fake,
    kernels=_triton_lse_kernels)(_full_item_cross_entropy_triton)


def _triton_backward_fake(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *_: Any
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f32 = torch.float32
    return (hidden.new_empty(hidden.shape, dtype=f32), weight.new_empty(weight.shape, dtype=f32),
            weight.new_empty((weight.shape[0] if bias is not None else 0,), dtype=f32))


@triton_operator("fastattn::full_item_cross_entropy_triton_backward", fake=_triton_backward_fake,
                 kernels=_triton_backward_kernels)
def full_item_cross_entropy_triton_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
    lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor, coef_t: torch.Tensor,
    grad_filter: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels' part of `full_item_cross_entropy_triton`'s backward (as the C++
    `fastattn::ce_bwd`): dH (N,D), dE (V,D), db (V,) ((0,) without bias), float32, of
    dz_ij = scale·(coef_p_i·softmax_ij − coef_base_i − coef_t_i·[j = target_i]); lse (N,), coef_* (N,)
    float32, target (N,) int64 (−1: none); grad_filter: tile skip threshold (triton_bwd.py; 0: exact)."""
    from .triton_backend import TritonCrossEntropyKernels
    dh, de, db = TritonCrossEntropyKernels.backward(hidden, weight, bias, scale, lse, coef_p, coef_base, target,
                                                     coef_t, grad_filter)
    return dh, de, db if db is not None else weight.new_empty((0,), dtype=torch.float32)


class TritonOperatorKernels:
    """`CrossEntropyKernels` of `full_item_cross_entropy_triton`: the LSE launched in the operator's
    body, the backward through its operator (so a traced backward shows the kernel launches)."""

    @staticmethod
    def lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        from .triton_backend import TritonCrossEntropyKernels  # imports triton: only when the operator runs
        return TritonCrossEntropyKernels.lse(hidden, weight, bias, scale)

    @staticmethod
    def backward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor, grad_filter: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        dh, de, db = full_item_cross_entropy_triton_backward_op(hidden, weight, bias, scale, lse, coef_p, coef_base,
                                                                target, coef_t, grad_filter)
        return dh, de, db if bias is not None else None


def full_item_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 targets: RowTargets, scale: float, backend: str, grad_filter: float = 0.0
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and LSE (N,) through the operator of a resolved backend ("triton", "cpp" or
    "torch"): the one call the public function makes. grad_filter: the Triton backward's tile
    skip threshold (the others are exact)."""
    fields = (targets.index, targets.weight, targets.base, targets.mass, targets.indptr, targets.indices,
              targets.values, scale, targets.has_base)
    # Plain eager calls take the operators' autograd.Function twins (no dispatch; ops/eager.py).
    eager = eager_call_ok((hidden, weight, bias, *fields[:7]))
    if backend == "triton":
        call = CrossEntropyTritonEager.apply if eager else full_item_cross_entropy_triton_op
        return call(hidden, weight, bias, *fields, float(grad_filter))
    call = CrossEntropyEager.apply if eager else full_item_cross_entropy_op
    return call(hidden, weight, bias, *fields, backend)


# ---------------------------------------------------------------- one autograd formula for both
_N_TARGET_FIELDS = 7  # index, row_weight, base, mass, indptr, indices, values


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    hidden, weight, bias, *target_parts = inputs[:3 + _N_TARGET_FIELDS]
    # The last input: the backend name (fastattn::full_item_cross_entropy) or grad_filter (_triton).
    scale, has_base, last = inputs[3 + _N_TARGET_FIELDS:]
    ctx.save_for_backward(hidden, weight, bias, output[1], *target_parts)
    ctx.scale, ctx.has_base, ctx.n_inputs = scale, has_base, len(inputs)
    triton = not isinstance(last, str)
    ctx.kernels = TritonOperatorKernels if triton else kernels_of(last)
    ctx.grad_filter = float(last) if triton else 0.0


def _backward(ctx: Any, grad_loss: torch.Tensor, _grad_lse: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    hidden, weight, bias, lse, *target_parts = ctx.saved_tensors
    # The engine runs backward under the caller's autocast state: keep the chunked kernels'
    # float32 products float32 (the forward ran with autocast off, on already-cast inputs).
    # (autocast knows only real devices: a meta trace has none to turn off.)
    device = grad_loss.device.type
    off = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    with torch.no_grad(), off:
        grads = _gradients(ctx.kernels, ctx.scale, _targets(*target_parts, ctx.has_base), hidden, weight, bias,
                           lse, grad_loss, ctx.grad_filter)
    if torch.is_grad_enabled():
        grads = no_second_derivative(grads, _NOT_TWICE, (hidden, weight, bias, grad_loss))
    return (*grads,) + (None,) * (ctx.n_inputs - 3)


full_item_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
full_item_cross_entropy_triton_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`_setup_context` of the eager twins: the Triton backward runs its kernels directly, not
    through the backward operator."""
    _setup_context(ctx, inputs, output)
    if ctx.kernels is TritonOperatorKernels:
        from .triton_backend import TritonCrossEntropyKernels
        ctx.kernels = TritonCrossEntropyKernels


CrossEntropyEager = eager_function("CrossEntropyEager", _full_item_cross_entropy, _eager_setup_context, _backward)
CrossEntropyTritonEager = eager_function("CrossEntropyTritonEager", _full_item_cross_entropy_triton,
                                         _eager_setup_context, _backward)


def _sparse_rows(t: RowTargets) -> torch.Tensor:
    """(nnz,) int64: the row of each sparse entry (output_size given: no device sync)."""
    counts = t.indptr[1:] - t.indptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                   output_size=t.indices.shape[0])
