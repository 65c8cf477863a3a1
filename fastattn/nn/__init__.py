"""nn.Module forms of the functional API: `DIFAttention`, `MultiheadAttention` and `FullItemCrossEntropy`."""
from .cross_entropy import FullItemCrossEntropy
from .dif_attention import FUSIONS, DIFAttention
from .multihead import MultiheadAttention

__all__ = ["DIFAttention", "FUSIONS", "FullItemCrossEntropy", "MultiheadAttention"]
