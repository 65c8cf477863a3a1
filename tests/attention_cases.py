"""Shared helpers of the attention tests: random inputs and runs against the float64 reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import fastattn
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
