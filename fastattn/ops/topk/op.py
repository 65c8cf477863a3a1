"""Top-k's operators and backend table: what `fastattn.topk_items` dispatches to."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .chunked import chunked_topk
from .cpp import cpp_topk

# The torch backend as a composite operator: an operator name for profiles and graphs, while
# torch.compile (and every dispatch key) decomposes it into the chunked torch ops it runs.
torch.library.define("fastattn::topk_items_chunked",
                     "(Tensor hidden, Tensor weight, int k, Tensor? bias, Tensor? exclude) -> (Tensor, Tensor)")
torch.library.impl("fastattn::topk_items_chunked", "CompositeImplicitAutograd")(chunked_topk)


def _torch_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor],
                exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastattn.topk_items_chunked(hidden, weight, k, bias, exclude)


TopK = Callable[[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor], Optional[torch.Tensor]],
                tuple[torch.Tensor, torch.Tensor]]
# backend → fn(hidden (N,D), weight (V,D), k, bias (V,) | None, exclude (N,M) | None) → (scores, indices).
BACKENDS: dict[str, TopK] = {"cpp": cpp_topk, "torch": _torch_topk}
