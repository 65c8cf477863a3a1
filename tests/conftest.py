"""Test set-up: Triton runs in interpreter mode on CPU tensors (must be set before import)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns on every import unless FP fusion is chosen explicitly; keep its default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
