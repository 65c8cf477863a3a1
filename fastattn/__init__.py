"""fastattn: fused Triton (and C++ CPU) kernels for attention-based sequential recommenders."""
from ._dispatch import BackendUnavailable
from .functional import dif_attention

__all__ = ["BackendUnavailable", "dif_attention"]
__version__ = "0.1.0"
