"""fastattn's Triton kernels on a real CUDA GPU against the float64 CPU references (docs/gpu-resources.md).

`bench/gpu.sh` runs this file on a lent GPU with TRITON_INTERPRET=0, so the kernels are the
compiled ones, at sizes that fill thread blocks (B·H = 8, L up to 1024, V up to 50 257). On a
machine without a GPU the module is skipped; with FASTATTN_TEST_DEVICE=cpu the same tests run on
CPU tensors through the Triton interpreter (that is how this file itself is checked off-GPU), with
the big cases (L = 1024, V = 50 257) skipped: with them the interpreter needs ~20 minutes.
On a GPU, compiling the kernel variants dominates the run time; see "Compile economy" below.

Every comparison is against the torch reference in float64 on CPU. float32 must match within
attention_cases.FP32_TOL (cross-entropy: the 2e-5 of test_cross_entropy.assert_close) relative to
the largest value; float16/bfloat16 must be at most twice as far from the truth as the same
reference run in that dtype, plus a small slack (the rule of test_attention / test_cross_entropy).

float32 dots follow torch.get_float32_matmul_precision() (ops/_common.py): "highest" → tf32x3,
"high"/"medium" → tf32. Every test here runs in "highest" (the autouse fixture
`float32_matmul_precision_highest` pins it and restores the caller's mode), so the float32
tolerances above are those of tf32x3; test_float32_precision_modes checks both modes against
torch's own float32 error ("highest") and a stated tf32 tolerance ("high").
Helpers are reused from tests/ops/attention_cases.py and tests/ops/catalog_cases.py; this file only moves their
inputs to the device and the results back.

Last, a training step of SASRec and DIF-SR (issue 16): under torch.cuda.set_sync_debug_mode("error")
(no device→host sync), and captured in a CUDA graph whose replays equal eager steps. They need
CUDA itself, so with FASTATTN_TEST_DEVICE=cpu they skip (with the reason).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import pytest
import torch

import fastattn
from fastattn import nn as fnn
from fastattn._dispatch import triton_interpreted
from fastattn.ops.attention.function import draw_seed
from fastattn.ops.attention.triton_fwd import dropout_keep_mask, dropout_keep_rows

from attention_cases import (FP32_TOL, Case, make_inputs, max_err, reference_keep_rows, run_fastattn, run_reference,
                             with_grad)
from catalog_cases import (assert_close, check_topk, dense_soft_loss, make_case, random_soft_target, run,
                           run_naive)

# ---------------------------------------------------------------- float32 matmul precision
@pytest.fixture(autouse=True)
def float32_matmul_precision_highest() -> Any:
    """Pin torch's float32 matmul precision to "highest" (the Triton kernels: tf32x3 dots; torch's
    references: IEEE float32 matmuls) for every test; a test may set another mode, restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------- device selection
SKIP_REASON = (
    "needs a CUDA GPU (bench/gpu.sh runs it there); on CPU the Triton kernels are checked in the "
    "interpreter by tests/ops/test_attention.py / tests/ops/test_cross_entropy.py and compiled for sm_80/sm_90 by "
    "test_gpu_compile.py — set FASTATTN_TEST_DEVICE=cpu to run this file in the interpreter"
)


def _select_device() -> str:
    """The device the tests run on: "cuda", or "cpu" (the interpreter); skips the module otherwise.

    FASTATTN_TEST_DEVICE: unset → CUDA when visible, else skip; "cpu" → the interpreter even on
    a GPU machine; "cuda" → CUDA or a hard error (so a GPU job cannot pass by skipping everything).
    """
    wanted = os.environ.get("FASTATTN_TEST_DEVICE", "")
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(f"FASTATTN_TEST_DEVICE must be 'cpu', 'cuda' or unset, got {wanted!r}")
    if wanted == "cpu":
        if not triton_interpreted():  # an explicit request that cannot be honoured fails, like "cuda" below
            raise RuntimeError("FASTATTN_TEST_DEVICE=cpu runs the Triton kernels in the interpreter, which needs "
                               "TRITON_INTERPRET=1 (tests/conftest.py sets it unless it is set already)")
        return "cpu"
    if not torch.cuda.is_available():
        if wanted == "cuda":
            raise RuntimeError("FASTATTN_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
        pytest.skip(SKIP_REASON, allow_module_level=True)
    if triton_interpreted():
        # tests/conftest.py defaults TRITON_INTERPRET to 1: on a GPU machine this file is about the
        # compiled kernels, and the big cases would take minutes each in the interpreter.
        reason = ("a CUDA GPU is visible but TRITON_INTERPRET=1: this file checks the compiled kernels; "
                  "run it with TRITON_INTERPRET=0 (bench/gpu.sh does)")
        if wanted == "cuda":
            raise RuntimeError(reason)
        pytest.skip(reason, allow_module_level=True)
    return "cuda"


DEVICE = _select_device()

# Cases the interpreter would need minutes for (L = 1024 attention, a 50k-item catalog).
CUDA_ONLY = pytest.mark.skipif(
    DEVICE != "cuda", reason="L=1024 / V=50257: minutes in the Triton interpreter, so it runs on CUDA only")


def cuda_only(*values: Any, id: Optional[str] = None) -> Any:
    return pytest.param(*values, marks=CUDA_ONLY, id=id)


# Same slack as attention_cases.check_against_truth and test_cross_entropy's low-precision test.
LOW_PRECISION_SLACK = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def to_device(x: Any) -> Any:
    """Tensors (also inside dicts, lists, tuples and SoftTargets) moved to DEVICE; other values unchanged."""
    if isinstance(x, (torch.Tensor, fastattn.SoftTarget)):
        return x.to(DEVICE)
    if isinstance(x, dict):
        return {key: to_device(val) for key, val in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(val) for val in x)
    return x


def to_cpu(x: Any) -> Any:
    """Detached CPU copies of the tensors in x (dicts, lists and tuples too)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {key: to_cpu(val) for key, val in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu(val) for val in x)
    return x


def assert_within(name: str, got: torch.Tensor, truth: torch.Tensor, low: Optional[torch.Tensor],
                  dtype: torch.dtype) -> None:
    """got (a kernel result) vs truth (float64): FP32_TOL relative to the largest value for float32
    (precision "highest": tf32x3 dots); for float16/bfloat16 at most 2× the error of `low` (the
    reference in that dtype) plus slack."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: not finite"
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    err = max_err(got, truth)
    if dtype == torch.float32:
        bound = FP32_TOL * scale
    else:
        bound = 2 * max_err(low, truth) + LOW_PRECISION_SLACK[dtype] * scale
    assert err <= bound, f"{name}: err {err:.3e} > bound {bound:.3e}"


# ---------------------------------------------------------------- attention
def check_attention(case: Case, dtype: torch.dtype = torch.float32, which: str = "out", seed: int = 0) -> None:
    """Forward and every input gradient of backend="triton" on DEVICE vs the float64 CPU reference.

    which ∈ {out, acd, both} (acd only with case.n_domains): the loss is Σ out·g_out, Σ acd·g_acd,
    or both. With dropout, the reference runs with the kernel's own keep-mask, drawn on DEVICE
    for the seed the autograd Function draws after the same torch.manual_seed.
    """
    inputs = make_inputs(case, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dv or case.dk, generator=gen)
    grad_acd = torch.randn(case.b, case.h, case.lq, generator=gen) if case.n_domains and which != "out" else None
    if which == "acd":
        grad_out.zero_()
    keep = None
    if case.dropout_p:
        torch.manual_seed(seed + 4321)
        # The operator draws its seed on the streams' device (the CUDA generator on a GPU).
        keep = dropout_keep_mask(draw_seed(DEVICE), case.dropout_p, case.b, case.h, case.lq, case.keys,
                                 torch.device(DEVICE)).cpu()
    torch.manual_seed(seed + 4321)
    out, acd, grads = to_cpu(run_fastattn(case, with_grad(to_device(inputs)), "triton", grad_out.to(DEVICE),
                                          None if grad_acd is None else grad_acd.to(DEVICE)))
    ref_out, ref_acd, ref_grads = run_reference(case, inputs, grad_out, grad_acd, dropout_keep=keep)
    low_out, low_acd, low_grads = (None, None, [None] * len(grads)) if dtype == torch.float32 else \
        run_reference(case, inputs, grad_out, grad_acd, dropout_keep=keep, dtype=dtype)

    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    n_attr = len(case.attr_dims)
    names = ["dq", "dk", "dv"] + [f"dattr_q[{i}]" for i in range(n_attr)] + [f"dattr_k[{i}]" for i in range(n_attr)]
    assert_within("out", out, ref_out, low_out, dtype)
    if case.n_domains:
        assert acd is not None and acd.dtype == torch.float32 and acd.shape == (case.b, case.h, case.lq)
        assert_within("acd", acd, ref_acd, low_acd, dtype)
    else:
        assert acd is None
    for name, g, t, low in zip(names, grads, ref_grads, low_grads):
        assert_within(name, g, t, low, dtype)


def case_id(c: Case) -> str:
    parts = [f"L{c.lq}" if c.lk is None else f"Lq{c.lq}-Lk{c.lk}", f"d{c.dk}" + "".join(f"+{d}" for d in c.attr_dims),
             "causal" if c.causal else "full"]
    if c.padding:
        parts.append(f"pad-{c.padding}")
    if c.n_domains:
        parts.append(f"dom{c.n_domains}")
    if c.dropout_p:
        parts.append(f"p{c.dropout_p}")
    return "-".join(parts)


# Compile economy. The three attention kernels are compiled anew for every distinct dtype, tile
# class, HAS_DROPOUT / HAS_DOMAINS, and pattern of "== 1" / "multiple of 16" over the length,
# head-dim and stride arguments (Triton specializes integer arguments on both) — on a GPU host
# measured ~10 s for float32 when its dots were IEEE FMA loops (now tf32x3 in "highest", three
# tensor-core products per dot: not yet timed on a GPU), and ~2 s for fp16/bf16; each float32
# matmul precision mode is one more variant. Causal and key padding are runtime flags and cost nothing. So the cases come in
# shape families whose members share one compiled variant, each family covering what varies at
# run time (lengths that end mid-block, causal or not, padding, Lq != Lk): 8 float32 and 15
# fp16/bf16 variants in all (5 of them CUDA only), where a full cross product compiles ~50.
#   d32+8  DIF-SR's split (items 32 + one attribute stream of 8: QK 40, 64-wide tiles). Its q/k
#          strides are multiples of 16 only for even L, so L ∈ {7, 129} with Lq ≠ Lk among
#          them is one family, L ∈ {512, 1024} another (CUDA); L = 1 and L = 200 run in
#          fp16/bf16 only.
#   d32    items alone: every stride is a multiple of 16, so L ∈ {7, 129, 200} and their cross
#          pairs share one variant (one more with key padding, whose stride is Lk).
#   d24+50 odd widths (QK 74 → 128-wide tiles, V 24): L ∈ {7, 129} with 7 ↔ 129 cross pairs.
STREAMS = {"d32": (32, ()), "d32+8": (32, (8,)), "d24+50": (24, (50,))}


def family(streams: str, pairs: list[tuple[int, int]], causal: tuple[bool, ...] = (True, False),
           padding: tuple[Optional[str], ...] = (None,), big: bool = False, dtype: Optional[torch.dtype] = None,
           **extra: Any) -> list[Any]:
    """pytest params (case,) — or (dtype, case) when dtype is given — for every (Lq, Lk) pair ×
    causal × padding of one stream layout, with B=4, H=2; big: CUDA only."""
    dk, attr_dims = STREAMS[streams]
    params = []
    for lq, lk in pairs:
        for c in causal:
            for pad in padding:
                case = Case(b=4, h=2, lq=lq, lk=None if lk == lq else lk, dk=dk, attr_dims=attr_dims, causal=c,
                            padding=pad, **extra)
                values = (case,) if dtype is None else (dtype, case)
                name = case_id(case) if dtype is None else f"{str(dtype).removeprefix('torch.')}-{case_id(case)}"
                params.append(pytest.param(*values, id=name, marks=[CUDA_ONLY] if big else []))
    return params


ODD = [(7, 7), (129, 129), (7, 129), (129, 7)]  # lengths that end mid-block, and Lq ≠ Lk both ways
PADDED = ("left", "full_row")

FP32_CASES = [
    *family("d32+8", ODD, padding=PADDED),
    *family("d32", [(7, 7), (129, 129), (200, 200), (7, 200), (200, 7)]),
    *family("d32", [(129, 129), (200, 200), (7, 200)], padding=PADDED),
    *family("d24+50", ODD),
    *family("d32+8", [(1024, 1024)], padding=(None, *PADDED), big=True),
    *family("d32+8", [(512, 1024), (1024, 512)], padding=("left",), big=True),
]


@pytest.mark.parametrize("case", FP32_CASES)
def test_attention_float32(case: Case) -> None:
    check_attention(case)


def _low_precision_cases(dtype: torch.dtype) -> list[Any]:
    cases = [
        # L = 1 (Lq == Lk == 1 is specialized into the kernels) is checked here, where a variant is cheap
        *family("d32+8", [(1, 1)], dtype=dtype),
        *family("d32+8", [(129, 129)], causal=(True,), padding=("left",), dtype=dtype),
        *family("d32+8", [(7, 129)], causal=(False,), padding=("full_row",), dtype=dtype),
        *family("d32+8", [(200, 200)], causal=(True,), padding=("left",), dtype=dtype),
        *family("d24+50", [(129, 129)], causal=(False,), dtype=dtype),
        *family("d24+50", [(129, 7)], causal=(True,), dtype=dtype),
        *family("d32", [(1024, 1024)], causal=(True,), big=True, dtype=dtype),
        *family("d32", [(512, 1024)], causal=(False,), big=True, dtype=dtype),
    ]
    if dtype == torch.bfloat16:  # the 128-wide tiles over a long sequence (bf16: the training dtype)
        cases += family("d24+50", [(1024, 1024)], causal=(False,), padding=("full_row",), big=True, dtype=dtype)
    return cases


@pytest.mark.parametrize("dtype,case", _low_precision_cases(torch.float16) + _low_precision_cases(torch.bfloat16))
def test_attention_low_precision(dtype: torch.dtype, case: Case) -> None:
    check_attention(case, dtype)


# Domains: the d32+8 family with padding, self and cross attention (acd of cross attention
# compares query and key domains).
DOMAIN_CASES = [
    *family("d32+8", [(129, 129)], causal=(True,), padding=("left",), n_domains=2),
    *family("d32+8", [(7, 129)], causal=(False,), padding=("full_row",), n_domains=3),
    *family("d32+8", [(129, 7)], causal=(True,), padding=("left",), n_domains=5),
]


@pytest.mark.parametrize("case", DOMAIN_CASES)
@pytest.mark.parametrize("which", ["out", "acd", "both"])
def test_attention_domains(which: str, case: Case) -> None:
    check_attention(case, which=which)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_domains_low_precision(dtype: torch.dtype) -> None:
    check_attention(Case(b=4, h=2, lq=129, dk=32, attr_dims=(8,), padding="left", n_domains=2), dtype, which="both")


# Dropout: the reference runs with the kernel's own keep-mask (drawn on the device).
DROPOUT_CASES = [
    *family("d32+8", [(129, 129)], causal=(True,), padding=("left",), dropout_p=0.3),
    *family("d32+8", [(129, 7)], causal=(False,), padding=("full_row",), dropout_p=0.1),
]


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_matches_reference_with_kernel_mask(case: Case) -> None:
    check_attention(case)


@pytest.mark.parametrize("case", [
    *family("d32+8", [(129, 129)], causal=(True,), padding=("left",), dropout_p=0.3),
    # acd must come from the probabilities before dropout: a mix-up is off by ~p·acd ≫ the slack
    *family("d32+8", [(7, 129)], causal=(False,), padding=("full_row",), dropout_p=0.2, n_domains=3),
])
def test_dropout_matches_reference_with_kernel_mask_bf16(case: Case) -> None:
    check_attention(case, torch.bfloat16, which="both" if case.n_domains else "out")


@pytest.mark.parametrize("case", [
    *family("d32+8", [(1024, 1024)], causal=(True,), padding=("left",), dropout_p=0.1, n_domains=2, big=True),
    *family("d32+8", [(1024, 512)], causal=(False,), padding=("full_row",), dropout_p=0.1, n_domains=2, big=True),
])
def test_dropout_and_domains_long_sequences(case: Case) -> None:
    check_attention(case, which="both")


def test_dropout_same_seed_same_output_and_grads() -> None:
    case = Case(b=4, h=2, lq=129, dk=32, attr_dims=(8,), padding="left", dropout_p=0.3)
    inputs = to_device(make_inputs(case))
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(run_fastattn(case, with_grad(inputs), "triton", grad_out))
    (o1, _, g1), (o2, _, g2), (o3, _, g3) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3) and not torch.equal(g1[0], g3[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p: float) -> None:
    """The device's keep-mask keeps 1 − p of the probabilities (4 sigma), uncorrelated across heads."""
    keep = dropout_keep_mask(99, p, 4, 2, 129, 200, torch.device(DEVICE)).float().cpu()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    for a, c in ((keep[0, 0], keep[0, 1]), (keep[0, 0], keep[1, 0])):  # another head, another batch row
        a, c = a.flatten(), c.flatten()
        corr = ((a - a.mean()) * (c - c.mean())).mean() / (a.std() * c.std())
        assert abs(corr.item()) < 4 / math.sqrt(a.numel())


@pytest.mark.parametrize("lk,first_row", [(200, 0), (70, 2**33 + 5)])
def test_dropout_mask_is_the_documented_philox(lk: int, first_row: int) -> None:
    """The compiled kernel (four Philox words interleaved along the keys, 64-bit counters beyond
    2**32) draws the documented scheme bit for bit, so it equals the C++ kernels' mask too."""
    seed = 2**62 + 2**35 + 12345
    got = dropout_keep_rows(seed, 0.3, lk, first_row, 5, torch.device(DEVICE)).cpu()
    assert torch.equal(got, reference_keep_rows(seed, 0.3, lk, first_row, 5))


def test_fully_padded_rows_are_zero_with_zero_grads() -> None:
    # Batch row 0 has only padding keys; in row 1 the first 50 queries (causal) see only padding.
    case = Case(b=4, h=2, lq=129, dk=32, attr_dims=(8,), padding="full_row", causal=True)
    inputs = make_inputs(case)
    inputs["key_padding_mask"][1, :50] = True
    grad_out = torch.ones(case.b, case.h, case.lq, case.dk, device=DEVICE)
    out, _, grads = to_cpu(run_fastattn(case, with_grad(to_device(inputs)), "triton", grad_out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[0] == 0).all() and (out[1, :, :50] == 0).all()
    assert all((g[0] == 0).all() for g in grads)
    assert (grads[0][1, :, :50] == 0).all() and (grads[3][1, :, :50] == 0).all()  # dq and dattr_q


def test_non_contiguous_inputs() -> None:
    # (B, L, H, D) projections viewed as (B, H, L, D), as a model passes them; the Function
    # concatenates the streams into contiguous buffers, and the gradients come back as views.
    torch.manual_seed(0)
    case = Case(b=4, h=2, lq=129, dk=32, attr_dims=(8,), padding="left")
    inputs = to_device(make_inputs(case))
    for key in ("q", "k", "v"):
        inputs[key] = inputs[key].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[key].is_contiguous()
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk)
    out, _, grads = to_cpu(run_fastattn(case, with_grad(inputs), "triton", grad_out.to(DEVICE)))
    ref_out, _, ref_grads = run_reference(case, to_cpu(inputs), grad_out)
    assert_within("out", out, ref_out, None, torch.float32)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_within(f"grad {i}", g, r, None, torch.float32)


# ---------------------------------------------------------------- full-catalog cross-entropy
def run_ce(case: dict, target: object = None, grad: Optional[torch.Tensor] = None, **kw: object
           ) -> tuple[torch.Tensor, list]:
    """test_cross_entropy.run with backend="triton" on DEVICE; results back on CPU."""
    loss, grads = run(to_device(case), "triton", target=to_device(target) if target is not None else None,
                      grad=None if grad is None else grad.to(DEVICE), **kw)
    return to_cpu(loss), to_cpu(grads)


def assert_ce_low_precision(got: tuple, truth: tuple, low: tuple, dtype: torch.dtype) -> None:
    """As test_cross_entropy.test_low_precision_error_bound: the loss is float32, gradients in dtype."""
    names = ("loss", "hidden", "item_weight", "bias")
    for name, g, t, lo in zip(names, [got[0], *got[1]], [truth[0], *truth[1]], [low[0], *low[1]]):
        assert (g is None) == (t is None), name
        if g is None:
            continue
        assert g.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_within(name, g, t, lo, dtype)


# Cross-entropy variants compile per tile class (D 64 → 64, D 100 → 128), dtype, bias or not
# and V == 1; V = 1000 and V = 50 257 share one. So V = 1 runs in float32 at D = 64 only.
def _ce_params(dtype: torch.dtype, shapes: list[tuple[int, int]]) -> list[Any]:
    name = str(dtype).removeprefix("torch.")
    return [pytest.param(v, d, dtype, id=f"V{v}-D{d}-{name}", marks=[CUDA_ONLY] if v > 10_000 else [])
            for v, d in shapes]


CE_SHAPES = (_ce_params(torch.float32, [(1, 64), (1000, 64), (1000, 100), (50_257, 64), (50_257, 100)])
             + _ce_params(torch.bfloat16, [(1000, 64), (1000, 100), (50_257, 64), (50_257, 100)]))


@pytest.mark.parametrize("v,d,dtype", CE_SHAPES)
def test_cross_entropy_hard_targets(v: int, d: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    case = make_case(257, v, d, dtype=dtype)  # ~30% of the rows are ignore_index
    got = run_ce(case, temperature=0.7)
    truth = run_naive(case, temperature=0.7)
    if dtype == torch.float32:
        assert_close(got, truth)
    else:
        assert_ce_low_precision(got, truth, run_naive(case, dtype=dtype, temperature=0.7), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_cross_entropy_reductions_and_ignore_index(ignore: str, reduction: str) -> None:
    torch.manual_seed(0)
    case = make_case(129, 1000, 64, ignore=ignore)
    grad = torch.randn(129) if reduction == "none" else None  # each row weighted by its own gradient
    got = run_ce(case, grad=grad, reduction=reduction)
    if ignore == "all" and reduction == "mean":
        # torch's mean over zero rows is NaN; ours is 0 with zero gradients by contract.
        assert got[0].abs().max() == 0 and all(g is None or (g == 0).all() for g in got[1])
        return
    assert_close(got, run_naive(case, grad=grad, reduction=reduction))


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("v", [1000, cuda_only(50_257, id="50257")])
def test_cross_entropy_label_smoothing_and_bias(v: int, with_bias: bool, label_smoothing: float) -> None:
    torch.manual_seed(0)
    case = make_case(129, v, 64, with_bias=with_bias)
    kw = dict(label_smoothing=label_smoothing, temperature=2.5)
    assert_close(run_ce(case, **kw), run_naive(case, **kw))


@pytest.mark.parametrize("v,d,dtype", _ce_params(torch.float32, [(1, 64), (1000, 100), (50_257, 64)])
                         + _ce_params(torch.bfloat16, [(1000, 100), (50_257, 64)]))
def test_cross_entropy_soft_targets(v: int, d: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    n = 129
    case = make_case(n, v, d, dtype=dtype)
    st = random_soft_target(n, v, ignored_rows=(0, n // 2))  # two rows of mass 0: ignored
    kw = dict(temperature=0.5, label_smoothing=0.1)
    got = run_ce(case, target=st, **kw)
    dense = st.to_dense(v)
    truth = dense_soft_loss(case, dense, **kw)
    if dtype == torch.float32:
        assert_close(got, truth)
    else:
        assert_ce_low_precision(got, truth, dense_soft_loss(case, dense.to(dtype), dtype=dtype, **kw), dtype)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("with_exclude", [False, True], ids=["all-items", "exclude"])
@pytest.mark.parametrize("v,k", [(1, 1), (1000, 20), cuda_only(50_257, 10, id="50257")])
def test_topk_items_matches_torch_topk(v: int, k: int, with_exclude: bool, backend: str) -> None:
    torch.manual_seed(0)

    def on_device(h: torch.Tensor, w: torch.Tensor, kk: int, b: Optional[torch.Tensor],
                  ex: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # top-k has no Triton kernel: "torch" is the chunked GEMM + topk, which "auto" must pick
        # for CUDA tensors (the first GPU run found it resolving to "triton": a KeyError).
        return to_cpu(fastattn.topk_items(to_device(h), to_device(w), kk, bias=to_device(b), exclude=to_device(ex),
                                          backend=backend))

    check_topk(make_case(257, v, 64), k, with_exclude, on_device)


# ---------------------------------------------------------------- float32 precision modes (issue 17)
# "highest" (tf32x3: three tf32 products, the low-order ones kept): each result at most twice as
# far from the float64 truth as torch's own float32 path (the torch backend on the same device,
# IEEE float32 matmuls), plus a floor of 4 float32 ulps of the largest value (2**-22 relative):
# both round every result to float32 and sum in other orders, so where torch's error happens to
# be ~0 for a tensor, twice it would demand better than float32 itself.
# "high" (tf32: 10-bit mantissa operands, truncated by the tensor cores): 5e-3 relative to the
# largest value, ~3× the 1–2e-3 a CPU emulation of tf32 truncation gives for this attention case.
# In the interpreter (FASTATTN_TEST_DEVICE=cpu) input_precision is ignored (IEEE products), so
# there both modes check the float32 path only.
HIGHEST_FLOOR = 2.0 ** -22
HIGH_TOL = 5e-3


def assert_precision_mode(name: str, got: torch.Tensor, truth: torch.Tensor, torch_fp32: torch.Tensor,
                          mode: str) -> None:
    scale = max(1.0, truth.abs().max().item())
    err = max_err(got, truth)
    if mode == "highest":
        bound = 2 * max_err(torch_fp32, truth) + HIGHEST_FLOOR * scale
    else:
        bound = HIGH_TOL * scale
    assert err <= bound, f"{name} ({mode}): err {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("mode", ["highest", "high"])
def test_attention_float32_precision_modes(mode: str) -> None:
    # DIF-SR at a training shape: items 32 + one attribute stream of 8, L 200, left padding.
    torch.manual_seed(0)
    case = Case(b=8 if DEVICE == "cuda" else 2, h=2, lq=200, dk=32, attr_dims=(8,), padding="left")
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk, generator=torch.Generator().manual_seed(1))
    truth_out, _, truth_grads = run_reference(case, inputs, grad_out)
    ref_out, _, ref_grads = to_cpu(run_fastattn(case, with_grad(to_device(inputs)), "torch", grad_out.to(DEVICE)))
    torch.set_float32_matmul_precision(mode)
    out, _, grads = to_cpu(run_fastattn(case, with_grad(to_device(inputs)), "triton", grad_out.to(DEVICE)))
    names = ["out", "dq", "dk", "dv", "dattr_q[0]", "dattr_k[0]"]
    for name, g, t, r in zip(names, [out, *grads], [truth_out, *truth_grads], [ref_out, *ref_grads]):
        assert_precision_mode(name, g, t, r, mode)


@CUDA_ONLY
@pytest.mark.parametrize("mode", ["highest", "high"])
def test_cross_entropy_float32_precision_modes(mode: str) -> None:
    # A catalog of 50 257 items at D 64 with a bias, 1024 rows (~30% ignore_index).
    torch.manual_seed(0)
    case = make_case(1024, 50_257, 64)
    truth_loss, truth_grads = run_naive(case, temperature=0.7)
    ref_loss, ref_grads = to_cpu(run(to_device(case), "torch", temperature=0.7))
    torch.set_float32_matmul_precision(mode)
    loss, grads = run_ce(case, temperature=0.7)
    names = ("loss", "hidden", "item_weight", "bias")
    for name, g, t, r in zip(names, [loss, *grads], [truth_loss, *truth_grads], [ref_loss, *ref_grads]):
        assert_precision_mode(name, g, t, r, mode)


# ---------------------------------------------------------------- nn.MultiheadAttention
MHA_E, MHA_HEADS, MHA_N = 64, 2, 4  # head dim 32


def _mha_pair(seed: int = 0) -> tuple[torch.nn.MultiheadAttention, fnn.MultiheadAttention]:
    """torch's module in float64 on CPU (the truth) and ours, with the same weights, on DEVICE."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(MHA_E, MHA_HEADS, batch_first=True)
    ours = fnn.MultiheadAttention(MHA_E, MHA_HEADS, batch_first=True, backend="triton", device=DEVICE)
    ours.load_state_dict(ref.state_dict())
    return ref.double().eval(), ours.eval()


def _mha_padding(length: int, where: str) -> torch.Tensor:
    mask = torch.zeros(MHA_N, length, dtype=torch.bool)
    n_pad = max(1, length // 4)
    if where == "left":  # causal queries before the first real key of row 0 see nothing
        mask[0, :n_pad] = True
        mask[2, :1] = True
    else:
        mask[0, length - n_pad:] = True
        mask[2, length - 1:] = True
    return mask


@pytest.mark.parametrize("mask", ["none", "bool", "is_causal"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("length", [7, 200])
def test_multihead_attention_matches_torch(length: int, padding: str, mask: str) -> None:
    ref, ours = _mha_pair()
    x = torch.randn(MHA_N, length, MHA_E)
    kpm = _mha_padding(length, padding)
    causal = ~torch.ones(length, length, dtype=torch.bool).tril()  # True = hidden
    # Grad mode stays on so torch takes its documented (non fast-path) route.
    expected, _ = ref(x.double(), x.double(), x.double(), key_padding_mask=kpm,
                      attn_mask=None if mask == "none" else causal, need_weights=False)
    xd = x.to(DEVICE)
    kw: dict = dict(is_causal=True) if mask == "is_causal" else dict(attn_mask=None if mask == "none" else
                                                                       causal.to(DEVICE))
    got, weights = ours(xd, xd, xd, key_padding_mask=kpm.to(DEVICE), need_weights=False, **kw)
    assert weights is None and got.shape == expected.shape and got.device.type == DEVICE
    got, expected = to_cpu(got), expected.detach()
    # torch gives NaN where a query sees no key; fastattn gives attention 0 → out_proj.bias there.
    defined = torch.isfinite(expected).all(-1)
    assert torch.isfinite(got).all() and defined.any()
    torch.testing.assert_close(got[defined].double(), expected[defined], atol=2e-5, rtol=1e-4)
    if not defined.all():
        assert padding == "left" and mask != "none"
        bias = to_cpu(ours.out_proj.bias).expand_as(got[~defined])
        torch.testing.assert_close(got[~defined], bias)


def test_multihead_attention_gradients_match_torch() -> None:
    """Input and parameter gradients through the fused backward (right padding, causal, no empty row)."""
    length = 200
    ref, ours = _mha_pair(seed=1)
    x = torch.randn(MHA_N, length, MHA_E)
    # A random output gradient: the parameter gradients are sums over N·L rows, and a structured
    # one (e.g. a ramp) cancels to ~0, leaving only fp32 summation noise to compare.
    grad_out = torch.randn(MHA_N, length, MHA_E)
    kpm = _mha_padding(length, "right")
    causal = ~torch.ones(length, length, dtype=torch.bool).tril()
    x_ref = x.double().requires_grad_(True)
    out_ref, _ = ref(x_ref, x_ref, x_ref, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
    (out_ref * grad_out.double()).sum().backward()
    x_ours = x.to(DEVICE).requires_grad_(True)
    out_ours, _ = ours(x_ours, x_ours, x_ours, key_padding_mask=kpm.to(DEVICE), attn_mask=causal.to(DEVICE),
                       need_weights=False)
    (out_ours * grad_out.to(DEVICE)).sum().backward()
    assert_within("attn_output", to_cpu(out_ours), out_ref.detach(), None, torch.float32)
    assert_within("input grad", to_cpu(x_ours.grad), x_ref.grad, None, torch.float32)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_within(name, to_cpu(p.grad), ref_params[name].grad, None, torch.float32)


# ---------------------------------------------------------------- a training step: no host sync, CUDA graphs
# Issue 16: a training step of a model (forward, loss, backward, Adam) reads no tensor value on the
# host, so it runs under torch.cuda.set_sync_debug_mode("error") and can be captured in a CUDA graph.
# tests/test_no_host_sync.py proves the first on the meta device for every model; these run the
# compiled Triton kernels (backend "auto" on CUDA) at a small but kernel-filling size (head dim 32).
NEEDS_CUDA = pytest.mark.skipif(
    DEVICE != "cuda", reason="sync-debug mode and CUDA graphs exist for CUDA tensors only (run on a GPU by "
                             "bench/gpu.sh); tests/test_no_host_sync.py checks the step on the meta device")
STEP_ITEMS, STEP_B, STEP_L = 200, 8, 50
STEP_MODELS = ("sasrec", "difsr")


def _step_model(name: str, dropout: float, attn_dropout: Optional[float] = None) -> torch.nn.Module:
    """SASRec (CE loss) or DIF-SR (one item feature: per-head streams 32 + 8) on CUDA, seeded weights;
    attn_dropout defaults to dropout."""
    from fastattn.models import DIFSR, SASRec, DIFSRConfig, SASRecConfig
    common = dict(num_items=STEP_ITEMS, hidden=64, layers=2, heads=2, inner=128, max_len=STEP_L,
                  dropout=dropout, attn_dropout=dropout if attn_dropout is None else attn_dropout, backend="auto")
    torch.manual_seed(0)
    if name == "sasrec":
        model = SASRec(SASRecConfig(**common))
    else:
        model = DIFSR(DIFSRConfig(**common, attribute_sizes=(6,), attribute_dim=16))
    return model.to("cuda").train()


def _step_batch(name: str) -> Any:
    """A (B, L) TrainBatch on CUDA: rows left padded to lengths 1..L, targets 0 where none follows."""
    from fastattn.data import TrainBatch
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(1, STEP_ITEMS + 1, (STEP_B, STEP_L + 1), generator=gen)
    lengths = torch.linspace(2, STEP_L + 1, STEP_B).long()  # one row without padding, one with one item
    seq[torch.arange(STEP_L + 1) < (STEP_L + 1 - lengths)[:, None]] = 0
    items, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    targets[items == 0] = 0
    attrs: tuple = ()
    target_attrs: tuple = ()
    if name == "difsr":  # one single-valued feature with ids 1..5, 0 on padding
        attr_of = torch.randint(1, 6, (STEP_ITEMS + 1,), generator=gen)
        attr_of[0] = 0
        attrs, target_attrs = (attr_of[items][..., None],), (attr_of[targets][..., None],)
    batch = TrainBatch(items=items, targets=targets, attributes=attrs, target_attributes=target_attrs)
    return batch.to("cuda")


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = model.losses(batch)["loss"]
    loss.backward()
    optimizer.step()
    return loss


@NEEDS_CUDA
@pytest.mark.parametrize("adam", ["fused", "capturable"])
@pytest.mark.parametrize("name", STEP_MODELS)
def test_training_step_does_not_sync(name: str, adam: str) -> None:
    """With dropout (the attention seed is drawn on the GPU by the CUDA generator and read only by
    the kernels: no device sync): "error" mode raises on any device→host synchronisation in
    forward, loss, backward or the Adam step."""
    model = _step_model(name, dropout=0.3)
    batch = _step_batch(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **{adam: True})
    # One step outside the check: Triton compiles (and any autotuning benchmarks) on the first
    # launch and Adam creates its state — one-time work, not the step that repeats.
    _train_step(model, optimizer, batch)
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [_train_step(model, optimizer, batch).detach() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step changed nothing"


@NEEDS_CUDA
@pytest.mark.parametrize("name", STEP_MODELS)
def test_cuda_graph_replay_equals_eager_step(name: str) -> None:
    """A whole training step captured once with torch.cuda.graph and replayed 3 times gives the
    losses and parameters of 3 eager steps from the same state (model and Adam moments).

    No dropout, so the steps differ only through the parameters (dropout under capture:
    `test_cuda_graph_replays_draw_fresh_dropout_masks`).
    Same kernels in the same order, all deterministic (no atomics), so the results agree to
    assert_close's float32 defaults (slack only for cuBLAS picking another algorithm under capture).
    """
    import copy
    model = _step_model(name, dropout=0.0)
    static_batch = _step_batch(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    _warm_up(model, static_batch, lambda m, b: _train_step(m, optimizer, b))  # also creates Adam's state

    # The eager twin starts from the state the capture starts from.
    eager = copy.deepcopy(model)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    eager_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the grads are allocated inside the graph's pool
    with torch.cuda.graph(graph):
        static_loss = model.losses(static_batch)["loss"]
        static_loss.backward()
        optimizer.step()

    graph_losses, eager_losses = [], []
    for _ in range(3):
        graph.replay()
        graph_losses.append(static_loss.detach().clone())
        eager_losses.append(_train_step(eager, eager_opt, static_batch).detach())
    torch.cuda.synchronize()
    torch.testing.assert_close(torch.stack(graph_losses), torch.stack(eager_losses))
    assert len(set(round(x.item(), 7) for x in eager_losses)) == 3, "the eager steps did not train"
    for (pname, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, pname=pname: f"{pname}: {m}")


def _warm_up(model: torch.nn.Module, batch: Any, step: Any) -> None:
    """Two calls of `step(model, batch)` on a side stream (torch.cuda.graph's documented recipe):
    compiles the kernels and keeps the warm-up allocations out of the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(model, batch)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def _loss_and_grads(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model.losses(batch)["loss"]
    loss.backward()
    return loss


@NEEDS_CUDA
@pytest.mark.parametrize("name", STEP_MODELS)
def test_cuda_graph_replays_draw_fresh_dropout_masks(name: str) -> None:
    """Attention dropout under CUDA-graph capture: the seed is a `torch.randint` on the GPU
    (draw_seed_tensor), which a captured graph replays as a fresh draw of the CUDA generator (each
    replay advances its offset), and the kernels read it from device memory. So two replays give
    different losses and gradients (fresh masks, same parameters), and a replay started from a
    given generator state equals an eager forward + backward started from the same state.

    Forward + backward only (no optimizer step): the parameters stay fixed across replays, so any
    difference between replays is the masks. Only attention dropout is on (dropout 0 elsewhere).
    """
    import copy
    model = _step_model(name, dropout=0.0, attn_dropout=0.3)
    static_batch = _step_batch(name)
    _warm_up(model, static_batch, _loss_and_grads)
    eager = copy.deepcopy(model)  # same parameters, its own gradients

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)  # the grads are allocated inside the graph's pool
    with torch.cuda.graph(graph):
        static_loss = model.losses(static_batch)["loss"]
        static_loss.backward()

    def replay() -> tuple[torch.Tensor, list[torch.Tensor]]:
        graph.replay()
        return static_loss.detach().clone(), [p.grad.detach().clone() for p in model.parameters()]

    torch.cuda.manual_seed(1234)
    first_loss, first_grads = replay()
    second_loss, second_grads = replay()  # the generator moved on: another seed, other masks
    torch.cuda.manual_seed(1234)
    again_loss, again_grads = replay()
    torch.cuda.manual_seed(1234)
    eager_loss = _loss_and_grads(eager, static_batch).detach()
    torch.cuda.synchronize()

    assert torch.isfinite(first_loss) and torch.isfinite(second_loss)
    assert not torch.equal(first_loss, second_loss), "two replays drew the same dropout masks"
    assert any(not torch.equal(a, b) for a, b in zip(first_grads, second_grads))
    # Same generator state → same seed → same masks: the replay is reproducible and equals eager.
    assert torch.equal(again_loss, first_loss) and all(torch.equal(a, b) for a, b in zip(again_grads, first_grads))
    torch.testing.assert_close(eager_loss, first_loss)
    for (pname, p), g in zip(eager.named_parameters(), first_grads):
        torch.testing.assert_close(p.grad, g, msg=lambda m, pname=pname: f"{pname}: {m}")


@NEEDS_CUDA
@pytest.mark.parametrize("name", STEP_MODELS)
def test_compiled_training_step_equals_eager(name: str) -> None:
    """`TrainingStep(compile=True)` on CUDA — Inductor compiles the forward + loss, with the Triton
    operators registered as triton_ops, so their kernels sit inside Inductor's graph — runs its
    steps after the first (the compile, Adam's state) under sync-debug "error" and gives eager's
    losses and parameters.

    Tolerance: Inductor fuses the surrounding pointwise ops, so float32 rounding differs from
    eager's (1e-5 relative, as the CPU test in tests/test_compile_step.py). Adam's eps is 1e-3
    there and here for the same reason: with 1e-8 its update amplifies a rounding difference in a
    near-zero gradient up to lr/eps-fold.
    """
    import copy
    from fastattn.training_step import TrainingStep
    model = _step_model(name, dropout=0.0)
    eager_model = copy.deepcopy(model)
    batch = _step_batch(name)
    compiled = TrainingStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3, fused=True),
                            compile=True)
    eager = TrainingStep(eager_model, torch.optim.Adam(eager_model.parameters(), lr=1e-3, eps=1e-3, fused=True))
    torch._dynamo.reset()
    got, want = [compiled(batch)["loss"].detach()], [eager(batch)["loss"].detach()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            got.append(compiled(batch)["loss"].detach())
            want.append(eager(batch)["loss"].detach())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)
    for (pname, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m, pname=pname: f"{pname}: {m}")
