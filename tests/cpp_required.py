"""The C++ kernels must build where the tests run (the README's install builds them): a build
failure fails the cpp test modules loudly. Only an explicit FASTATTN_DISABLE_CPP=1 skips them."""
import os

import pytest

from fastattn.ops.cpp_extension import cpp_unavailable_reason


def cpp_tests_mark() -> pytest.MarkDecorator:
    reason = cpp_unavailable_reason()
    disabled = os.environ.get("FASTATTN_DISABLE_CPP", "0") not in ("", "0")
    if reason is not None and not disabled:
        raise RuntimeError(f"the C++ kernels are unavailable: {reason}")
    return pytest.mark.skipif(disabled, reason="FASTATTN_DISABLE_CPP is set")
