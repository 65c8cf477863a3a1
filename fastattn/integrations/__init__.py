"""Drop-in use of fastattn in existing PyTorch recommenders.

- `replace_multihead_attention(model)`: every `torch.nn.MultiheadAttention` inside `model`
  becomes a `fastattn.nn.MultiheadAttention` sharing its parameters (plain PyTorch models such
  as pmixer/SASRec.pytorch).
- `fastattn.integrations.recbole.patch_model(model)`: RecBole sequential models (imports RecBole,
  so it is a submodule of its own).
"""
from __future__ import annotations

import torch

from ..nn import MultiheadAttention

__all__ = ["replace_multihead_attention"]


def replace_multihead_attention(model: torch.nn.Module, *, backend: str = "auto",
                                ignore_need_weights: bool = False) -> torch.nn.Module:
    """Swap every `torch.nn.MultiheadAttention` submodule of `model` for `fastattn.nn.MultiheadAttention`.

    Parameters are shared, not copied (an optimizer built before the swap keeps working), so the
    model's state_dict is unchanged. ``ignore_need_weights=True`` lets calls that leave
    need_weights at torch's default True (and discard the weights) run fused; they then get None
    for the weights. Returns `model` (changed in place). A `model` that is itself a
    MultiheadAttention is returned converted.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def convert(module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        return MultiheadAttention.from_torch(module, backend=backend, ignore_need_weights=ignore_need_weights)

    if isinstance(model, torch.nn.MultiheadAttention) and not isinstance(model, MultiheadAttention):
        return convert(model)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.MultiheadAttention) and not isinstance(m, MultiheadAttention)]
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, convert(module))
    return model
