"""Multi-task weights for AutoCDSR: the min-norm (MGDA) solver and the Pareto MTL step.

Min-norm element (Sener & Koltun, NeurIPS 2018, "Multi-Task Learning as Multi-Objective
Optimization"). For gradients g_1..g_m of m losses on the shared parameters::

    w* = argmin_{w in simplex}  || Σ_i w_i g_i ||²  =  argmin_w  wᵀ G w,      G_ij = g_i · g_j

Only the m×m Gram matrix G matters, so the solver works on G (float64). Two tasks have the exact
answer w_1 = clip((g_2 − g_1)·g_2 / ||g_1 − g_2||², 0, 1), w_2 = 1 − w_1; more tasks start at the
best pair and run Frank–Wolfe with exact line search and away steps (Lacoste-Julien & Jaggi,
2015; plain Frank–Wolfe, as in the MGDA code, zig-zags at O(1/t) when the optimum lies on a face
of the simplex, away steps make the rate linear): the toward vertex s = argmin_t (G w)_t, the
away vertex v = argmax_{t: w_t > 0} (G w)_t; move toward e_s or away from e_v, whichever gap is
larger, by the exact minimizer of the quadratic along that line. The duality gap
wᵀGw − min_t (Gw)_t >= 0 bounds the distance to the optimum and stops the loop.

Pareto MTL (Lin et al., NeurIPS 2019, "Pareto Multi-Task Learning"). Preference vectors p_0..p_n
split the loss space into regions Ω_k = {L : (p_j − p_k)·L <= 0 for all j}. With the loss vector
normalized, G_j = (p_j − p_k)·L / ||L||; the constraint j is active when G_j > −margin (margin 0,
as in the authors' code: G_j > 0). Then:

- feasibility phase (`pareto_mtl_init_weights`, while L lies outside Ω_k): descend the active
  constraints only — the min-norm element of {∇G_j = Σ_i (p_j − p_k)_i g_i : j active} gives
  sol, and the task weights are w = Σ_j sol_j (p_j − p_k); None once L is inside Ω_k;
- descent phase (`pareto_mtl_weights`): the min-norm element of {g_1..g_m} ∪ {∇G_j : j active}
  gives sol; the task weights are w_i = sol_i + Σ_j sol_{m+j} (p_j − p_k)_i (just the MGDA
  weights when no constraint is active).

Both phases scale w to Σ_i |w_i| = 1 (the weights may be negative: an active constraint can ask
to raise one loss to move the solution back into its region). Gradients can first be normalized
(`normalization="l2"`: g_i / ||g_i||, what the official AutoCDSR code does); the weights are then
applied to the raw losses, as in MGDA's code. Degenerate inputs stay finite: a zero gradient is
left at zero (its weight is then 1: the zero vector is the min-norm point), all-zero or identical
gradients give uniform weights.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Grads = Union[torch.Tensor, Sequence[torch.Tensor]]
NORMALIZATIONS = ("none", "l2", "loss", "loss+")

__all__ = ["NORMALIZATIONS", "active_constraints", "gram_matrix", "min_norm_from_gram", "min_norm_weights",
           "pareto_mtl_init_weights", "pareto_mtl_init_weights_from_gram", "pareto_mtl_weights",
           "pareto_mtl_weights_from_gram", "preference_vectors"]


# ---------------------------------------------------------------- min-norm solver
def gram_matrix(grads: Grads) -> torch.Tensor:
    """G (m, m) float64 on the CPU, G_ij = g_i · g_j, from an (m, P) matrix or m tensors of P elements
    (each flattened; shapes may differ, element counts must agree). Raises ValueError on bad input."""
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"grads must be an (m, P) matrix or a sequence of m tensors, got shape "
                             f"{tuple(grads.shape)}")
        rows = list(grads.unbind(0))
    else:
        try:
            rows = list(grads)
        except TypeError:
            raise ValueError(f"grads must be an (m, P) matrix or a sequence of tensors, got "
                             f"{type(grads).__name__}") from None
    if not rows:
        raise ValueError("grads must hold at least one gradient")
    for i, g in enumerate(rows):
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"grads[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if not (g.dtype.is_floating_point):
            raise ValueError(f"grads[{i}] must be a float tensor, got {g.dtype}")
    size = rows[0].numel()
    if size == 0:
        raise ValueError("grads must have at least one element each (P >= 1)")
    for i, g in enumerate(rows):
        if g.numel() != size:
            raise ValueError(f"grads[{i}] has {g.numel()} elements but grads[0] has {size}: all gradients "
                             "must cover the same parameters")
    matrix = torch.stack([g.detach().reshape(-1).to(torch.float64) for g in rows])
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("grads hold non-finite values (NaN or inf)")
    return (matrix @ matrix.T).cpu()


def _check_gram(gram: torch.Tensor) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"gram must be a square (m, m) matrix with m >= 1, got {shape}")
    gram = gram.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram holds non-finite values (NaN or inf)")
    return (gram + gram.T) / 2


def _two_point(aa: float, ab: float, bb: float, tie: float = 0.5) -> tuple[float, float]:
    """argmin over γ in [0, 1] of ||γ a + (1 − γ) b||² from aa = a·a, ab = a·b, bb = b·b: (γ, cost).
    γ = (bb − ab) / ||a − b||², clipped; `tie` when a = b (every γ is optimal)."""
    denom = aa + bb - 2.0 * ab
    scale = max(abs(aa), abs(bb), 1e-300)
    if denom <= 1e-14 * scale:
        gamma = tie
    else:
        gamma = min(1.0, max(0.0, (bb - ab) / denom))
    cost = gamma * gamma * aa + 2.0 * gamma * (1.0 - gamma) * ab + (1.0 - gamma) ** 2 * bb
    return gamma, max(cost, 0.0)


def min_norm_from_gram(gram: torch.Tensor, *, max_iter: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """Min-norm weights (m,) float64 on the simplex from the Gram matrix G (m, m) of the gradients.

    m = 1: [1]. m = 2: the exact closed form. m >= 3: away-step Frank–Wolfe with exact line search
    from the best pair, stopped when the duality gap wᵀGw − min_t (Gw)_t falls below tol · max_i G_ii
    or after max_iter steps. All-zero G gives uniform weights.
    """
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    g = _check_gram(gram)
    m = g.shape[0]
    scale = float(g.diagonal().abs().max())
    if m == 1:
        return torch.ones(1, dtype=torch.float64)
    if scale == 0.0:  # every gradient is zero: every w is optimal
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    if m == 2:
        gamma, _ = _two_point(float(g[0, 0]), float(g[0, 1]), float(g[1, 1]))
        return torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64)
    best: Optional[tuple[float, int, int, float]] = None
    for i in range(m):
        for j in range(i + 1, m):
            gamma, cost = _two_point(float(g[i, i]), float(g[i, j]), float(g[j, j]))
            if best is None or cost < best[0]:
                best = (cost, i, j, gamma)
    assert best is not None
    w = torch.zeros(m, dtype=torch.float64)
    w[best[1]], w[best[2]] = best[3], 1.0 - best[3]
    threshold = tol * scale
    for _ in range(max_iter):
        gw = g @ w
        value = float(w @ gw)
        s = int(torch.argmin(gw))
        fw_gap = value - float(gw[s])  # duality gap: bounds the distance to the optimum
        if fw_gap <= threshold:
            break
        used = w > 0
        v = int(torch.argmax(torch.where(used, gw, torch.full_like(gw, -math.inf))))
        away_gap = float(gw[v]) - value
        if fw_gap >= away_gap:  # toward vertex s: w + γ (e_s − w), γ <= 1
            slope, curvature, gamma_max = -fw_gap, float(g[s, s]) - 2.0 * float(gw[s]) + value, 1.0
        else:  # away from vertex v: w + γ (w − e_v), γ <= w_v / (1 − w_v)
            wv = float(w[v])
            slope, curvature = -away_gap, value - 2.0 * float(gw[v]) + float(g[v, v])
            gamma_max = wv / (1.0 - wv) if wv < 1.0 else math.inf
        # exact line search on the quadratic f(γ) = value + 2γ·slope + γ²·curvature
        gamma = gamma_max if curvature <= 0 else min(gamma_max, -slope / curvature)
        if fw_gap >= away_gap:
            w = (1.0 - gamma) * w
            w[s] += gamma
        else:
            w = (1.0 + gamma) * w
            w[v] -= gamma
            if gamma == gamma_max:
                w[v] = 0.0  # a drop step: v leaves the support exactly
    w = w.clamp_min(0.0)
    return w / w.sum()


def min_norm_weights(grads: Grads, *, max_iter: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """argmin over the simplex of ||Σ_i w_i g_i||² (MGDA's common descent direction), as (m,) float64 on the CPU.

    grads: an (m, P) matrix or m tensors with P elements each. See `min_norm_from_gram`.
    """
    return min_norm_from_gram(gram_matrix(grads), max_iter=max_iter, tol=tol)


# ---------------------------------------------------------------- Pareto MTL
def preference_vectors(num: int) -> torch.Tensor:
    """(num + 1, 2) float64: p_k = (cos(kπ / 2K), sin(kπ / 2K)) for k = 0..K (K = num >= 1), evenly
    spread over the positive quarter circle from (1, 0) to (0, 1)."""
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ValueError(f"num (K, the number of preference intervals) must be an int >= 1, got {num!r}")
    angles = torch.arange(num + 1, dtype=torch.float64) * (math.pi / (2 * num))
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def _check_problem(losses: torch.Tensor, preferences: torch.Tensor, region: int, m: Optional[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(losses, torch.Tensor):
        losses = torch.as_tensor(losses, dtype=torch.float64)
    losses = losses.detach().to(torch.float64).cpu().reshape(-1)
    if m is not None and losses.numel() != m:
        raise ValueError(f"losses must hold one value per gradient ({m}), got {losses.numel()}")
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("losses hold non-finite values (NaN or inf)")
    if not isinstance(preferences, torch.Tensor):
        preferences = torch.as_tensor(preferences, dtype=torch.float64)
    preferences = preferences.detach().to(torch.float64).cpu()
    if preferences.dim() != 2 or preferences.shape[1] != losses.numel() or preferences.shape[0] < 1:
        raise ValueError(f"preferences must have shape (n, {losses.numel()}) (one row per preference vector), "
                         f"got {tuple(preferences.shape)}")
    if not bool(torch.isfinite(preferences).all()):
        raise ValueError("preferences hold non-finite values")
    if not isinstance(region, int) or isinstance(region, bool) or not 0 <= region < preferences.shape[0]:
        raise ValueError(f"region must be an int in [0, {preferences.shape[0]}) (a row of preferences), got {region!r}")
    return losses, preferences


def active_constraints(losses: torch.Tensor, preferences: torch.Tensor, region: int, *, margin: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which constraints of region Ω_k (k = region) the loss vector L (m,) violates or nearly violates.

    Returns (active (n,) bool, directions (n, m) float64) with directions_j = p_j − p_k and
    active_j = (p_j − p_k)·L/||L|| > −margin (never j = k; none when ||L|| = 0).
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float, got {margin!r}")
    losses, preferences = _check_problem(losses, preferences, region, None)
    directions = preferences - preferences[region]
    norm = float(losses.norm())
    if norm == 0.0:
        return torch.zeros(preferences.shape[0], dtype=torch.bool), directions
    values = directions @ (losses / norm)
    active = values > -margin
    active[region] = False
    return active, directions


def _normalize_gram(gram: torch.Tensor, losses: torch.Tensor, normalization: str) -> torch.Tensor:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    gram = _check_gram(gram)
    if normalization == "none":
        return gram
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    if normalization == "l2":
        scale = norms
    elif normalization == "loss":
        scale = losses.abs()
    else:
        scale = losses.abs() * norms
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return gram * inv[:, None] * inv[None, :]  # a zero-norm (or zero-loss) gradient stays zero


def _unit_l1(weights: torch.Tensor) -> torch.Tensor:
    total = float(weights.abs().sum())
    if not math.isfinite(total) or total <= 1e-12:
        return torch.full_like(weights, 1.0 / weights.numel())
    return weights / total


def pareto_mtl_weights(grads: Grads, losses: torch.Tensor, preferences: torch.Tensor, region: int, *,
                       normalization: str = "l2", margin: float = 0.0, max_iter: int = 1000,
                       tol: float = 1e-10) -> torch.Tensor:
    """Pareto MTL descent-phase task weights (m,) float64 (Σ|w| = 1) for region Ω_k, k = region.

    grads: m gradients on the shared parameters ((m, P) or a sequence); losses: the m loss values;
    preferences: (n, m) preference vectors (e.g. `preference_vectors(K)`); normalization of the
    gradients before the solve: "l2" (g/||g||, the official AutoCDSR choice), "none", "loss"
    (g/L) or "loss+" (g/(L·||g||)). With the active set I (`active_constraints`) and
    A = [I_m ; (p_j − p_k)_{j in I}] ((m + |I|) × m), sol = min-norm weights of the vectors
    A·[g_1..g_m] (Gram A G Aᵀ), w = Aᵀ sol, then w / Σ|w|.
    """
    return pareto_mtl_weights_from_gram(gram_matrix(grads), losses, preferences, region, normalization=normalization,
                                        margin=margin, max_iter=max_iter, tol=tol)


def pareto_mtl_weights_from_gram(gram: torch.Tensor, losses: torch.Tensor, preferences: torch.Tensor, region: int, *,
                                 normalization: str = "l2", margin: float = 0.0, max_iter: int = 1000,
                                 tol: float = 1e-10) -> torch.Tensor:
    """`pareto_mtl_weights` from the Gram matrix G (m, m), G_ij = g_i · g_j, of the gradients (all
    the solve needs: a caller can form G on the device and bring only m² numbers to the host)."""
    losses, preferences = _check_problem(losses, preferences, region, None)
    gram = _normalize_gram(gram, losses, normalization)
    m = gram.shape[0]
    _check_problem(losses, preferences, region, m)
    active, directions = active_constraints(losses, preferences, region, margin=margin)
    combo = torch.cat([torch.eye(m, dtype=torch.float64), directions[active]], dim=0)
    sol = min_norm_from_gram(combo @ gram @ combo.T, max_iter=max_iter, tol=tol)
    return _unit_l1(combo.T @ sol)


def pareto_mtl_init_weights(grads: Grads, losses: torch.Tensor, preferences: torch.Tensor, region: int, *,
                            normalization: str = "l2", margin: float = 0.0, max_iter: int = 1000,
                            tol: float = 1e-10) -> Optional[torch.Tensor]:
    """Pareto MTL feasibility phase: task weights (m,) float64 (Σ|w| = 1) that descend only the
    violated constraints of Ω_k, or None when L already lies in Ω_k (no active constraint).

    One active constraint j: w ∝ p_j − p_k; several: sol = min-norm weights of {∇G_j} and
    w = Σ_j sol_j (p_j − p_k). Arguments as in `pareto_mtl_weights`.
    """
    return pareto_mtl_init_weights_from_gram(gram_matrix(grads), losses, preferences, region,
                                             normalization=normalization, margin=margin, max_iter=max_iter, tol=tol)


def pareto_mtl_init_weights_from_gram(gram: torch.Tensor, losses: torch.Tensor, preferences: torch.Tensor,
                                      region: int, *, normalization: str = "l2", margin: float = 0.0,
                                      max_iter: int = 1000, tol: float = 1e-10) -> Optional[torch.Tensor]:
    """`pareto_mtl_init_weights` from the Gram matrix G (m, m) of the gradients (see
    `pareto_mtl_weights_from_gram`)."""
    losses, preferences = _check_problem(losses, preferences, region, None)
    gram = _normalize_gram(gram, losses, normalization)
    _check_problem(losses, preferences, region, gram.shape[0])
    active, directions = active_constraints(losses, preferences, region, margin=margin)
    if not bool(active.any()):
        return None
    combo = directions[active]
    sol = min_norm_from_gram(combo @ gram @ combo.T, max_iter=max_iter, tol=tol)
    return _unit_l1(combo.T @ sol)
