"""Shared helpers of the attention tests: random inputs and runs against the float64 reference."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

import fastattn
from fastattn.ops.attention.function import draw_seed
from fastattn.ops.attention.options import AttentionOptions
from fastattn.ops.attention.reference import dif_attention_reference


@dataclass
class Case:
    b: int = 2
    h: int = 2
    lq: int = 7
    lk: Optional[int] = None  # None: self attention (Lk = Lq)
    dk: int = 24
    dv: Optional[int] = None  # None: Dv = Dk
    attr_dims: tuple[int, ...] = (8,)
    causal: bool = True
    padding: Optional[str] = None  # None | "left" | "right" | "full_row"
    dropout_p: float = 0.0
    scale: Optional[float] = None
    n_domains: int = 0  # 0: no domains
    extra: dict = field(default_factory=dict)

    @property
    def keys(self) -> int:
        return self.lq if self.lk is None else self.lk


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random q, k, v, attribute streams, key padding mask and domains for `case`."""
    gen = torch.Generator().manual_seed(seed)
    lk = case.keys
    dv = case.dv or case.dk

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    inputs = {
        "q": rnd(case.b, case.h, case.lq, case.dk),
        "k": rnd(case.b, case.h, lk, case.dk),
        "v": rnd(case.b, case.h, lk, dv),
        "attr_q": [rnd(case.b, case.h, case.lq, d) for d in case.attr_dims],
        "attr_k": [rnd(case.b, case.h, lk, d) for d in case.attr_dims],
        "key_padding_mask": None,
        "domains": None,
    }
    if case.padding is not None:
        mask = torch.zeros(case.b, lk, dtype=torch.bool)
        n_pad = max(1, lk // 3) if lk > 1 else 0
        if case.padding == "left":
            mask[:, :n_pad] = True
        elif case.padding == "right":
            mask[:, lk - n_pad:] = True
        elif case.padding == "full_row":
            mask[0, :] = True  # batch row 0 sees nothing at all
            mask[1:, :n_pad] = True
        else:
            raise ValueError(case.padding)
        inputs["key_padding_mask"] = mask
    if case.n_domains:
        dq = torch.randint(0, case.n_domains, (case.b, case.lq), generator=gen)
        dk = dq if case.lk is None else torch.randint(0, case.n_domains, (case.b, lk), generator=gen)
        inputs["domains"] = dq if case.lk is None else (dq, dk)
    return inputs


def grad_leaves(inputs: dict) -> list[torch.Tensor]:
    return [inputs["q"], inputs["k"], inputs["v"], *inputs["attr_q"], *inputs["attr_k"]]


def with_grad(inputs: dict, dtype: Optional[torch.dtype] = None) -> dict:
    """Detached copies (optionally cast) of the float tensors, all requiring grad."""
    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype or t.dtype).requires_grad_(True)

    out = dict(inputs)
    out["q"], out["k"], out["v"] = prep(inputs["q"]), prep(inputs["k"]), prep(inputs["v"])
    out["attr_q"] = [prep(t) for t in inputs["attr_q"]]
    out["attr_k"] = [prep(t) for t in inputs["attr_k"]]
    return out


def run_fastattn(case: Case, inputs: dict, backend: str, grad_out: torch.Tensor,
                 grad_acd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor], list]:
    """Forward + backward through `fastattn.dif_attention`; returns (out, acd, grads)."""
    res = fastattn.dif_attention(
        inputs["q"], inputs["k"], inputs["v"], inputs["attr_q"], inputs["attr_k"],
        causal=case.causal, key_padding_mask=inputs["key_padding_mask"], scale=case.scale,
        dropout_p=case.dropout_p, domains=inputs["domains"], backend=backend,
    )
    out, acd = res if isinstance(res, tuple) else (res, None)
    loss = (out.float() * grad_out.float()).sum()
    if acd is not None and grad_acd is not None:
        loss = loss + (acd * grad_acd.float()).sum()
    loss.backward()
    return out.detach(), None if acd is None else acd.detach(), [t.grad for t in grad_leaves(inputs)]


def run_reference(case: Case, inputs: dict, grad_out: torch.Tensor, grad_acd: Optional[torch.Tensor] = None,
                  dropout_keep: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float64
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], list]:
    """The same computation through the torch reference in `dtype` (float64: the ground truth)."""
    x = with_grad(inputs, dtype)
    domains = x["domains"]
    if domains is not None and isinstance(domains, torch.Tensor):
        domains = (domains, domains)
    opts = AttentionOptions(scale=case.scale if case.scale is not None else case.dk ** -0.5,
                            causal=case.causal, dropout_p=case.dropout_p)
    out, acd = dif_attention_reference(x["q"], x["k"], x["v"], x["attr_q"], x["attr_k"], opts,
                                       x["key_padding_mask"], dropout_keep, domains)
    loss = (out * grad_out.to(dtype)).sum()
    if acd is not None and grad_acd is not None:
        loss = loss + (acd * grad_acd.to(acd.dtype)).sum()
    loss.backward()
    return out.detach(), None if acd is None else acd.detach(), [t.grad for t in grad_leaves(x)]


def max_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    assert (a is None) == (b is None)
    if a is None:
        return 0.0
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def kernel_keep_mask(backend: str, seed: int, p: float, b: int, h: int, lq: int, lk: int) -> torch.Tensor:
    """The bool (B,H,Lq,Lk) dropout keep-mask `backend`'s kernels draw for `seed`."""
    return kernel_keep_rows(backend, seed, p, lk, 0, b * h * lq).view(b, h, lq, lk)


def kernel_keep_rows(backend: str, seed: int, p: float, lk: int, first_row: int, n_rows: int) -> torch.Tensor:
    """Bool (n_rows, Lk): flat rows [first_row, first_row + n_rows) of `backend`'s keep-mask for `seed`."""
    if backend == "cpp":
        from fastattn.ops.attention.cpp import cpp_dropout_keep_rows

        return cpp_dropout_keep_rows(seed, p, lk, first_row, n_rows)
    from fastattn.ops.attention.triton_fwd import dropout_keep_rows

    return dropout_keep_rows(seed, p, lk, first_row, n_rows, torch.device("cpu"))


# The dropout RNG scheme of the kernels (triton_fwd.dropout_keep), written out element by element.
M32 = 0xFFFFFFFF


def philox4x32(key: int, counter: int) -> list[int]:
    """Philox-4x32-10 (Salmon et al. 2011) of counter words (low, high, 0, 0) and key (low, high)."""
    c = [counter & M32, counter >> 32, 0, 0]
    k0, k1 = key & M32, key >> 32
    for _ in range(10):
        a0, a2 = c[0], c[2]
        c = [((0xCD9E8D57 * a2) >> 32) ^ c[1] ^ k0, (0xCD9E8D57 * a2) & M32,
             ((0xD2511F53 * a0) >> 32) ^ c[3] ^ k1, (0xD2511F53 * a0) & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def reference_keep_rows(seed: int, p: float, lk: int, first_row: int, n_rows: int) -> torch.Tensor:
    """The documented scheme, element by element; uniform = |int32 bits| · 2**-31 in fp32 (tl.rand)."""
    groups = (lk + 3) // 4
    keep = np.zeros((n_rows, lk), dtype=bool)
    for r in range(n_rows):
        for j in range(lk):
            word = philox4x32(seed, (first_row + r) * groups + j // 4)[j % 4]
            x = word - 2**32 if word >= 2**31 else word
            uniform = np.float32(~x if x < 0 else x) * np.float32(4.6566127342e-10)
            keep[r, j] = uniform >= np.float32(p)
    return torch.from_numpy(keep)


FP32_TOL = 2e-5


def check_against_truth(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0, backend: str = "triton") -> None:
    """Output and every gradient of `backend` in `dtype` vs the float64 reference.

    float32 must match to FP32_TOL relative to the largest value; float16/bfloat16 must be at
    most twice as far from the truth as the reference run in that dtype, plus one ulp-ish slack.
    """
    inputs = make_inputs(case, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dv or case.dk, generator=gen)
    out, _, grads = run_fastattn(case, with_grad(inputs), backend, grad_out)
    ref_out, _, ref_grads = run_reference(case, inputs, grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    names = ["out", "q", "k", "v"] + [f"attr_q[{i}]" for i in range(len(case.attr_dims))] \
        + [f"attr_k[{i}]" for i in range(len(case.attr_dims))]
    got, truth = [out, *grads], [ref_out, *ref_grads]
    if dtype == torch.float32:
        for name, g, t in zip(names, got, truth):
            assert torch.isfinite(g).all(), name
            scale = max(1.0, t.abs().max().item())
            assert max_err(g, t) <= FP32_TOL * scale, f"{name}: err {max_err(g, t):.3e}"
        return
    low_out, _, low_grads = run_reference(case, inputs, grad_out, dtype=dtype)
    slack = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, g, t, low in zip(names, got, truth, [low_out, *low_grads]):
        assert torch.isfinite(g).all(), name
        scale = max(1.0, t.abs().max().item())
        bound = 2 * max_err(low, t) + slack * scale
        assert max_err(g, t) <= bound, f"{name}: err {max_err(g, t):.3e} > bound {bound:.3e}"


ACD_TOL = 2e-5


def check_acd(case: Case, which: str, dtype: torch.dtype = torch.float32, seed: int = 0,
              backend: str = "triton") -> torch.Tensor:
    """Forward (out, acd) and the gradients of a loss on `which` ∈ {out, acd, both} vs float64."""
    inputs = make_inputs(case, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dv or case.dk, generator=gen)
    grad_acd = torch.randn(case.b, case.h, case.lq, generator=gen)
    if which == "acd":
        grad_out = torch.zeros_like(grad_out)
    if which == "out":
        grad_acd = None
    keep = None
    if case.dropout_p:
        torch.manual_seed(4321)
        keep = kernel_keep_mask(backend, draw_seed(), case.dropout_p, case.b, case.h, case.lq, case.keys)
        torch.manual_seed(4321)
    out, acd, grads = run_fastattn(case, with_grad(inputs), backend, grad_out, grad_acd)
    ref_out, ref_acd, ref_grads = run_reference(case, inputs, grad_out, grad_acd, dropout_keep=keep)
    assert acd.dtype == torch.float32 and acd.shape == (case.b, case.h, case.lq)
    tol = ACD_TOL if dtype == torch.float32 else {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert max_err(acd, ref_acd) <= tol, f"acd err {max_err(acd, ref_acd):.2e}"
    assert max_err(out, ref_out) <= tol * max(1.0, ref_out.abs().max().item())
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(g).all()
        assert max_err(g, r) <= tol * max(1.0, r.abs().max().item()), f"grad {i}: {max_err(g, r):.2e}"
    return acd


# ---------------------------------------------------------------- dropout checks (every backend)
def check_dropout_own_mask(case: Case, backend: str) -> None:
    """Gradients and output equal the float64 reference run with the kernel's own keep-mask."""
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk)
    torch.manual_seed(1234)
    seed = draw_seed()  # the seed the Function will draw after the same manual_seed
    keep = kernel_keep_mask(backend, seed, case.dropout_p, case.b, case.h, case.lq, case.keys)
    torch.manual_seed(1234)
    out, _, grads = run_fastattn(case, with_grad(inputs), backend, grad_out)
    ref_out, _, ref_grads = run_reference(case, inputs, grad_out, dropout_keep=keep)
    assert max_err(out, ref_out) <= FP32_TOL * max(1.0, ref_out.abs().max().item())
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) <= FP32_TOL * max(1.0, r.abs().max().item())


def check_dropout_reproducible(case: Case, backend: str) -> None:
    """Same torch.manual_seed → identical output and gradients; another seed → another output."""
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(run_fastattn(case, with_grad(inputs), backend, grad_out))
    (o1, _, g1), (o2, _, g2), (o3, _, _) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


def check_keep_statistics(backend: str, p: float) -> None:
    """Kept fraction ≈ 1 − p (4 sigma), and two heads draw uncorrelated patterns."""
    keep = kernel_keep_mask(backend, 99, p, 2, 3, 70, 90).float()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    a, c = keep[0, 0].flatten(), keep[0, 1].flatten()
    corr = ((a - a.mean()) * (c - c.mean())).mean() / (a.std() * c.std())
    assert abs(corr.item()) < 4 / math.sqrt(a.numel())
