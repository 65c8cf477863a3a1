"""The headline cases of the resource report (issue 17): the shapes recommenders train at, the
dtypes and float32 dot modes compiled, and the GPU architectures covered."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ARCHS", "ATTENTION_KERNELS", "CROSS_ENTROPY_KERNELS", "DTYPES", "FLOAT32_MODES", "HEADLINE_ATTENTION",
           "HEADLINE_CROSS_ENTROPY", "AttentionCase", "CrossEntropyCase", "dtype_name"]

ARCHS = (80, 86, 89, 90)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float32 dots follow torch.get_float32_matmul_precision(); the headline compiles each mode the
# launchers can turn into a distinct kernel (identical ones are compiled once).
FLOAT32_MODES = ("highest", "high")


@dataclass(frozen=True)
class AttentionCase:
    """DIF attention on concatenated QK streams: batch, heads, sequence length (queries = keys),
    summed QK head dim, V head dim. Causal with a key padding mask, no dropout, no domains."""

    b: int
    h: int
    l: int  # noqa: E741 (the paper's name)
    dqk: int
    dv: int

    @property
    def name(self) -> str:
        return f"B{self.b}-H{self.h}-L{self.l}-dqk{self.dqk}-dv{self.dv}"


@dataclass(frozen=True)
class CrossEntropyCase:
    """Full-catalog cross-entropy: N rows (batch × positions), V items, hidden size D, no bias."""

    n: int
    v: int
    d: int

    @property
    def name(self) -> str:
        return f"N{self.n}-V{self.v}-D{self.d}"


HEADLINE_ATTENTION = tuple(AttentionCase(b, 2, l, dqk, dv) for b in (128, 256) for l in (50, 200)
                           for dqk, dv in ((32 + 8, 32), (64, 64)))
HEADLINE_CROSS_ENTROPY = tuple(CrossEntropyCase(51_200, 1_000_000, d) for d in (64, 128))
ATTENTION_KERNELS = ("fwd", "bwd")  # headline L <= FUSED_MAX_LEN: the fused backward
CROSS_ENTROPY_KERNELS = ("ce_lse", "ce_bwd_dh", "ce_bwd_de")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")
