"""fastattn: fused Triton (and C++ CPU) kernels for attention-based sequential recommenders."""
import os

# OpenMP (libgomp) lets idle worker threads spin for a long time. When another process shares
# the cores, parallel regions then wait for descheduled spinners: on a busy 2-core machine an
# epoch of the synthetic DIF-SR run took 155-220 s instead of ~4 s. A short spin (then sleep)
# keeps that case fast and the idle case as fast as the default (Beauty SASRec epoch 13.5 s;
# OMP_WAIT_POLICY=PASSIVE would make it 47 s). Only takes effect when torch (which loads
# OpenMP) is imported after fastattn; set GOMP_SPINCOUNT yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
from . import nn
from ._dispatch import BackendUnavailable
from .functional import dif_attention, full_item_cross_entropy, topk_items
from .ops.cross_entropy.targets import SoftTarget, ted_teacher

__all__ = ["BackendUnavailable", "SoftTarget", "dif_attention", "full_item_cross_entropy", "nn",
           "ted_teacher", "topk_items"]
__version__ = "0.1.0"
