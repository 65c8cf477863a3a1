"""The min-norm (MGDA) solver and the Pareto MTL step of fastattn.models.pareto, on small problems
with known answers: the two-task closed form, orthogonal / dominated gradients, 3-task problems
against a brute-force grid over the simplex and an exact active-set solution, Frank–Wolfe
convergence, preference vectors and regions, degenerate inputs and the errors of bad inputs.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastattn.models.pareto import (active_constraints, gram_matrix, min_norm_from_gram, min_norm_weights,
                                    pareto_mtl_init_weights, pareto_mtl_weights, preference_vectors)


def objective(gram: torch.Tensor, w: torch.Tensor) -> float:
    return float(w @ gram @ w)


def exact_min_norm(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact min over the simplex of wᵀGw by enumerating supports S: solve the KKT system
    G_SS w_S = μ 1, Σ w_S = 1 and keep feasible (w_S >= 0) candidates."""
    m = gram.shape[0]
    best_w, best = None, math.inf
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            s = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size] = gram[s][:, s]
            kkt[:size, size] = -1.0
            kkt[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1.0
            try:
                sol = torch.linalg.solve(kkt, rhs)
            except RuntimeError:  # singular: this support has no unique candidate
                continue
            if bool((sol[:size] >= -1e-12).all()):
                w = torch.zeros(m, dtype=torch.float64)
                w[s] = sol[:size].clamp_min(0)
                value = objective(gram, w)
                if value < best - 1e-15:
                    best_w, best = w, value
    assert best_w is not None
    return best_w, best


def simplex_grid(m: int, steps: int) -> torch.Tensor:
    """Every point of the simplex with coordinates in multiples of 1/steps (m = 3)."""
    assert m == 3
    pts = [(i / steps, j / steps, (steps - i - j) / steps) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return torch.tensor(pts, dtype=torch.float64)


# ---------------------------------------------------------------- two tasks
@pytest.mark.parametrize("seed", range(6))
def test_two_task_closed_form(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    g1 = torch.randn(7, generator=g, dtype=torch.float64)
    g2 = torch.randn(7, generator=g, dtype=torch.float64) + (seed % 3) * g1  # some cases clip at 0 or 1
    expected = float(((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1))
    w = min_norm_weights([g1, g2])
    assert w.dtype == torch.float64 and w.shape == (2,)
    torch.testing.assert_close(w, torch.tensor([expected, 1 - expected], dtype=torch.float64))
    # and it is the minimum along the segment
    ts = torch.linspace(0, 1, 2001, dtype=torch.float64)
    norms = ((ts[:, None] * g1 + (1 - ts[:, None]) * g2) ** 2).sum(-1)
    assert objective(gram_matrix([g1, g2]), w) <= float(norms.min()) + 1e-12


def test_orthogonal_unit_gradients_are_balanced() -> None:
    w = min_norm_weights(torch.eye(2, 5, dtype=torch.float32))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # orthogonal of different lengths: w_i ∝ 1 / ||g_i||²
    w = min_norm_weights([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(w, torch.tensor([0.2, 0.8], dtype=torch.float64))


def test_dominated_gradient_gets_all_weight() -> None:
    small, large = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])  # small·large >= ||small||²
    torch.testing.assert_close(min_norm_weights([small, large]), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(min_norm_weights([large, small]), torch.tensor([0.0, 1.0], dtype=torch.float64))
    three = min_norm_weights([large, small, 3 * large])
    torch.testing.assert_close(three, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_sequence_and_matrix_inputs_agree() -> None:
    g = torch.Generator().manual_seed(1)
    mat = torch.randn(3, 12, generator=g)
    shaped = [mat[0].view(3, 4), mat[1].view(12), mat[2].view(2, 6)]  # shapes may differ, sizes agree
    torch.testing.assert_close(min_norm_weights(shaped), min_norm_weights(mat))
    torch.testing.assert_close(gram_matrix(mat), (mat.double() @ mat.double().T))


# ---------------------------------------------------------------- three or more tasks
@pytest.mark.parametrize("case", ["interior", "edge", "vertex", "random0", "random1", "random2"])
def test_three_tasks_against_grid_and_exact(case: str) -> None:
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    if case == "interior":  # the three tips of a triangle around the origin, lifted off the plane
        grads = torch.tensor([[1.0, 0.0, 1.0], [-0.5, 0.9, 1.0], [-0.5, -0.9, 1.0]])
    elif case == "edge":  # g_3 beyond the segment g_1 g_2: optimum on that edge
        grads = torch.tensor([[1.0, -1.0, 0.5], [1.0, 1.0, 0.5], [3.0, 0.0, 2.0]])
    elif case == "vertex":  # g_1 is the closest point of the hull
        grads = torch.tensor([[0.2, 0.0, 0.0], [1.0, 0.3, 0.0], [1.0, -0.4, 0.2]])
    else:
        grads = torch.randn(3, 5, generator=g) + torch.randn(1, 5, generator=g)
    gram = gram_matrix(grads)
    w = min_norm_weights(grads)
    assert float(w.min()) >= 0.0 and abs(float(w.sum()) - 1.0) < 1e-12
    grid = simplex_grid(3, 200)
    values = torch.einsum("ni,ij,nj->n", grid, gram, grid)
    best = int(values.argmin())
    assert objective(gram, w) <= float(values[best]) + 1e-12  # at least as good as every grid point
    torch.testing.assert_close(w, grid[best], atol=0.02, rtol=0)  # unique optimum: next to the best grid point
    exact_w, exact_value = exact_min_norm(gram)
    assert objective(gram, w) == pytest.approx(exact_value, abs=1e-9 * float(gram.diagonal().max()))
    torch.testing.assert_close(w, exact_w, atol=1e-4, rtol=0)
    if case == "interior":
        torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6, rtol=0)
    if case == "vertex":
        torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_frank_wolfe_converges() -> None:
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(6, 10, generator=g, dtype=torch.float64) + 0.5
    gram = gram_matrix(grads)
    _, exact_value = exact_min_norm(gram)
    values = [objective(gram, min_norm_from_gram(gram, max_iter=n, tol=0.0)) for n in (1, 3, 10, 30, 100, 3000)]
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))  # exact line search never goes up
    assert values[0] > exact_value + 1e-6  # the problem is not solved by the first step
    assert values[-1] == pytest.approx(exact_value, rel=1e-7)
    w = min_norm_from_gram(gram)  # default tolerance: KKT conditions hold
    gw = gram @ w
    value = float(w @ gw)
    assert float(gw.min()) >= value - 1e-8 * float(gram.diagonal().max())
    assert float((gw[w > 1e-6] - value).abs().max()) < 1e-4 * float(gram.diagonal().max())


# ---------------------------------------------------------------- degenerate inputs
def test_degenerate_inputs_stay_finite() -> None:
    zeros = min_norm_weights(torch.zeros(3, 4))
    torch.testing.assert_close(zeros, torch.full((3,), 1 / 3, dtype=torch.float64))
    same = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(min_norm_weights([same, same]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    w3 = min_norm_weights([same, same, same])
    assert bool(torch.isfinite(w3).all()) and abs(float(w3.sum()) - 1) < 1e-12 and float(w3.min()) >= 0
    one_zero = min_norm_weights([torch.tensor([1.0, 2.0]), torch.zeros(2)])  # the zero vector is the minimum
    torch.testing.assert_close(one_zero, torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(min_norm_weights([torch.tensor([3.0])]), torch.ones(1, dtype=torch.float64))
    tiny = min_norm_weights(torch.eye(2, 3) * 1e-30)  # tiny but nonzero: same answer as unit vectors
    torch.testing.assert_close(tiny, torch.tensor([0.5, 0.5], dtype=torch.float64))
    prefs = preference_vectors(2)
    for grads in (torch.zeros(2, 5), torch.ones(2, 5), torch.tensor([[1.0, 0.0], [0.0, 0.0]])):
        for losses in (torch.tensor([0.0, 0.0]), torch.tensor([0.1, 3.0]), torch.tensor([3.0, 0.1])):
            for region in range(3):
                for normalization in ("l2", "none", "loss", "loss+"):
                    w = pareto_mtl_weights(grads, losses, prefs, region, normalization=normalization)
                    assert bool(torch.isfinite(w).all()) and float(w.abs().sum()) == pytest.approx(1.0)
                    w0 = pareto_mtl_init_weights(grads, losses, prefs, region, normalization=normalization)
                    if w0 is not None:
                        assert bool(torch.isfinite(w0).all()) and float(w0.abs().sum()) == pytest.approx(1.0)


# ---------------------------------------------------------------- Pareto MTL
def test_preference_vectors() -> None:
    two = preference_vectors(2)  # the official AutoCDSR set {(1,0), (.707,.707), (0,1)}
    torch.testing.assert_close(two, torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)], [0.0, 1.0]],
                                                 dtype=torch.float64))
    five = preference_vectors(5)
    assert five.shape == (6, 2)
    torch.testing.assert_close(five.norm(dim=1), torch.ones(6, dtype=torch.float64))
    angles = torch.atan2(five[:, 1], five[:, 0])
    torch.testing.assert_close(angles, torch.arange(6, dtype=torch.float64) * math.pi / 10)


def test_active_constraints_hand_case() -> None:
    prefs = preference_vectors(2)
    # region 0 = (1, 0): L must lean to the first loss; L = (0.1, 5) violates both other constraints
    active, directions = active_constraints(torch.tensor([0.1, 5.0]), prefs, 0)
    assert active.tolist() == [False, True, True]
    torch.testing.assert_close(directions, prefs - prefs[0])
    active, _ = active_constraints(torch.tensor([5.0, 0.1]), prefs, 0)
    assert active.tolist() == [False, False, False]
    # region 1 = (.707, .707) with L = (1, 0.1): only the constraint against p_0 is violated
    active, _ = active_constraints(torch.tensor([1.0, 0.1]), prefs, 1)
    assert active.tolist() == [True, False, False]
    assert not bool(active_constraints(torch.zeros(2), prefs, 1)[0].any())  # zero losses: no direction
    # the margin makes nearly-violated constraints active: L = (1, 0.445) is just inside Ω_1 (G_0 ≈ −0.02)
    assert active_constraints(torch.tensor([1.0, 0.445]), prefs, 1)[0].tolist() == [False, False, False]
    assert active_constraints(torch.tensor([1.0, 0.445]), prefs, 1, margin=0.05)[0].tolist() == [True, False, False]


def test_pareto_weights_without_active_constraints_are_mgda() -> None:
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(2, 9, generator=g, dtype=torch.float64)
    unit = grads / grads.norm(dim=1, keepdim=True)
    w = pareto_mtl_weights(grads, torch.tensor([5.0, 0.1]), preference_vectors(2), 0)  # inside Ω_0
    torch.testing.assert_close(w, min_norm_weights(unit))
    torch.testing.assert_close(pareto_mtl_weights(grads, torch.tensor([5.0, 0.1]), preference_vectors(2), 0,
                                                  normalization="none"), min_norm_weights(grads))


def test_pareto_weights_with_active_constraints_hand_case() -> None:
    # unit orthogonal gradients, region 0 of K=2, L = (0.1, 5): the min-norm point of
    # {(1,0), (0,1), (−.293,.707), (−1,1)} is (0.2, 0.4) = 0.6·g_1 + 0.4·(p_2 − p_0)ᵀg → w = (1/3, 2/3)
    grads = torch.eye(2, dtype=torch.float64)
    w = pareto_mtl_weights(grads, torch.tensor([0.1, 5.0]), preference_vectors(2), 0)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    # "l2" normalization: the lengths of the gradients do not matter
    scaled = grads * torch.tensor([[7.0], [0.01]], dtype=torch.float64)
    torch.testing.assert_close(pareto_mtl_weights(scaled, torch.tensor([0.1, 5.0]), preference_vectors(2), 0), w)


@pytest.mark.parametrize("seed", range(4))
def test_pareto_direction_descends_every_objective_and_active_constraint(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(2, 6, generator=g, dtype=torch.float64)
    losses = torch.rand(2, generator=g, dtype=torch.float64) * torch.tensor([0.5, 5.0], dtype=torch.float64)
    prefs = preference_vectors(5)
    unit = grads / grads.norm(dim=1, keepdim=True)
    for region in range(6):
        active, directions = active_constraints(losses, prefs, region)
        vectors = torch.cat([unit, directions[active] @ unit])
        d = pareto_mtl_weights(grads, losses, prefs, region) @ unit
        # d is the min-norm point u of the hull of `vectors`, up to a positive factor, and
        # v·u >= ||u||² > 0 for every v there: a common descent direction of every objective
        u = min_norm_weights(vectors) @ vectors
        assert float(u @ u) > 1e-6
        torch.testing.assert_close(d / d.norm(), u / u.norm())
        assert float((vectors @ u).min()) >= float(u @ u) - 1e-9
        w0 = pareto_mtl_init_weights(grads, losses, prefs, region)
        if not bool(active.any()):
            assert w0 is None
            continue
        assert w0 is not None
        d0 = w0 @ unit
        constraint_grads = directions[active] @ unit
        u0 = min_norm_weights(constraint_grads) @ constraint_grads
        torch.testing.assert_close(d0 / d0.norm(), u0 / u0.norm())
        assert float((constraint_grads @ d0).min()) > 0  # every violated constraint decreases


def test_feasibility_phase_single_constraint() -> None:
    prefs = preference_vectors(2)
    grads = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    w = pareto_mtl_init_weights(grads, torch.tensor([1.0, 0.1]), prefs, 1)  # only p_0 − p_1 active
    assert w is not None
    expected = prefs[0] - prefs[1]
    torch.testing.assert_close(w, expected / expected.abs().sum())
    assert pareto_mtl_init_weights(grads, torch.tensor([1.0, 1.0]), prefs, 1) is None  # on p_1: feasible


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("grads,match", [
    ([], "at least one"),
    (torch.zeros(4), r"\(m, P\)"),
    ([torch.zeros(3), torch.zeros(4)], "same parameters"),
    ([torch.zeros(3), [0.0, 1.0, 2.0]], r"grads\[1\] must be a torch.Tensor"),
    ([torch.zeros(3, dtype=torch.int64)], "float tensor"),
    (torch.tensor([[1.0, float("nan")]]), "non-finite"),
    (torch.zeros(2, 0), "at least one element"),
    (3.0, "sequence"),
])
def test_bad_grads(grads: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        min_norm_weights(grads)  # type: ignore[arg-type]


def test_bad_solver_and_pareto_arguments() -> None:
    with pytest.raises(ValueError, match="gram must be a square"):
        min_norm_from_gram(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_iter"):
        min_norm_from_gram(torch.eye(3), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        min_norm_from_gram(torch.eye(3), tol=-1.0)
    with pytest.raises(ValueError, match="num"):
        preference_vectors(0)
    grads, losses, prefs = torch.eye(2), torch.tensor([1.0, 2.0]), preference_vectors(2)
    with pytest.raises(ValueError, match="region"):
        pareto_mtl_weights(grads, losses, prefs, 3)
    with pytest.raises(ValueError, match="region"):
        pareto_mtl_init_weights(grads, losses, prefs, -1)
    with pytest.raises(ValueError, match="losses must hold one value per gradient"):
        pareto_mtl_weights(torch.eye(3), losses, prefs, 0)
    with pytest.raises(ValueError, match="preferences must have shape"):
        pareto_mtl_weights(grads, losses, torch.ones(3, 3), 0)
    with pytest.raises(ValueError, match="losses hold non-finite"):
        pareto_mtl_weights(grads, torch.tensor([1.0, float("inf")]), prefs, 0)
    with pytest.raises(ValueError, match="normalization"):
        pareto_mtl_weights(grads, losses, prefs, 0, normalization="max")
    with pytest.raises(ValueError, match="margin"):
        active_constraints(losses, prefs, 0, margin=float("nan"))
