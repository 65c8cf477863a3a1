"""Dropout with the attention kernels' Philox keep-mask, for the models' hidden-state dropout on CPU.

torch's CPU dropout draws one Bernoulli per element from the Mersenne twister (1.7 ms for a
64×20×64 block on one thread, a fifth of a SASRec step at L = 20); the C++ operator
`fastattn::attn_dropout_rows` produces the same-sized keep-mask with Philox-4x32-10 in SIMD
lanes in a tenth of that. The math is torch's: out = x·keep/(1 − p), keep_i ~ Bernoulli(1 − p),
i.i.d.; the mask differs from torch's draw (another generator), so backend="torch" stays the
reference. The seed is drawn from torch's CPU generator per call, so torch.manual_seed
reproduces a run. Under torch.compile tracing, on CUDA tensors and without the C++ extension
this is plain `torch.nn.functional.dropout` (Inductor and CUDA have fast fused RNG of their own).
"""
from __future__ import annotations

import torch

from .attention.cpp import cpp_dropout_keep_rows
from .attention.function import draw_seed
from .cpp_extension import cpp_unavailable_reason


def philox_dropout_applies(x: torch.Tensor, p: float) -> bool:
    """Whether `philox_dropout` runs the C++ mask for x (else torch's dropout does)."""
    return (x.device.type == "cpu" and 0.0 < p < 1.0 and x.numel() > 0 and x.dim() > 0 and x.shape[-1] > 0
            and not torch.compiler.is_compiling() and cpp_unavailable_reason() is None)


def philox_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x (any shape, float dtype, CPU) with probability p in (0, 1):
    x·keep/(1 − p), keep a bool mask of x's shape drawn by Philox from one seed of torch's CPU
    generator. Differentiable in x (the gradient is g·keep/(1 − p)); autograd keeps the bool mask."""
    width = x.shape[-1]
    keep = cpp_dropout_keep_rows(draw_seed("cpu"), float(p), width, 0, x.numel() // width).view(x.shape)
    # x·keep, not torch.where (5x slower on CPU); autograd saves the bool mask, and a NaN in a
    # dropped element stays NaN, as in torch's dropout.
    return x * keep * (1.0 / (1.0 - p))
