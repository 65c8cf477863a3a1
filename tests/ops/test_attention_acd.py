"""Cross-domain attention mass a_cd (domains=) of the C++ kernels against the float64 reference.

tests/test_acd.py runs the same checks on the Triton kernels (not moved here yet: merging it
means adding its cases as "triton" entries below and "triton" to BACKENDS). The C++ cases reach
Lk = 300, across the C++ 256-key block.
"""
from __future__ import annotations

import pytest
import torch

from attention_cases import Case, check_acd
from backend_params import CPP, per_backend

BACKENDS = [CPP]


@pytest.mark.parametrize("which", ["out", "acd", "both"])
@pytest.mark.parametrize("n_domains", [1, 2, 5])
@pytest.mark.parametrize("backend,length", per_backend({"cpp": [7, 50, 129, 300]}))
def test_acd_and_gradients(backend: str, length: int, n_domains: int, which: str) -> None:
    acd = check_acd(Case(lq=length, n_domains=n_domains, attr_dims=(8, 24)), which, backend=backend)
    if n_domains == 1:
        assert (acd == 0).all()  # one domain: no attention mass can cross


OPTION_CASES = {
    "cpp": {
        "left-pad": Case(lq=50, padding="left", n_domains=2),
        "full-row": Case(lq=50, padding="full_row", n_domains=3, causal=False),
        "cross": Case(lq=7, lk=50, n_domains=2, causal=False, padding="right"),
        "cross-causal": Case(lq=129, lk=300, n_domains=5, causal=True),
        "wide": Case(lq=50, dk=50, dv=8, attr_dims=(50, 50), n_domains=2),
        "L1": Case(b=3, h=1, lq=1, n_domains=2),
    },
}


@pytest.mark.parametrize("which", ["acd", "both"])
@pytest.mark.parametrize("name", ["left-pad", "full-row", "cross", "cross-causal", "wide", "L1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acd_with_every_option(backend: str, name: str, which: str) -> None:
    check_acd(OPTION_CASES[backend][name], which, backend=backend)


@pytest.mark.parametrize("which", ["acd", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acd_with_dropout_uses_probabilities_before_dropout(backend: str, which: str) -> None:
    check_acd(Case(lq=300, n_domains=2, dropout_p=0.3, padding="left"), which, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acd_low_precision(backend: str, dtype: torch.dtype) -> None:
    check_acd(Case(lq=50, n_domains=2, padding="left"), "both", dtype, backend=backend)
