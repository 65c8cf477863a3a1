"""Non-tensor options of one attention call, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass


# Widest head dims the fused tiles take: the concatenated QK streams and V (triton_fwd.tile_config).
MAX_QK_DIM = 256
MAX_V_DIM = 128


@dataclass(frozen=True)
class AttentionOptions:
    """Options of `dif_attention` after validation.

    scale: multiplier of the summed scores (already resolved, never None).
    causal: key j visible to query i iff j <= i (top-left aligned).
    dropout_p: probability of zeroing an attention probability; 0 disables dropout.
    """

    scale: float
    causal: bool = True
    dropout_p: float = 0.0

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0
