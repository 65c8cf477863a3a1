"""Constants and small helpers every op shares (defined once here, imported by each op's folder).

- The compute dtype: every backend accumulates in float32, or float64 for float64 inputs (so
  gradcheck sees exact math); low-precision inputs never accumulate in their own dtype.
- LOG2E: the Triton kernels keep softmax statistics in base 2 (exp2 is one instruction).
- Dot precision: float32 dots run on tensor cores in the mode torch.get_float32_matmul_precision()
  asks for ("highest": tf32x3, "high"/"medium": tf32), read when a launch is described.
- Devices: every tensor of one launch is on one device (`check_same_device`).
- Shared memory: float32 launches on GPUs with under 160 KB per block (sm_86/89: A10, L4, L40S,
  RTX 30/40) take compact tiles (`compact_float32_tiles`); the report describes each arch's
  launches under `target_arch`.
- Item chunks: the eager (torch) catalog paths hold one N × chunk block of scores at a time.
- The widest head / hidden sizes the fused Triton tiles take.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

LOG2E = 1.4426950408889634

# Widest head dims the attention tiles take: the concatenated QK streams and V.
MAX_QK_DIM = 256
MAX_V_DIM = 128
# Widest hidden size the cross-entropy tiles take.
MAX_HIDDEN_DIM = 256


# Opt-in shared memory per block (bytes) by compute capability: what a launch may use.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Below this per block, float32 launches take compact tiles: the float32 128/256 head-dim and
# hidden-size classes need 104–165 KB at their regular tiles (tf32x3's split operands double
# some buffers), over sm_86/89's 99 KB; 16-bit launches fit everywhere.
COMPACT_TILES_BELOW = 160 * 1024
_target_arch: Optional[int] = None
_device_limits: dict[int, int] = {}


@contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Describe launches inside the block as for sm_`arch` (the ahead-of-time compile and the
    resource report: meta tensors carry no GPU to ask)."""
    global _target_arch
    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"arch must be one of {sorted(SHARED_MEMORY_LIMIT)}, got {arch!r}")
    previous, _target_arch = _target_arch, arch
    try:
        yield
    finally:
        _target_arch = previous


def _shared_memory_per_block(index: int) -> int:
    """The opt-in shared memory per block of CUDA device `index`, asked once per device."""
    limit = _device_limits.get(index)
    if limit is None:
        props = torch.cuda.get_device_properties(index)
        limit = int(getattr(props, "shared_memory_per_block_optin", 0) or
                    SHARED_MEMORY_LIMIT.get(props.major * 10 + props.minor, 0))  # unknown: compact
        _device_limits[index] = limit
    return limit


def device_arch(t: torch.Tensor) -> Optional[int]:
    """The compute capability (e.g. 90) a launch on `t` compiles for: `target_arch` inside one,
    else t's CUDA device; None for CPU tensors (the interpreter) and meta ones."""
    if _target_arch is not None:
        return _target_arch
    if t.device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def compact_float32_tiles(t: torch.Tensor) -> bool:
    """Whether a launch on `t` (its dtype and device) takes the compact float32 tiles: float32 on
    a GPU with under COMPACT_TILES_BELOW of shared memory per block, or under `target_arch` of
    such a GPU. CPU tensors (the interpreter) and meta ones take the regular tiles."""
    if t.dtype != torch.float32:
        return False
    if _target_arch is not None:
        return SHARED_MEMORY_LIMIT[_target_arch] < COMPACT_TILES_BELOW
    if t.device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _shared_memory_per_block(index) < COMPACT_TILES_BELOW


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a kernel whose inputs have `dtype`: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """`t` in its compute dtype (a copy only when the dtype changes)."""
    return t.to(compute_dtype(t.dtype))


# tl.dot input_precision of float32 operands per torch.get_float32_matmul_precision():
# "highest" → tf32x3 (three tf32 products, the low-order terms kept: about float32 accuracy on
# tensor cores); "high" and "medium" → tf32 (one tf32 product, 10-bit mantissa inputs), the
# mode torch's own float32 matmuls use there. ("ieee", plain FMA, is never chosen: it spills.)
FLOAT32_DOT_PRECISION = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input_precision for operands of `dtype`, decided when a launch is described (a
    constexpr: each mode is its own compiled kernel). float32 follows
    torch.get_float32_matmul_precision() (FLOAT32_DOT_PRECISION; a Python call, so under
    torch.compile it is a constant read at trace time); half types multiply exactly on tensor
    cores whatever is said, so they keep "tf32"."""
    if dtype != torch.float32:
        return "tf32"
    return FLOAT32_DOT_PRECISION[torch.get_float32_matmul_precision()]


@contextmanager
def float32_matmul_precision(mode: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(mode) inside the block, the previous mode restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def launch_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """float32 matmul precisions under which the launchers pick distinct kernels for `dtype`
    operands, one per distinct `dot_precision`: every_launch() describes a launch under each."""
    return ("highest", "high") if dtype == torch.float32 else ("highest",)


def precision_tag(dtype: torch.dtype, mode: str) -> str:
    """Name part of a launch of `dtype` operands under float32 matmul precision `mode`:
    "float32-tf32x3", "float32-tf32", "bfloat16"."""
    name = str(dtype).removeprefix("torch.")
    return f"{name}-{FLOAT32_DOT_PRECISION[mode]}" if dtype == torch.float32 else name


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """The device of the first given tensor (None: not given); a one-line ValueError naming the
    first argument on another device: a kernel launch reads every pointer on one device."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first, device = named[0][0], named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    return device


# Elements of one chunk of N × chunk scores: 16M floats = 64 MB, plus a few temporaries.
CHUNK_ELEMENTS = 1 << 24


def item_chunks(num_rows: int, num_items: int) -> Iterator[tuple[int, int]]:
    """[start, stop) item ranges whose num_rows × chunk scores stay within CHUNK_ELEMENTS."""
    chunk = max(1, CHUNK_ELEMENTS // max(num_rows, 1))
    for start in range(0, num_items, chunk):
        yield start, min(num_items, start + chunk)
