"""Constants and small helpers every op shares (defined once here, imported by each op's folder).

- The compute dtype: every backend accumulates in float32, or float64 for float64 inputs (so
  gradcheck sees exact math); low-precision inputs never accumulate in their own dtype.
- LOG2E: the Triton kernels keep softmax statistics in base 2 (exp2 is one instruction).
- Dot precision: float32 operands get IEEE float32 products (torch's default), never tf32.
- Item chunks: the eager (torch) catalog paths hold one N × chunk block of scores at a time.
- The widest head / hidden sizes the fused Triton tiles take.
"""
from __future__ import annotations

from typing import Iterator

import torch

LOG2E = 1.4426950408889634

# Widest head dims the attention tiles take: the concatenated QK streams and V.
MAX_QK_DIM = 256
MAX_V_DIM = 128
# Widest hidden size the cross-entropy tiles take.
MAX_HIDDEN_DIM = 256


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a kernel whose inputs have `dtype`: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """`t` in its compute dtype (a copy only when the dtype changes)."""
    return t.to(compute_dtype(t.dtype))


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input_precision for operands of `dtype`: exact "ieee" for float32 (as torch
    does by default, not tf32); half types multiply exactly on tensor cores whatever is said."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Elements of one chunk of N × chunk scores: 16M floats = 64 MB, plus a few temporaries.
CHUNK_ELEMENTS = 1 << 24


def item_chunks(num_rows: int, num_items: int) -> Iterator[tuple[int, int]]:
    """[start, stop) item ranges whose num_rows × chunk scores stay within CHUNK_ELEMENTS."""
    chunk = max(1, CHUNK_ELEMENTS // max(num_rows, 1))
    for start in range(0, num_items, chunk):
        yield start, min(num_items, start + chunk)
