"""Parametrisation of the per-op tests (tests/ops/test_<op>.py) over backends.

A backend named "cpp…" carries the mark of tests/cpp_required.py: a failed C++ build fails the
collection loudly, and only FASTATTN_DISABLE_CPP=1 skips those cases.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytest

from cpp_required import cpp_tests_mark


def backend_param(backend: str, *values: Any) -> Any:
    """pytest.param(backend, *values), with the C++ mark when `backend` is a C++ variant."""
    marks = [cpp_tests_mark()] if backend.startswith("cpp") else []
    return pytest.param(backend, *values, marks=marks)


CPP = backend_param("cpp")
# The kernel backends of an op with Triton and C++ kernels (Triton runs in its interpreter here).
KERNEL_BACKENDS = ["triton", CPP]


def per_backend(cases: Mapping[str, Sequence[Any]]) -> list:
    """Params (backend, *case) for each backend's own case list; a tuple case fills several arguments."""
    return [backend_param(backend, *(case if isinstance(case, tuple) else (case,)))
            for backend, backend_cases in cases.items() for case in backend_cases]
