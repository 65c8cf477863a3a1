"""Exact top-k items of the whole catalog (`fastattn.topk_items`), chunked over items.

Math: score_ij = h_i·E_j + b_j in the compute dtype (float64 for float64 inputs, else float32).
The ranking rule, shared by every backend so that they return the same items:

- ineligible: items in row i's `exclude` list, and items scoring NaN or -inf;
- eligible items rank by score, highest first (+inf included), equal scores by lower item id;
- a row with fewer than k eligible items ends with score -inf and index -1.

Backends (`BACKENDS`; "torch" means for top-k what it means for every op: plain torch ops,
any device, no build step):

- "cpp": the C++ kernel, operator `fastattn::topk_items` (csrc/cross_entropy.cpp; cpp.py);
- "torch": `chunked.chunked_topk`, registered as the composite operator
  `fastattn::topk_items_chunked`, which torch.compile traces through (op.py).

reference.py holds the dense float64 reference the tests compare both against.
"""
