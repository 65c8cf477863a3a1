"""Loading the C++ CPU kernels (csrc/): the extension built by setup.py (fastattn._C) or, when
that is missing, a just-in-time build with ninja into a cache directory on first use."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

# FASTATTN_CSRC builds from another source tree (kernel development); default: the repo's csrc/.
CSRC = Path(os.environ.get("FASTATTN_CSRC") or Path(__file__).resolve().parents[2] / "csrc")
SOURCES = ("registration.cpp", "attention.cpp", "cross_entropy.cpp")
# -fopenmp: at::parallel_for is header code that only runs in parallel when compiled with OpenMP.
CFLAGS = ["-O3", "-fopenmp", "-std=c++17"]
LDFLAGS = ["-fopenmp"]


def build_directory() -> Path:
    root = os.environ.get("FASTATTN_CACHE_DIR") or Path.home() / ".cache" / "fastattn"
    return Path(root) / f"torch_extensions-{torch.__version__}"


def _prebuilt_is_stale() -> bool:
    """True when fastattn._C (built by `pip install -e .`) is older than a source next to it: a
    checkout whose csrc/ changed since the install (a pull, an edit). Loading it would register
    yesterday's operators; the just-in-time build from csrc/ is used instead."""
    spec = importlib.util.find_spec("fastattn._C")
    if spec is None or spec.origin is None:
        return False
    sources = [CSRC / s for s in (*SOURCES, "ops.h")]
    newest = max((p.stat().st_mtime for p in sources if p.exists()), default=0.0)
    return newest > Path(spec.origin).stat().st_mtime


@functools.lru_cache(maxsize=None)
def cpp_unavailable_reason() -> Optional[str]:
    """None once the operators are registered (loading them if needed), else why they cannot be."""
    if os.environ.get("FASTATTN_DISABLE_CPP", "0") not in ("", "0"):
        return "FASTATTN_DISABLE_CPP is set"
    if not os.environ.get("FASTATTN_CSRC") and not _prebuilt_is_stale():
        try:
            importlib.import_module("fastattn._C")
            return None
        except ImportError:
            pass
    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        return (f"the extension fastattn._C was not built at install time and the sources for a "
                f"just-in-time build are missing ({CSRC}/{missing[0]})")
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        out = build_directory()
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "fastattn_cpp.so").exists():  # an existing build is only re-checked by ninja
            print(f"fastattn: compiling the C++ CPU kernels into {out} (first use only, about two minutes)…",
                  file=sys.stderr, flush=True)
        load(name="fastattn_cpp", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=LDFLAGS, build_directory=str(out), is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: the reason is reported
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return f"building the C++ kernels failed ({type(exc).__name__}: {' | '.join(lines[-3:])[:600]})"
    return None


def cpp_ops() -> object:
    """torch.ops.fastattn once the extension is loaded (built on first use); raises with the reason
    if it cannot be. While torch.compile traces, the dispatch has already chosen "cpp" from its
    import-time constant (the loader itself is not traceable), so the check is skipped there."""
    reason = None if torch.compiler.is_compiling() else cpp_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the fastattn C++ kernels are unavailable: {reason}")
    return torch.ops.fastattn
