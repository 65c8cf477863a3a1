"""Argument checks and one-time warnings shared by the modules (and the model and integration layers).

Each check raises ValueError with one line naming the argument.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch

from ..ops.checks import check_values

__all__ = ["check_bool", "check_choice", "check_int", "check_positive", "check_probability", "check_values",
           "visible_keys", "warn_once"]


def check_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_probability(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


# Additive mask entries at or below this underflow exp() in fp32 after max-subtraction (exp(-1e4) == 0),
# so they hide a key exactly like -inf; RecBole's masks use -10000.
_MASKED_AT_OR_BELOW = -1e4
_warned_reasons: set[str] = set()


def warn_once(message: str) -> None:
    """warnings.warn(message) the first time this process sees it: fallbacks say so once, not per call."""
    if message not in _warned_reasons:
        _warned_reasons.add(message)
        warnings.warn(message, stacklevel=3)


def visible_keys(mask: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """True where a mask lets a key through: bool masks (True = hidden) or additive masks whose entries are
    0 (visible) or <= -1e4 / -inf (hidden). None for any other additive mask (a soft bias, not a mask)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or float tensor (as in torch.nn.MultiheadAttention), got {mask.dtype}; "
                        "convert an integer mask with mask.bool() if nonzero means hidden")
    visible = mask == 0
    if not bool((visible | (mask <= _MASKED_AT_OR_BELOW)).all()):
        return None
    return visible
