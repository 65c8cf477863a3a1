"""fastattn: fused Triton (and C++ CPU) kernels for attention-based sequential recommenders."""
import os

# OpenMP's default lets idle worker threads spin. When another process shares the cores, every
# parallel region then waits for descheduled spinners: on a busy 2-core machine an epoch of the
# synthetic DIF-SR run took 155-220 s spinning and 3.9 s with passive waiting. Only takes effect when
# torch (which loads OpenMP) is imported after fastattn; OMP_WAIT_POLICY=ACTIVE overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from . import nn
from ._dispatch import BackendUnavailable
from .functional import dif_attention, full_item_cross_entropy, topk_items
from .ops.cross_entropy.targets import SoftTarget, ted_teacher

__all__ = ["BackendUnavailable", "SoftTarget", "dif_attention", "full_item_cross_entropy", "nn",
           "ted_teacher", "topk_items"]
__version__ = "0.1.0"
