"""fastattn: fused Triton (and C++ CPU) kernels for attention-based sequential recommenders."""
from . import nn
from ._dispatch import BackendUnavailable
from .functional import dif_attention, full_item_cross_entropy, topk_items
from .ops.cross_entropy.targets import SoftTarget, ted_teacher

__all__ = ["BackendUnavailable", "SoftTarget", "dif_attention", "full_item_cross_entropy", "nn",
           "ted_teacher", "topk_items"]
__version__ = "0.1.0"
