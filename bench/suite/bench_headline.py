"""The headline cases on a CUDA GPU: a short run that answers "is it fast where it matters".

bench/gpu.sh runs these first (a lent GPU's slot is minutes long), the full suites after.

- attention: DIF-SR's decoupled attention at B 128, H 2, L 200, item head dim 32 plus one 8-dim
  attribute stream, causal, left padding (bench_attention's inputs). fwd and fwd+bwd in
  bfloat16 and in float32 under both matmul precisions ("highest": our kernels' tf32x3, torch's
  IEEE fp32; "high": tf32 for both). Providers: triton (fastattn's kernels), torch (the
  reference that materializes the L×L scores) and sdpa (F.scaled_dot_product_attention on the
  concatenated [q|qa]·[k|ka]ᵀ, V zero-padded to 40).
- cross-entropy: N ∈ {8192, 51,200} rows × V ∈ {10k, 100k, 1M} items, D 64, bfloat16, fwd+bwd,
  hard targets with 5 % ignored rows (bench_cross_entropy's inputs). Providers: fastattn_triton,
  naive (matmul + F.cross_entropy; skipped where its N×V buffers would not fit the GPU), liger
  and cce (Liger-Kernel and Cut Cross-Entropy, when installed).

CUDA only: on a CPU every case skips with the reason. Each timed case is first checked against
the float32 reference (untimed), as in the suites it borrows from.

Run: python -m fastattn.bench --device cuda -k headline --out DIR
"""
from __future__ import annotations

import functools
import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

import bench_attention as attn
import bench_cross_entropy as ce
from _common import run_benchmark, triton_unavailable

ATTN_BATCH, ATTN_SEQ_LEN = 128, 200
# (dtype, float32 matmul precision): bf16 ignores the precision; float32 is measured under both.
ATTN_PRECISIONS = {
    "bf16": (torch.bfloat16, "highest"),
    "fp32-highest": (torch.float32, "highest"),
    "fp32-high": (torch.float32, "high"),
}
ATTN_PROVIDERS = ("triton", "torch", "sdpa")
ATTN_MODES = ("fwd", "fwd+bwd")

CE_ROWS = (8192, 51_200)
CE_VOCABS = (10_000, 100_000, 1_000_000)
CE_PROVIDERS = ("fastattn_triton", "naive", "liger", "cce")
# naive holds ~3 N×V buffers in fwd+bwd (bench_cross_entropy.NAIVE_LOGITS_BUFFERS); past this
# fraction of the GPU's memory it would only measure an out-of-memory error.
NAIVE_MEMORY_FRACTION = 0.8


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("the headline cases are CUDA measurements (run with --device cuda)")


@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
@pytest.mark.parametrize("mode", ATTN_MODES)
@pytest.mark.parametrize("precision", list(ATTN_PRECISIONS))
def test_headline_attention(benchmark: BenchmarkFixture, bench_device: torch.device, precision: str, mode: str,
                            provider: str) -> None:
    _cuda_only(bench_device)
    if provider == "triton" and (reason := triton_unavailable(bench_device)) is not None:
        pytest.skip(reason)
    dtype, matmul_precision = ATTN_PRECISIONS[precision]
    shape = attn.AttnShape(ATTN_BATCH, attn.HEADS, ATTN_SEQ_LEN, dtype, bench_device)
    x = attn.make_inputs(shape)
    fn = attn.PROVIDERS[provider]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        run_benchmark(
            benchmark, mode=mode, forward=lambda: fn(x), inputs=x.leaves, device=bench_device,
            group=f"headline attention {mode} {precision}",
            extra_info={"op": "dif_attention", "provider": provider, "L": ATTN_SEQ_LEN, "B": ATTN_BATCH,
                        "H": attn.HEADS, "Dk": attn.DK, "Da": attn.DA, "dtype": str(dtype).removeprefix("torch."),
                        "float32_matmul_precision": matmul_precision, "causal": True},
            skip_on=attn._SKIP_ON.get(provider, ()),
            check=None if provider == "torch" else functools.partial(attn._check_against_reference, fn, x),
        )
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("provider", CE_PROVIDERS)
@pytest.mark.parametrize("items", CE_VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("rows", CE_ROWS, ids=lambda n: f"N{n}")
def test_headline_cross_entropy(benchmark: BenchmarkFixture, bench_device: torch.device, rows: int, items: int,
                                provider: str) -> None:
    _cuda_only(bench_device)
    shape = ce.CEShape(rows, items, torch.bfloat16, bench_device)
    if (reason := ce._unavailable(provider, shape, "fwd+bwd")) is not None:
        pytest.skip(reason)
    if provider in ce.MATERIALIZING:
        need = shape.logits_bytes * ce.NAIVE_LOGITS_BUFFERS["fwd+bwd"]
        total = torch.cuda.get_device_properties(bench_device).total_memory
        if need > NAIVE_MEMORY_FRACTION * total:
            pytest.skip(f"naive fwd+bwd at N={rows}, V={items} would hold ~{need / 1e9:.0f} GB of N×V buffers, "
                        f"over {NAIVE_MEMORY_FRACTION:.0%} of this GPU's {total / 1e9:.0f} GB")
    x = ce.make_inputs(shape)
    fn = ce.PROVIDERS[provider]
    run_benchmark(
        benchmark, mode="fwd+bwd", forward=lambda: fn(x), inputs=x.leaves, device=bench_device,
        group=f"headline cross_entropy fwd+bwd N={rows} V={items}",
        extra_info=ce._extra_info("full_item_cross_entropy", provider, shape),
        skip_on=ce._SKIP_ON.get(provider, ()),
        check=None if provider == "naive" else functools.partial(ce._check_loss, fn, shape),
    )
