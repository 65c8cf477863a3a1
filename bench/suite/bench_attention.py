"""Decoupled (DIF-SR) attention: providers × modes × sequence lengths, time and peak memory.

The case is DIF-SR's: an item stream q, k, v (B, H, L, Dk=32) plus one attribute score stream
(Da=8), causal, with left padding (as sequential recommenders pad histories). Inputs require
grad in every mode, so "fwd" is a training forward (it keeps what the backward needs).
`streams="item"` runs the same without the attribute stream: plain causal multi-head attention
(SASRec's case, where SDPA needs no concatenation); its groups end in "no attributes".

Providers:
- triton: fastattn.dif_attention(backend="triton"), the fused flash-style kernels (CUDA only);
- cpp: fastattn.dif_attention(backend="cpp"), the fused C++ CPU kernels (CPU only; skipped with
  the reason when the extension cannot be built);
- torch: fastattn.dif_attention(backend="torch"), the reference that materializes L×L scores;
- torch_compile: torch.compile of that reference function;
- sdpa: F.scaled_dot_product_attention on the concatenated streams [q|qa]·[k|ka]ᵀ, which gives
  the same scores since the streams are summed inside one softmax.

Run: python -m pytest bench/suite/bench_attention.py --benchmark-only   (see bench/README.md)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from pytest_benchmark.fixture import BenchmarkFixture

import fastattn
from fastattn.ops.attention.options import AttentionOptions
from fastattn.ops.attention.reference import dif_attention_reference, visible_keys

from _common import COMPILE_FAILURE, COMPILE_MODE_SKIP, COMPILE_MODES, MODES, bench_size, compile_for_bench, run_benchmark, sweep, triton_unavailable

DK, DA, HEADS = 32, 8, 2
SCALE = 1.0 / math.sqrt(DK)  # DIF-SR's scale: 1/sqrt of the item head dim only, not of Dk+Da
SEQ_LENS = sweep(full=(20, 50, 128, 200, 1024, 2048, 4096), quick=(20, 50, 200, 512), tiny=(7, 33))
# "item+attr": DIF-SR's item stream plus one attribute score stream; "item": plain multi-head
# attention (SASRec), where SDPA needs no concatenation.
STREAMS = ("item+attr", "item")
# CPU: issue 5's setting (B=32, H=2, Dk=32 + one 8-dim attribute) up to L=2048, where the naive
# reference's B·H·L² fp32 tensors are 1 GiB each (a few at once: fits 24 GiB, ~10 s per call).
CPU_BATCH = 2 if bench_size() == "tiny" else 32
CPU_MAX_SEQ_LEN = 2048
# CUDA: a fixed token budget per batch (B·L = 64k, B capped at 128),
# so short sequences are not a launch-overhead measurement; at L=4096 this gives B=16, where
# the naive reference should fit an 80 GB GPU with room to spare (an estimate, not measured
# yet: about a dozen B·H·L² tensors of 1–2 GB at their peak). An OOM would skip the case.
CUDA_TOKENS_PER_BATCH = 65536
CUDA_MAX_BATCH = 128  # issue target: B=128, H=2, L=200, Dk=32 + one 8-dim attribute, bf16

AttentionFn = Callable[["AttnInputs"], torch.Tensor]


@dataclass(frozen=True)
class AttnShape:
    batch: int
    heads: int
    seq_len: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class AttnInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qa: Optional[torch.Tensor]  # None: no attribute stream (plain attention)
    ka: Optional[torch.Tensor]
    key_padding_mask: Optional[torch.Tensor]
    domains: torch.Tensor  # (B, L) int64, two domains (AutoCDSR's a_cd benchmarks)

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        """The tensors gradients are taken for: every stream, as in training."""
        attrs = () if self.qa is None else (self.qa, self.ka)
        return (self.q, self.k, self.v, *attrs)

    @property
    def attr_streams(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return ((), ()) if self.qa is None else ((self.qa,), (self.ka,))


def shape_for(seq_len: int, device: torch.device) -> AttnShape:
    """The benchmarked shape at this length on this device (skips what the device cannot do)."""
    if device.type == "cuda":
        batch = min(CUDA_MAX_BATCH, CUDA_TOKENS_PER_BATCH // seq_len)
        return AttnShape(batch, HEADS, seq_len, torch.bfloat16, device)
    if seq_len > CPU_MAX_SEQ_LEN:
        pytest.skip(f"L={seq_len} on CPU: the naive reference would materialize several "
                    f"B·H·L² fp32 tensors (~{4 * CPU_BATCH * HEADS * seq_len ** 2 / 2 ** 30:.0f} GiB each "
                    f"at B={CPU_BATCH}) and take minutes per round on a few cores; this length is "
                    "benchmarked on CUDA only")
    return AttnShape(CPU_BATCH, HEADS, seq_len, torch.float32, device)


def make_inputs(shape: AttnShape, streams: str = "item+attr") -> AttnInputs:
    """Seeded random streams and a left-padding mask (each row keeps a random L/4..L tail)."""
    gen = torch.Generator().manual_seed(shape.seq_len)  # drawn on CPU: same data on any device
    b, h, n = shape.batch, shape.heads, shape.seq_len

    def stream(dim: int) -> torch.Tensor:
        t = torch.randn(b, h, n, dim, generator=gen)
        return t.to(shape.device, shape.dtype).requires_grad_()

    lengths = torch.randint(max(1, n // 4), n + 1, (b,), generator=gen)
    key_padding_mask = (torch.arange(n)[None, :] < (n - lengths)[:, None]).to(shape.device)
    domains = torch.randint(0, 2, (b, n), generator=gen).to(shape.device)
    q, k, v = stream(DK), stream(DK), stream(DK)
    qa, ka = (stream(DA), stream(DA)) if streams == "item+attr" else (None, None)
    return AttnInputs(q, k, v, qa, ka, key_padding_mask, domains)


# --------------------------------------------------------------------------- providers


def _fastattn(backend: str) -> AttentionFn:
    def run(x: AttnInputs) -> torch.Tensor:
        return fastattn.dif_attention(x.q, x.k, x.v, *x.attr_streams, causal=True,
                                      key_padding_mask=x.key_padding_mask, backend=backend)
    return run


_OPTS = AttentionOptions(scale=SCALE, causal=True)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qa: Optional[torch.Tensor],
               ka: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # Tensors (or None) only in the signature, so dynamo guards on shapes and not on Python objects.
    attrs = ((), ()) if qa is None else ((qa,), (ka,))
    return dif_attention_reference(q, k, v, *attrs, _OPTS, key_padding_mask)[0]


@functools.lru_cache(maxsize=None)
def _compiled_reference() -> Callable[..., torch.Tensor]:
    # One compiled wrapper for the whole session: dynamo specializes it per shape (a handful of
    # lengths, below its recompile limit) and modes share the compiled kernels.
    return compile_for_bench(_reference)


def _torch_compile(x: AttnInputs) -> torch.Tensor:
    return _compiled_reference()(x.q, x.k, x.v, x.qa, x.ka, x.key_padding_mask)


def _sdpa(x: AttnInputs) -> torch.Tensor:
    """SDPA on the concatenated streams; the concatenation is part of the timed work."""
    q = x.q if x.qa is None else torch.cat([x.q, x.qa], dim=-1)
    k = x.k if x.ka is None else torch.cat([x.k, x.ka], dim=-1)
    # Fused SDPA kernels (flash on CPU and CUDA, cuDNN) require the V head dim to equal the QK
    # head dim (40 vs 32 here), and would otherwise fall back to the slow math path. So V is
    # zero-padded to 40 and the extra output columns (all zero) are sliced off: the padding
    # costs 25% more P·V work but keeps SDPA on its best kernels, a fair baseline.
    dv = x.v.shape[-1]
    v = F.pad(x.v, (0, q.shape[-1] - dv))
    if x.key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
    else:
        # Bool mask, True = attend, broadcast over heads. Rows with no visible key (a padded
        # query sees only padding) are zeros with torch 2.13's CPU kernels, like ours; other
        # kernels may differ, which is why the correctness check skips those rows.
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = causal & ~x.key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    return out[..., :dv]


def _cpp_unavailable(device: torch.device) -> Optional[str]:
    """Why the C++ kernels are no provider here (they run on CPU tensors, once built), or None."""
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors (benchmark device: {device.type})"
    from fastattn.ops.cpp_extension import cpp_unavailable_reason

    return cpp_unavailable_reason()


def _provider_unavailable(provider: str, device: torch.device) -> Optional[str]:
    """Why a fastattn backend provider ("triton…", "cpp…") cannot run on `device`, or None."""
    if provider.startswith("triton"):
        return triton_unavailable(device)
    if provider.startswith("cpp"):
        return _cpp_unavailable(device)
    return None


PROVIDERS: dict[str, AttentionFn] = {
    "triton": _fastattn("triton"),
    "cpp": _fastattn("cpp"),
    "torch": _fastattn("torch"),
    "torch_compile": _torch_compile,
    "sdpa": _sdpa,
}
# Why a provider's warm-up may fail without that being a bug: it then skips with the reason.
_SKIP_ON: dict[str, tuple[tuple[type[BaseException], str], ...]] = {
    "triton": ((fastattn.BackendUnavailable, "fastattn's Triton backend cannot run"),),
    "cpp": ((fastattn.BackendUnavailable, "fastattn's C++ backend cannot run"),),
    "torch_compile": (COMPILE_FAILURE,),
}


def _check_against_reference(fn: AttentionFn, x: AttnInputs) -> None:
    """Untimed: the provider's output matches the fp32 reference on rows that see a key."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the reference in IEEE float32, whatever is timed
    try:
        with torch.no_grad():
            qa, ka = (None, None) if x.qa is None else (x.qa.float(), x.ka.float())
            expected = _reference(x.q.float(), x.k.float(), x.v.float(), qa, ka, x.key_padding_mask)
    finally:
        torch.set_float32_matmul_precision(precision)
    got = fn(x).detach().float()  # grad enabled, as timed: no_grad would recompile torch.compile
    # Rows without a visible key are 0 by our contract; SDPA's value there is version dependent.
    b, _, n, _ = got.shape
    rows = visible_keys(b, n, n, True, x.key_padding_mask, got.device).any(dim=-1)  # (B, 1, L)
    rows = rows[..., None].expand_as(got)
    # float32: 1e-3 in "highest" (IEEE or tf32x3 products); tf32 ("high"/"medium") keeps a 10-bit
    # mantissa, 5e-3 (tests/test_cuda.py's bound for that mode); bf16/fp16 5e-2.
    if x.q.dtype != torch.float32:
        tol = 5e-2
    else:
        tol = 1e-3 if precision == "highest" else 5e-3
    torch.testing.assert_close(got[rows], expected[rows], atol=tol, rtol=tol,
                               msg=lambda m: f"provider output differs from the reference (L={n}): {m}")


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("streams", STREAMS)
def test_dif_attention(
    benchmark: BenchmarkFixture, bench_device: torch.device, streams: str, mode: str, seq_len: int, provider: str
) -> None:
    if (reason := _provider_unavailable(provider, bench_device)) is not None:
        pytest.skip(reason)
    if provider == "torch_compile" and mode not in COMPILE_MODES:
        pytest.skip(COMPILE_MODE_SKIP)
    shape = shape_for(seq_len, bench_device)
    x = make_inputs(shape, streams)
    fn = PROVIDERS[provider]
    run_benchmark(
        benchmark,
        mode=mode,
        forward=lambda: fn(x),
        inputs=x.leaves,
        device=bench_device,
        group=f"attention {mode} L={seq_len}" + ("" if streams == "item+attr" else " no attributes"),
        extra_info={
            "op": "dif_attention" if streams == "item+attr" else "attention", "provider": provider,
            "L": seq_len, "B": shape.batch, "H": shape.heads, "Dk": DK, "Da": DA if streams == "item+attr" else 0,
            "dtype": str(shape.dtype).removeprefix("torch."), "causal": True,
            "padded_fraction": round(float(x.key_padding_mask.float().mean()), 3),
        },
        skip_on=_SKIP_ON.get(provider, ()),
        check=None if provider == "torch" else functools.partial(_check_against_reference, fn, x),
    )


# --------------------------------------------------------------------------- a_cd overhead
# AutoCDSR's cross-domain attention mass: its cost on top of the fused attention (fwd+bwd, with
# a loss on both out and acd so acd's gradient runs), next to the reference that materializes P.


def _acd_provider(backend: str, with_domains: bool) -> AttentionFn:
    def run(x: AttnInputs) -> torch.Tensor:
        domains = x.domains if with_domains else None
        res = fastattn.dif_attention(x.q, x.k, x.v, (x.qa,), (x.ka,), causal=True,
                                     key_padding_mask=x.key_padding_mask, domains=domains, backend=backend)
        out, acd = res if with_domains else (res, None)
        pooled = out.float().sum(dim=-1)  # (B, H, L): one tensor carrying both losses' gradients
        return pooled if acd is None else pooled + acd
    return run


ACD_PROVIDERS: dict[str, AttentionFn] = {
    "triton": _acd_provider("triton", False),
    "triton+acd": _acd_provider("triton", True),
    "cpp": _acd_provider("cpp", False),
    "cpp+acd": _acd_provider("cpp", True),
    "torch+acd": _acd_provider("torch", True),
}


@pytest.mark.parametrize("provider", list(ACD_PROVIDERS))
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"L{n}")
def test_acd_overhead(benchmark: BenchmarkFixture, bench_device: torch.device, seq_len: int, provider: str) -> None:
    if (reason := _provider_unavailable(provider, bench_device)) is not None:
        pytest.skip(reason)
    shape = shape_for(seq_len, bench_device)
    x = make_inputs(shape)
    fn = ACD_PROVIDERS[provider]
    run_benchmark(
        benchmark, mode="fwd+bwd", forward=lambda: fn(x), inputs=x.leaves, device=bench_device,
        group=f"acd fwd+bwd L={seq_len}",
        extra_info={"op": "dif_attention+acd", "provider": provider, "L": seq_len, "B": shape.batch,
                    "H": shape.heads, "dtype": str(shape.dtype).removeprefix("torch."), "domains": 2},
        skip_on=_SKIP_ON.get(provider.split("+")[0], ()),
    )
