"""H100 SXM roofline of the headline cases: the work of each pass (matmul flops, exps, bytes that
must cross HBM) and the time it needs at the datasheet peaks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import DTYPES, HEADLINE_ATTENTION, HEADLINE_CROSS_ENTROPY, AttentionCase, CrossEntropyCase, dtype_name

__all__ = ["H100_BYTES_PER_S", "H100_EXP_PER_S", "H100_FP32_FMA_FLOPS", "H100_MATMUL_FLOPS", "Roofline",
           "attention_roofline", "cross_entropy_roofline", "headline_rooflines"]

# H100 SXM5 peaks (NVIDIA H100 datasheet, dense): tensor-core matmul, plain FP32 FMA, HBM3.
H100_MATMUL_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}  # fp32 via tf32
H100_FP32_FMA_FLOPS = 67e12
# ex2 on the SFUs: 16 ops/clock/SM × 132 SMs × 1.83 GHz boost.
H100_EXP_PER_S = 16 * 132 * 1.83e9
H100_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Roofline:
    """Work of one pass and its H100 lower bound: `flops` of the matmuls, `exps` (ex2 on the
    SFUs), `bytes` that must cross HBM at least once (inputs read, outputs written); each time
    is that work at the peak rate, `floor_s` their max and `bound` which one it is."""

    case: str
    dtype: str
    passes: str
    flops: float
    exps: float
    bytes: float
    matmul_s: float
    exp_s: float
    memory_s: float

    @property
    def floor_s(self) -> float:
        return max(self.matmul_s, self.exp_s, self.memory_s)

    @property
    def bound(self) -> str:
        return max((self.matmul_s, "matmul"), (self.exp_s, "exp"), (self.memory_s, "memory"))[1]


def _roofline(case: str, dtype: str, passes: str, flops: float, exps: float, nbytes: float,
              tensor_cores: bool) -> Roofline:
    rate = H100_MATMUL_FLOPS[dtype] if tensor_cores else H100_FP32_FMA_FLOPS
    return Roofline(case, dtype, passes, flops, exps, nbytes, flops / rate, exps / H100_EXP_PER_S,
                    nbytes / H100_BYTES_PER_S)


def attention_roofline(case: AttentionCase, dtype: str, backward: str = "fa2",
                       tensor_cores: bool = True) -> list[Roofline]:
    """Forward and backward of a causal attention case. Causal: (L+1)/2L of the L² pairs are
    visible. Forward: QKᵀ and PV, one exp per visible pair. Backward `fa2`: the 5 GEMMs and one
    exp recompute of FlashAttention-2 (S, dP, dV, dK, dQ); `current`: this package's kernels
    at the case's length: the fused backward (L <= FUSED_MAX_LEN) has the same count, the split
    one 7 GEMMs (dK/dV pass S, dP, dV, dK; dQ pass S, dP, dQ) and 2 exp recomputes. The fused
    backward's float32 dQ partial sums (re-read per key block, L2-resident) are not counted.
    Bytes: Q, K, V, O (+ dO, dQ, dK, dV) once in `dtype`, LSE/Δ fp32, the uint8 padding mask."""
    from ..attention.triton_bwd import FUSED_MAX_LEN

    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    pairs = case.b * case.h * case.l * case.l * (case.l + 1) / (2 * case.l)
    rows = case.b * case.h * case.l
    qk, v = case.dqk, case.dv
    fwd = _roofline(case.name, dtype, "fwd", 2 * pairs * (qk + v), pairs,
                    rows * (es * (2 * qk + 2 * v) + 4) + case.b * case.l, tensor_cores)
    if backward == "fa2":
        gemm_dims, exp_passes = 3 * qk + 2 * v, 1
    elif backward == "current" and case.l > FUSED_MAX_LEN:
        gemm_dims, exp_passes = 4 * qk + 3 * v, 2
    elif backward == "current":
        gemm_dims, exp_passes = 3 * qk + 2 * v, 1
    else:
        raise ValueError(f"backward is 'fa2' or 'current', got {backward!r}")
    bwd = _roofline(case.name, dtype, f"bwd-{backward}", 2 * pairs * gemm_dims, exp_passes * pairs,
                    rows * (es * (2 * qk + 2 * v + 2 * qk + v + v) + 8) + case.b * case.l, tensor_cores)
    return [fwd, bwd]


def cross_entropy_roofline(case: CrossEntropyCase, dtype: str, backward: str = "cce",
                           tensor_cores: bool = True) -> list[Roofline]:
    """Forward (LSE) and backward of full-catalog cross-entropy. Forward: the N×V×D logit GEMM
    and one exp per logit. Backward `cce`: one logit recompute feeding dH and dE (3 GEMMs, one
    exp pass; Cut Cross-Entropy without gradient filtering); `current`: the dH and dE passes
    each recompute the logits (4 GEMMs, 2 exp passes); `filtered`: the floor of `current` with
    gradient filtering, every tile skipped (2 GEMMs: the recomputes; the exps stay). Bytes: H and E read, dH and dE written
    once in `dtype`, LSE and the per-row coefficients fp32, targets int64."""
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    logits = case.n * case.v
    fwd = _roofline(case.name, dtype, "fwd", 2 * logits * case.d, logits,
                    es * (case.n + case.v) * case.d + 4 * case.n, tensor_cores)
    if backward == "cce":
        gemms, exp_passes = 3, 1
    elif backward == "current":
        gemms, exp_passes = 4, 2
    elif backward == "filtered":
        gemms, exp_passes = 2, 2
    else:
        raise ValueError(f"backward is 'cce', 'current' or 'filtered', got {backward!r}")
    bwd = _roofline(case.name, dtype, f"bwd-{backward}", 2 * gemms * logits * case.d, exp_passes * logits,
                    2 * es * (case.n + case.v) * case.d + 4 * 4 * case.n + 8 * case.n, tensor_cores)
    return [fwd, bwd]


def headline_rooflines() -> list[Roofline]:
    """Every headline case × dtype, forward and the backward variants (ideal, current; for
    cross-entropy also the floor with gradient filtering)."""
    out: list[Roofline] = []
    for dtype in map(dtype_name, DTYPES):
        for case in HEADLINE_ATTENTION:
            out += attention_roofline(case, dtype, "fa2") + attention_roofline(case, dtype, "current")[1:]
        for ce in HEADLINE_CROSS_ENTROPY:
            out += cross_entropy_roofline(ce, dtype, "cce") + cross_entropy_roofline(ce, dtype, "current")[1:]
            out += cross_entropy_roofline(ce, dtype, "filtered")[1:]
    return out
