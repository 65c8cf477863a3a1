"""nn.Module forms of the functional API: `DIFAttention`, `MultiheadAttention`, `FullItemCrossEntropy` and `Dropout`."""
from .cross_entropy import FullItemCrossEntropy
from .dif_attention import FUSIONS, DIFAttention
from .dropout import Dropout
from .multihead import MultiheadAttention

__all__ = ["DIFAttention", "Dropout", "FUSIONS", "FullItemCrossEntropy", "MultiheadAttention"]
