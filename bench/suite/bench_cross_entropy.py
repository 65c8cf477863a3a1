"""Full-catalog cross-entropy and top-k: providers × modes × catalog sizes, time and peak memory.

The case is a sequential recommender's training loss: N sequence representations (N, D=64)
scored against every item of a catalog (V, D), hard targets with ~5% rows at ignore_index
(padding), mean reduction. hidden and item_weight require grad in every mode, so "fwd" is a
training forward.

Providers (cross-entropy):
- fastattn: fastattn.full_item_cross_entropy(backend="auto") — Triton on CUDA, the C++ kernels
  on CPU (the chunked torch implementation where they cannot be built); never holds the N×V logits;
- fastattn_triton: the same with backend="triton" (CUDA only);
- fastattn_cpp: backend="cpp", the C++ CPU kernels (skipped when the extension cannot be built);
- fastattn_torch: backend="torch", the chunked eager torch implementation;
- naive: matmul + F.cross_entropy (fastattn.ops.cross_entropy.reference.naive_cross_entropy),
  what typical recommender code does: it materializes the N×V logits;
- torch_compile: torch.compile of that naive function;
- liger / cce: Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, when
  installed (their kernels are Triton: CUDA only).

Soft targets (`test_soft_cross_entropy`, fwd+bwd): MQSA-TED's distillation form, a base weight
on every item plus 8 sparse entries per row as a `fastattn.SoftTarget`, against the naive loss
on the equivalent dense (N, V) target (built outside the timed region).

Top-k (evaluation): fastattn.topk_items(k=20, exclude=history) ("fastattn": the C++ kernels on
CPU when built), explicitly the C++ kernels ("cpp") and the chunked torch version
("torch_chunked"), vs materialize + mask + torch.topk ("naive").

Run: python -m pytest bench/suite/bench_cross_entropy.py --benchmark-only   (see bench/README.md)
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

import fastattn
from fastattn import SoftTarget
from fastattn.ops.cross_entropy.reference import naive_cross_entropy
from fastattn.ops.topk.chunked import chunked_topk

from _common import COMPILE_FAILURE, COMPILE_MODE_SKIP, COMPILE_MODES, MODES, bench_size, compile_for_bench, run_benchmark, sweep, triton_unavailable

DIM = 64
VOCABS = sweep(full=(10_000, 100_000, 1_000_000), quick=(10_000, 50_000), tiny=(64, 1_000))
CPU_ROWS, CUDA_ROWS = {"full": (4096, 8192), "quick": (1024, 8192), "tiny": (16, 64)}[bench_size()]
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05
TOPK, HISTORY = 20, 50  # top-20 items, excluding 50 history items per row

# Peak N×V buffers of the naive baselines (fp32 eager, measured with the profiler at V=10k):
# fwd holds the logits and log_softmax's output; the backward adds the gradient of the logits.
# "bwd" counts the log_softmax output saved by its graph (built before the timed call).
NAIVE_LOGITS_BUFFERS = {"fwd": 2, "bwd": 3, "fwd+bwd": 3}
# On CPU a naive case whose N×V buffers would exceed this is skipped, not run: past it the
# machine (24 GB here) swaps or gets OOM-killed — the failure the chunked kernels remove.
CPU_NAIVE_BUDGET_BYTES = 8 * 10**9
# The correctness check runs the fp32 naive loss on as many leading rows as fit this many bytes
# of logits (all rows where the naive provider itself runs): enough rows to catch a wrong result.
CHECK_LOGITS_BYTES = {"cpu": 2 * 2**30, "cuda": 8 * 2**30}
# CPU timing. A call takes seconds at V=100k and up to a minute at V=1M (fwd+bwd, 2 cores), so:
# - V=1M runs fwd+bwd only (the memory criterion's case);
# - from V=100k rounds are fixed (pytest-benchmark's calibration would spend one more call, and
#   --benchmark-min-rounds is not consulted): 3 rounds, and 1 at V=1M, where one call already
#   averages hundreds of item chunks and the suite must stay within minutes.
CPU_HUGE_VOCAB = 1_000_000
CPU_HUGE_MODES = ("fwd+bwd",)
CPU_SLOW_VOCAB = 100_000
CPU_SLOW_ROUNDS, CPU_HUGE_ROUNDS = 3, 1

Loss = Callable[["CEInputs"], torch.Tensor]


@dataclass(frozen=True)
class CEShape:
    rows: int
    items: int
    dtype: torch.dtype
    device: torch.device

    @property
    def logits_bytes(self) -> int:
        """Bytes of one N×V logits tensor in the input dtype (what the naive providers allocate)."""
        return self.rows * self.items * torch.finfo(self.dtype).bits // 8

    @property
    def huge_on_cpu(self) -> bool:
        return self.device.type == "cpu" and self.items >= CPU_HUGE_VOCAB


@dataclass(frozen=True)
class CEInputs:
    hidden: torch.Tensor  # (N, D), requires grad
    weight: torch.Tensor  # (V, D), requires grad
    target: torch.Tensor  # (N,) int64, IGNORE_INDEX on ~5% of the rows
    history: torch.Tensor  # (N, HISTORY) int64 item ids excluded from the top-k

    @property
    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.hidden, self.weight)

    def head(self, rows: int) -> "CEInputs":
        """The first `rows` rows (views, so gradients still reach the full leaves)."""
        return CEInputs(self.hidden[:rows], self.weight, self.target[:rows], self.history[:rows])


def shape_for(items: int, device: torch.device) -> CEShape:
    if device.type == "cuda":
        return CEShape(CUDA_ROWS, items, torch.bfloat16, device)
    return CEShape(CPU_ROWS, items, torch.float32, device)


@functools.lru_cache(maxsize=1)  # one catalog at a time: at V=1M the table alone is 256 MB
def make_inputs(shape: CEShape) -> CEInputs:
    """Seeded inputs drawn on CPU (same data on any device); logits z = h·E come out ~N(0, 1)."""
    gen = torch.Generator().manual_seed(shape.items)
    n, v = shape.rows, shape.items
    hidden = torch.randn(n, DIM, generator=gen)
    weight = torch.randn(v, DIM, generator=gen) / DIM ** 0.5
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < IGNORED_FRACTION] = IGNORE_INDEX
    history = torch.randint(0, v, (n, HISTORY), generator=gen)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(shape.device, shape.dtype).requires_grad_()

    return CEInputs(leaf(hidden), leaf(weight), target.to(shape.device), history.to(shape.device))


def _naive_skip_reason(shape: CEShape, buffers: int, what: str) -> Optional[str]:
    """Why a materializing provider is not run on CPU at this size (None: it runs)."""
    need = shape.logits_bytes * buffers
    if shape.device.type != "cpu" or need <= CPU_NAIVE_BUDGET_BYTES:
        return None
    return (f"{what} at N={shape.rows}, V={shape.items} would hold ~{buffers} N×V fp32 buffers of "
            f"{shape.logits_bytes / 1e9:.1f} GB = ~{need / 1e9:.0f} GB, over this suite's CPU budget "
            f"of {CPU_NAIVE_BUDGET_BYTES / 1e9:.0f} GB")


def _check_rows(shape: CEShape) -> int:
    return min(shape.rows, max(64, CHECK_LOGITS_BYTES[shape.device.type] // (shape.items * 4)))


# --------------------------------------------------------------------------- providers


def _fastattn(backend: str) -> Loss:
    def run(x: CEInputs) -> torch.Tensor:
        return fastattn.full_item_cross_entropy(x.hidden, x.weight, x.target, ignore_index=IGNORE_INDEX,
                                                backend=backend)
    return run


def _naive_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Tensors only in the signature, so dynamo guards on shapes and not on Python objects.
    return naive_cross_entropy(hidden, weight, target, ignore_index=IGNORE_INDEX)


def _naive(x: CEInputs) -> torch.Tensor:
    return _naive_fn(x.hidden, x.weight, x.target)


@functools.lru_cache(maxsize=None)
def _compiled_naive() -> Callable[..., torch.Tensor]:
    # One compiled wrapper for the session: dynamo specializes it per shape (a few catalogs).
    return compile_for_bench(_naive_fn)


def _torch_compile(x: CEInputs) -> torch.Tensor:
    return _compiled_naive()(x.hidden, x.weight, x.target)


@functools.lru_cache(maxsize=None)
def _liger_loss() -> torch.nn.Module:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")


def _liger(x: CEInputs) -> torch.Tensor:
    out: Any = _liger_loss()(x.weight, x.hidden, x.target)  # Liger's order: (weight, input, target)
    # Newer releases may return (loss, z_loss, ...) or an output object; the loss comes first.
    out = getattr(out, "loss", out)
    return out[0] if isinstance(out, tuple) else out


def _cce(x: CEInputs) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    # Library defaults (impl="cce", gradient filtering on): the configuration its users run.
    return linear_cross_entropy(x.hidden, x.weight, x.target, ignore_index=IGNORE_INDEX, reduction="mean")


PROVIDERS: dict[str, Loss] = {
    "fastattn": _fastattn("auto"),
    "fastattn_triton": _fastattn("triton"),
    "fastattn_cpp": _fastattn("cpp"),
    "fastattn_torch": _fastattn("torch"),
    "naive": _naive,
    "torch_compile": _torch_compile,
    "liger": _liger,
    "cce": _cce,
}
MATERIALIZING = ("naive", "torch_compile")
_LIBRARIES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
# Why a provider's warm-up may fail without that being a bug here: it then skips with the reason.
_SKIP_ON: dict[str, tuple[tuple[type[BaseException], str], ...]] = {
    "fastattn_triton": ((fastattn.BackendUnavailable, "fastattn's Triton backend cannot run"),),
    "fastattn_cpp": ((fastattn.BackendUnavailable, "fastattn's C++ backend cannot run"),),
    "torch_compile": (COMPILE_FAILURE,),
    # An installed release with another API or an unsupported GPU: a skip naming the error.
    "liger": ((Exception, "Liger-Kernel failed on this machine"),),
    "cce": ((Exception, "Cut Cross-Entropy failed on this machine"),),
}


def _unavailable(provider: str, shape: CEShape, mode: str) -> Optional[str]:
    """Why `provider` does not run this case (None: it runs)."""
    if shape.huge_on_cpu and mode not in CPU_HUGE_MODES:
        return (f"V={shape.items} on CPU runs {', '.join(CPU_HUGE_MODES)} only (a call takes up to a "
                "minute on a few cores); the other modes at this size are CUDA cases")
    if provider == "torch_compile" and mode not in COMPILE_MODES:
        return COMPILE_MODE_SKIP
    if provider in MATERIALIZING:
        return _naive_skip_reason(shape, NAIVE_LOGITS_BUFFERS[mode], f"{provider} {mode}")
    if provider in _LIBRARIES:
        if importlib.util.find_spec(_LIBRARIES[provider]) is None:
            return f"{_LIBRARIES[provider]} is not installed"
        return triton_unavailable(shape.device)
    if provider == "fastattn_triton":
        return triton_unavailable(shape.device)
    if provider == "fastattn_cpp":
        return _cpp_unavailable(shape.device)
    return None


def _cpp_unavailable(device: torch.device) -> Optional[str]:
    """Why fastattn's C++ kernels do not run here (None: they do; building them on first use)."""
    if device.type != "cpu":
        return f"fastattn's C++ kernels run on CPU tensors, not {device.type}"
    from fastattn.ops.cpp_extension import cpp_unavailable_reason

    reason = cpp_unavailable_reason()
    return None if reason is None else f"fastattn's C++ kernels are unavailable: {reason}"


# --------------------------------------------------------------------------- correctness


@functools.lru_cache(maxsize=None)
def _expected_loss(shape: CEShape, rows: int) -> float:
    """fp32 naive loss on the first `rows` rows (cached: one naive pass per catalog, not per case)."""
    x = make_inputs(shape).head(rows)
    with torch.no_grad():
        return float(naive_cross_entropy(x.hidden.float(), x.weight.float(), x.target, ignore_index=IGNORE_INDEX))


def _check_loss(fn: Loss, shape: CEShape) -> None:
    """Untimed: the provider's loss equals the fp32 naive loss (on leading rows when V is large)."""
    rows = _check_rows(shape)
    x = make_inputs(shape)
    got = float(fn(x if rows == shape.rows else x.head(rows)).detach())  # grad enabled, as timed
    tol = 1e-4 if shape.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, _expected_loss(shape, rows), atol=tol, rtol=tol,
                               msg=lambda m: f"loss differs from the naive one (V={shape.items}, {rows} rows): {m}")


# --------------------------------------------------------------------------- the benchmarks


def _extra_info(op: str, provider: str, shape: CEShape, **more: Any) -> dict[str, Any]:
    return {
        "op": op, "provider": provider, "N": shape.rows, "V": shape.items, "D": DIM,
        "dtype": str(shape.dtype).removeprefix("torch."),
        # Context for peak_mem_mb: what one N×V logits tensor would take in this dtype.
        "logits_bytes": shape.logits_bytes, **more,
    }


def _timing(shape: CEShape, provider: str) -> dict[str, Any]:
    """run_benchmark's warm-up and rounds. CPU eager ops have no autotuning or caching allocator
    to warm up, and the untimed peak-memory call already runs the step once before the timed
    rounds, so only torch.compile (whose first call compiles) gets a warm-up call on CPU."""
    if shape.device.type != "cpu":
        return {}
    rounds = None
    if shape.items >= CPU_HUGE_VOCAB:
        rounds = CPU_HUGE_ROUNDS
    elif shape.items >= CPU_SLOW_VOCAB:
        rounds = CPU_SLOW_ROUNDS
    return {"warmup": 1 if provider == "torch_compile" else 0, "rounds": rounds}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("items", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy(
    benchmark: BenchmarkFixture, bench_device: torch.device, mode: str, items: int, provider: str
) -> None:
    shape = shape_for(items, bench_device)
    if (reason := _unavailable(provider, shape, mode)) is not None:
        pytest.skip(reason)
    x = make_inputs(shape)
    fn = PROVIDERS[provider]
    grad_bytes = sum(t.numel() * t.element_size() for t in x.leaves)
    run_benchmark(
        benchmark,
        mode=mode,
        forward=lambda: fn(x),
        inputs=x.leaves,
        device=bench_device,
        group=f"cross_entropy {mode} V={items}",
        extra_info=_extra_info(
            "full_item_cross_entropy", provider, shape,
            ignored_fraction=round(float((x.target == IGNORE_INDEX).float().mean()), 3),
            # The gradients of hidden and item_weight are part of peak_mem_mb in bwd modes.
            grads_mb=round(grad_bytes / 2**20, 3),
        ),
        skip_on=_SKIP_ON.get(provider, ()),
        check=None if provider == "naive" else functools.partial(_check_loss, fn, shape),
        **_timing(shape, provider),
    )


# --------------------------------------------------------------------------- top-k
# Full-ranking evaluation: the top-20 items of the whole catalog per row, history excluded.

TopK = Callable[[CEInputs], torch.Tensor]


def _topk_fastattn(x: CEInputs) -> torch.Tensor:
    return fastattn.topk_items(x.hidden, x.weight, TOPK, exclude=x.history)[0]


def _topk_cpp(x: CEInputs) -> torch.Tensor:
    from fastattn.ops.topk.cpp import cpp_topk

    return cpp_topk(x.hidden, x.weight, TOPK, None, x.history)[0]


def _topk_torch_chunked(x: CEInputs) -> torch.Tensor:
    return chunked_topk(x.hidden, x.weight, TOPK, None, x.history)[0]


def _topk_naive(x: CEInputs) -> torch.Tensor:
    scores = x.hidden @ x.weight.T
    scores.scatter_(1, x.history, float("-inf"))
    return scores.topk(TOPK, dim=1).values


TOPK_PROVIDERS: dict[str, TopK] = {
    "fastattn": _topk_fastattn, "cpp": _topk_cpp, "torch_chunked": _topk_torch_chunked, "naive": _topk_naive,
}


@functools.lru_cache(maxsize=None)
def _expected_topk(shape: CEShape, rows: int) -> torch.Tensor:
    x = make_inputs(shape).head(rows)
    with torch.no_grad():
        return _topk_naive(CEInputs(x.hidden.float(), x.weight.float(), x.target, x.history))


def _check_topk(fn: TopK, shape: CEShape) -> None:
    """Untimed: the provider's top-k scores equal the fp32 naive ones (indices may differ on ties)."""
    rows = _check_rows(shape)
    with torch.no_grad():
        got = fn(make_inputs(shape).head(rows)).float()
    tol = 1e-4 if shape.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, _expected_topk(shape, rows), atol=tol, rtol=tol,
                               msg=lambda m: f"top-k scores differ from the naive ones (V={shape.items}): {m}")


@pytest.mark.parametrize("provider", list(TOPK_PROVIDERS))
@pytest.mark.parametrize("items", VOCABS, ids=lambda v: f"V{v}")
def test_topk_items(benchmark: BenchmarkFixture, bench_device: torch.device, items: int, provider: str) -> None:
    shape = shape_for(items, bench_device)
    if provider == "naive" and (reason := _naive_skip_reason(shape, 1, "naive top-k")) is not None:
        pytest.skip(reason)
    if provider == "cpp" and (reason := _cpp_unavailable(shape.device)) is not None:
        pytest.skip(reason)
    x = make_inputs(shape)
    fn = TOPK_PROVIDERS[provider]
    with torch.no_grad():  # evaluation: no graph, whatever the inputs' requires_grad
        run_benchmark(
            benchmark, mode="fwd", forward=lambda: fn(x), inputs=(), device=bench_device,
            group=f"topk fwd V={items}",
            extra_info=_extra_info("topk_items", provider, shape, k=TOPK, history=HISTORY),
            check=None if provider == "naive" else functools.partial(_check_topk, fn, shape),
            **_timing(shape, provider),
        )


# --------------------------------------------------------------------------- soft targets
# MQSA-TED's distillation loss: every row's target is a base weight on all items plus a few
# sparse entries (fastattn.SoftTarget, fastattn/ops/cross_entropy/__init__.py), fwd+bwd. The naive provider gets the same
# distribution as a dense (N, V) probability matrix, built once outside the timed region.

SOFT_NNZ = 8  # sparse entries per row (a TED teacher row keeps the observed next items)
SOFT_BASE_MASS = 0.1  # share of each row's mass spread uniformly over the catalog


@functools.lru_cache(maxsize=1)
def make_soft_target(shape: CEShape) -> SoftTarget:
    gen = torch.Generator().manual_seed(shape.items + 1)
    n, v = shape.rows, shape.items
    nnz = min(SOFT_NNZ, v)
    indices = torch.stack([torch.randperm(v, generator=gen)[:nnz] for _ in range(n)]).reshape(-1)
    values = torch.rand(n, nnz, generator=gen)
    values = (values / values.sum(dim=1, keepdim=True) * (1 - SOFT_BASE_MASS)).reshape(-1)
    base = torch.full((n,), SOFT_BASE_MASS / v)
    indptr = torch.arange(0, n * nnz + 1, nnz, dtype=torch.int64)
    return SoftTarget(base, indptr, indices, values).to(shape.device)


def _dense(target: SoftTarget, shape: CEShape) -> torch.Tensor:
    dense = target.base[:, None].expand(shape.rows, shape.items).clone()
    dense[target.row_ids(), target.indices] += target.values
    return dense.to(shape.dtype)


SoftLoss = Callable[[CEInputs, Any], torch.Tensor]


def _soft_fastattn(backend: str) -> SoftLoss:
    def run(x: CEInputs, target: Any) -> torch.Tensor:
        return fastattn.full_item_cross_entropy(x.hidden, x.weight, target, backend=backend)
    return run


def _soft_naive(x: CEInputs, target: Any) -> torch.Tensor:
    return naive_cross_entropy(x.hidden, x.weight, target)


SOFT_PROVIDERS: dict[str, SoftLoss] = {
    "fastattn": _soft_fastattn("auto"),
    "fastattn_triton": _soft_fastattn("triton"),
    "fastattn_cpp": _soft_fastattn("cpp"),
    "fastattn_torch": _soft_fastattn("torch"),
    "naive": _soft_naive,
}


@pytest.mark.parametrize("provider", list(SOFT_PROVIDERS))
@pytest.mark.parametrize("items", VOCABS, ids=lambda v: f"V{v}")
def test_soft_cross_entropy(benchmark: BenchmarkFixture, bench_device: torch.device, items: int,
                            provider: str) -> None:
    shape = shape_for(items, bench_device)
    mode = "fwd+bwd"
    if provider == "naive":  # logits, log-softmax, their gradient and the dense target
        reason = _naive_skip_reason(shape, NAIVE_LOGITS_BUFFERS[mode] + 1, "naive soft CE")
    else:
        reason = _unavailable(provider, shape, mode)
    if reason is not None:
        pytest.skip(reason)
    x = make_inputs(shape)
    soft = make_soft_target(shape)
    target: Any = _dense(soft, shape) if provider == "naive" else soft
    fn = SOFT_PROVIDERS[provider]

    def check() -> None:
        rows = min(_check_rows(shape), shape.rows)
        head = x.head(rows)
        with torch.no_grad():
            expected = float(naive_cross_entropy(head.hidden.float(), head.weight.float(),
                                                 _dense(soft, shape)[:rows].float()))
        got = float(fn(head, soft.rows(torch.arange(rows, device=shape.device))).detach())
        tol = 1e-4 if shape.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol,
                                   msg=lambda m: f"soft loss differs from the dense one (V={items}): {m}")

    run_benchmark(
        benchmark, mode=mode, forward=lambda: fn(x, target), inputs=x.leaves, device=bench_device,
        group=f"soft_cross_entropy {mode} V={items}",
        extra_info=_extra_info("soft_cross_entropy", provider, shape, nnz_per_row=min(SOFT_NNZ, items)),
        skip_on=_SKIP_ON.get(provider, ()),
        check=None if provider == "naive" else check,
        **_timing(shape, provider),
    )
