"""Build script. Metadata lives in pyproject.toml; this file adds the optional C++ CPU extension
`fastattn._C` (csrc/, built with ninja). When it cannot be built (no compiler, no torch in the
build environment) the install still succeeds and the first use compiles it just in time
(fastattn/ops/cpp_extension.py); without any compiler, backend="auto" uses the torch path."""
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SOURCES = ["csrc/registration.cpp", "csrc/attention.cpp", "csrc/cross_entropy.cpp"]


def extension_kwargs() -> dict:
    if os.environ.get("FASTATTN_SKIP_CPP_BUILD", "0") not in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastattn: torch is not importable at build time; the C++ kernels will be compiled "
              "on first use instead (install with --no-build-isolation to build them now)", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed C++ build must not fail the install: the kernels are then built on first use."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure degrades to the JIT path
                print(f"fastattn: building the C++ extension failed ({exc}); it will be compiled on "
                      "first use instead", file=sys.stderr)

    ext = CppExtension(
        "fastattn._C", SOURCES,
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"], extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**extension_kwargs())
