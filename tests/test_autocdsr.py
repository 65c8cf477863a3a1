"""AutoCDSR / AutoCDSR+: learning on tiny synthetic data, fused backend against backend="torch"
(float64, both loss modes), a_cd against explicit attention probabilities, the Pareto weights of
losses() against the solver on separately computed gradients, the domain key masks of AutoCDSR+,
no future leakage, edge cases, the `domains=` / `causal=` options of the layers, and the errors of
bad configs and batches. Tiny shapes only.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import pytest
import torch

from fastattn.data import SyntheticConfig, make_synthetic
from fastattn.data.batch import EvalBatch, TrainBatch
from fastattn.data.batching import train_batches
from fastattn.models.autocdsr import AutoCDSR, AutoCDSRConfig
from fastattn.models.autocdsr_plus import AutoCDSRPlus, AutoCDSRPlusConfig
from fastattn.models.blocks import TransformerLayer, full_softmax_loss, valid_positions
from fastattn.models.pareto import pareto_mtl_init_weights, pareto_mtl_weights, preference_vectors
from fastattn.models.sasrec import SASRecConfig
from fastattn.nn import DIFAttention

from cpp_required import cpp_tests_mark

CPP = pytest.param("cpp", marks=cpp_tests_mark())
NUM_ITEMS = 30
MODELS = ["autocdsr", "plus"]
MODES = ["pareto", "fixed"]


def make_config(kind: str, **overrides: Any) -> AutoCDSRConfig:
    fields: dict[str, Any] = dict(num_items=NUM_ITEMS, num_domains=2, hidden=16, layers=1, heads=2, inner=32,
                                  dropout=0.0, attn_dropout=0.0, max_len=10, backend="torch")
    if kind == "plus":
        fields.update(num_ib_tokens=3, domain_layers=2, shared_layers=1)
    fields.update(overrides)
    return AutoCDSRPlusConfig(**fields) if kind == "plus" else AutoCDSRConfig(**fields)


def make_model(kind: str, seed: int = 0, std: float = 0.0, **overrides: Any) -> AutoCDSR | AutoCDSRPlus:
    torch.manual_seed(seed)
    config = make_config(kind, **overrides)
    model = AutoCDSRPlus(config) if kind == "plus" else AutoCDSR(config)  # type: ignore[arg-type]
    if std > 0:  # larger than the default init so that attention (and a_cd) varies across keys
        for name, p in model.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(p, std=std)
    return model


def synthetic_batch(rows: int = 12, seed: int = 0) -> TrainBatch:
    ds = make_synthetic(SyntheticConfig(num_users=40, num_items=NUM_ITEMS, num_attributes=5, num_tags=6,
                                        min_len=3, max_len=10, seed=seed))
    assert ds.num_domains == 2
    batch = next(train_batches(ds, rows, 10, shuffle=False))
    assert batch.domains is not None and bool((batch.domains != 0).any())
    return batch


def eval_of(batch: TrainBatch) -> EvalBatch:
    return EvalBatch(items=batch.items, target=batch.targets[:, -1], exclude=batch.items.clone(),
                     domains=batch.domains)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- learning
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", MODELS)
def test_loss_falls(kind: str, mode: str) -> None:
    batch = synthetic_batch()
    model = make_model(kind, backend="cpp" if kind == "autocdsr" else "torch", acd_mode=mode, acd_weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        out = model.losses(batch)
        assert set(out) == {"loss", "rec", "acd", "w_acd"}
        assert all(bool(torch.isfinite(v).all()) for v in out.values())
        torch.testing.assert_close(out["loss"].detach(), out["rec"] + float(out["w_acd"]) * out["acd"],
                                   atol=1e-6, rtol=1e-6)
        history.append((float(out["rec"]), float(out["acd"])))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert history[-1][0] < 0.6 * history[0][0]
    assert 0.0 <= min(a for _, a in history) and max(a for _, a in history) <= 1.0
    if mode == "fixed":
        assert float(out["w_acd"]) == 1.0
        assert history[-1][1] < history[0][1]  # the regularizer does its job


# ---------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("backend", [CPP])
def test_fused_backend_matches_torch(backend: str, kind: str, mode: str) -> None:
    batch = synthetic_batch(rows=6)
    results = []
    for name in (backend, "torch"):
        model = make_model(kind, seed=3, std=0.3, backend=name, acd_mode=mode).double()
        out = model.losses(batch)
        out["loss"].backward()
        results.append((out, grads_of(model)))
    (fused, fused_grads), (ref, ref_grads) = results
    assert float(ref["acd"]) > 0.05
    for key in ("loss", "rec", "acd", "w_acd"):
        torch.testing.assert_close(fused[key], ref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    assert fused_grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- a_cd against explicit attention
def explicit_acd(layer: TransformerLayer, hidden: torch.Tensor, padding: torch.Tensor, domains: torch.Tensor,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over rows and heads of a_cd, number of rows · heads) from softmax(q kᵀ/√d) built by hand."""
    attn = layer.attention
    b, length, _ = hidden.shape
    q, k, _ = attn.in_proj(hidden).view(b, length, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & ~padding[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0)  # empty rows: 0
    cross = (domains[:, :, None] != domains[:, None, :])[:, None]
    acd = (probs * cross).sum(-1)  # (B, H, L)
    return (acd * rows[:, None]).sum(), rows.sum() * attn.heads


def capture_layer_inputs(layers: list[TransformerLayer]) -> tuple[list[tuple], list[Any]]:
    seen: list[tuple] = []
    handles = [layer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((mod, args, kwargs)),
                                               with_kwargs=True) for layer in layers]
    return seen, handles


@pytest.mark.parametrize("backend", [CPP, "torch"])
def test_autocdsr_acd_matches_explicit_attention(backend: str) -> None:
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7], [0, 0, 0, 0, 0, 0]])
    domains = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    model = make_model("autocdsr", seed=1, std=0.3, layers=2, backend=backend).double()
    seen, handles = capture_layer_inputs(list(model.layers))
    _, acd = model.encode(items, domains)
    for h in handles:
        h.remove()
    padding = items == 0
    total, count = torch.zeros((), dtype=torch.float64), 0
    for layer, args, kwargs in seen:
        part, n = explicit_acd(layer, args[0].detach(), padding, domains, ~padding)
        total, count = total + part, count + int(n)
    assert count == 2 * 2 * int((~padding).sum())  # layers · heads · valid rows
    assert acd is not None and 0.05 < float(acd.detach()) < 1
    torch.testing.assert_close(acd.double(), total / count, atol=1e-6, rtol=1e-6)
    # per row: a row with items of one domain only (row 2 has one item) has a_cd = 0 there
    per_layer = model.acd_per_layer(items, domains)
    assert len(per_layer) == 2 and per_layer[0].shape == (4, 2, 6) and per_layer[0].dtype == torch.float32
    assert float(per_layer[0][2, :, 5].detach().abs().max()) == 0.0
    assert float(per_layer[0][1, :, 0].detach().abs().max()) == 0.0  # the first item sees only itself


def test_plus_acd_is_attention_on_ib_tokens() -> None:
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
    domains = torch.tensor([[0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    model = make_model("plus", seed=2, std=0.3).double()
    k = model.config.num_ib_tokens
    layers = [enc[i] for enc in model.domain_encoders for i in range(model.config.domain_layers)]
    seen, handles = capture_layer_inputs(layers)
    _, acd = model.encode(items, domains)
    for h in handles:
        h.remove()
    assert len(seen) == 4
    padding = items == 0
    total, count = torch.zeros((), dtype=torch.float64), 0
    for layer, args, kwargs in seen:
        hidden = args[0].detach()
        d = next(i for i, enc in enumerate(model.domain_encoders) if any(layer is m for m in enc))
        key_hidden = kwargs["key_padding_mask"] if "key_padding_mask" in kwargs else args[3]
        expected_mask = torch.cat([torch.zeros(3, k, dtype=torch.bool), padding | (domains != d)], dim=1)
        assert torch.equal(key_hidden, expected_mask)
        attn = layer.attention
        b, length, _ = hidden.shape
        q, kk, _ = attn.in_proj(hidden).view(b, length, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(attn.head_dim)
        visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & ~expected_mask[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
        on_ib = probs[:, :, k:, :k].sum(-1)  # (B, H, L): item rows, mass on the IB keys
        rows = (~padding) & (domains == d)
        total, count = total + (on_ib * rows[:, None]).sum(), count + int(rows.sum()) * attn.heads
    assert count == 2 * 2 * int((~padding).sum())  # domain layers · heads · valid items
    torch.testing.assert_close(acd.double(), total / count, atol=1e-6, rtol=1e-6)
    assert 0.05 < float(acd.detach()) < 1


def test_plus_ib_states_are_averaged_after_each_domain_layer() -> None:
    items = torch.tensor([[0, 3, 4, 5, 6], [1, 2, 9, 10, 11]])
    domains = torch.tensor([[0, 0, 1, 0, 1], [1, 1, 0, 0, 1]])
    model = make_model("plus", seed=7, std=0.3, num_domains=3)  # domain 2 has no item at all
    k = model.config.num_ib_tokens
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for d, encoder in enumerate(model.domain_encoders):
        for i, layer in enumerate(encoder):
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs, key=(d, i): inputs.__setitem__(key, args[0].detach()), with_kwargs=True))
            handles.append(layer.register_forward_hook(
                lambda mod, args, out, key=(d, i): outputs.__setitem__(key, out[0].detach())))
    model.encode(items, domains)
    for h in handles:
        h.remove()
    mean_ib = torch.stack([outputs[(d, 0)][:, :k] for d in range(3)]).mean(dim=0)
    for d in range(3):
        torch.testing.assert_close(inputs[(d, 1)][:, :k], mean_ib)  # the IB tokens: the mean over domains
        torch.testing.assert_close(inputs[(d, 1)][:, k:], outputs[(d, 0)][:, k:])  # items: own encoder
    assert not torch.allclose(outputs[(0, 0)][:, :k], outputs[(1, 0)][:, :k])  # the mean is not trivial


# ---------------------------------------------------------------- Pareto weights
@pytest.mark.parametrize("scale", ["rec", "sum"])
@pytest.mark.parametrize("kind", MODELS)
def test_pareto_weights_match_solver_on_separate_gradients(kind: str, scale: str) -> None:
    batch = synthetic_batch(rows=6)
    model = make_model(kind, seed=5, std=0.3, pareto_scale=scale, pareto_vectors=5, pareto_region=3).double()
    # the gradients of rec and acd on the shared parameters, computed here without losses()
    shared = model.shared_parameters()
    names = [n for n, _ in shared]
    assert "item_embedding.weight" not in names and "position_embedding.weight" in names
    assert len(names) == len(list(model.parameters())) - 1
    params = [p for _, p in shared]
    hidden, acd = model.encode(batch.items, batch.domains)
    mask = valid_positions(batch)
    rec = full_softmax_loss(hidden[mask], batch.targets[mask], model.item_embedding.weight, "torch")

    def flat(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])

    g_acd, g_rec = flat(acd), flat(rec)
    expected = pareto_mtl_weights(torch.stack([g_acd, g_rec]), torch.stack([acd, rec]).detach(),
                                  preference_vectors(5), 3)
    if scale == "rec":
        expected = expected / expected[1]
    out = model.losses(batch)
    torch.testing.assert_close(model.pareto_weights, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["w_acd"].double(), expected[0], atol=1e-6, rtol=1e-6)
    assert out["w_acd"] != 0
    # the loss the training loop differentiates: w_rec·rec + w_acd·acd, weights constant
    model.zero_grad()
    out["loss"].backward()
    combined = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    torch.testing.assert_close(combined, float(expected[1]) * g_rec + float(expected[0]) * g_acd,
                               atol=1e-6, rtol=1e-5)


def test_pareto_feasibility_phase_and_step_count() -> None:
    batch = synthetic_batch(rows=6)
    # region 0 (p_0 = (1, 0) on (acd, rec)) with rec ≈ log(30) >> acd: outside Ω_0, so the first
    # pareto_init_steps training steps use the feasibility weights
    model = make_model("autocdsr", seed=5, std=0.3, pareto_init_steps=2, pareto_scale="sum").double()
    params = [p for _, p in model.shared_parameters()]
    hidden, acd = model.encode(batch.items, batch.domains)
    mask = valid_positions(batch)
    rec = full_softmax_loss(hidden[mask], batch.targets[mask], model.item_embedding.weight, "torch")
    grads = []
    for loss in (acd, rec):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    values = torch.stack([acd, rec]).detach()
    init = pareto_mtl_init_weights(torch.stack(grads), values, preference_vectors(2), 0)
    main = pareto_mtl_weights(torch.stack(grads), values, preference_vectors(2), 0)
    assert init is not None and not torch.allclose(init, main)
    model.eval()  # evaluation calls do not count as training steps
    model.losses(batch)
    assert int(model.pareto_steps) == 0
    torch.testing.assert_close(model.pareto_weights, main, atol=1e-6, rtol=1e-6)
    model.train()
    model.losses(batch)
    torch.testing.assert_close(model.pareto_weights, init, atol=1e-6, rtol=1e-6)
    assert int(model.pareto_steps) == 1
    model.losses(batch)
    model.losses(batch)  # the third training step: past pareto_init_steps
    torch.testing.assert_close(model.pareto_weights, main, atol=1e-6, rtol=1e-6)
    assert int(model.pareto_steps) == 3
    with torch.no_grad():  # no graph: the last weights are reused
        out = model.losses(batch)
    torch.testing.assert_close(out["w_acd"].double(), main[0], atol=1e-6, rtol=1e-6)
    assert "pareto_steps" in model.state_dict() and "pareto_weights" in model.state_dict()


@pytest.mark.parametrize("kind", MODELS)
def test_single_domain_batch_is_a_plain_rec_step(kind: str) -> None:
    batch = synthetic_batch(rows=6)
    batch = replace(batch, domains=torch.zeros_like(batch.domains))
    model = make_model(kind, seed=1, std=0.3)
    out = model.losses(batch)
    if kind == "autocdsr":
        assert float(out["acd"]) == 0.0  # no cross-domain pair at all
        assert float(out["w_acd"]) == 0.0
        torch.testing.assert_close(out["loss"].detach(), out["rec"])
    else:  # the IB tokens are still "another domain": their attention mass is regularized
        assert float(out["acd"]) > 0 and float(out["w_acd"]) != 0.0


# ---------------------------------------------------------------- AutoCDSR+ masks and leakage
def test_plus_domain_encoder_never_sees_other_domains() -> None:
    items = torch.tensor([[0, 3, 4, 5, 6, 7, 8], [1, 2, 9, 10, 11, 12, 13]])
    domains = torch.tensor([[0, 0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 0, 0]])
    model = make_model("plus", seed=4, std=0.3, max_len=8)
    for d in (0, 1):
        other = (domains != d) & (items != 0)
        perturbed = torch.where(other, (items + 7) % NUM_ITEMS + 1, items)  # new ids at the other domain's slots
        assert not torch.equal(perturbed, items)
        before, _ = model.encode(items, domains, stage="domain")
        after, _ = model.encode(perturbed, domains, stage="domain")
        mine = (domains == d) & (items != 0)
        torch.testing.assert_close(after[mine], before[mine], atol=1e-6, rtol=0)
        assert not torch.allclose(after[other], before[other])  # the other domain's own states do move
        final_before, _ = model.encode(items, domains)
        final_after, _ = model.encode(perturbed, domains)
        assert not torch.allclose(final_after[mine], final_before[mine])  # the shared encoder mixes domains


@pytest.mark.parametrize("kind", MODELS)
def test_no_future_leakage_and_left_padding_invariance(kind: str) -> None:
    items = torch.tensor([[0, 3, 4, 5, 6, 7, 8], [1, 2, 9, 10, 11, 12, 13]])
    domains = torch.tensor([[0, 0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 0, 0]])
    model = make_model(kind, seed=6, std=0.3, max_len=10)
    base, _ = model.encode(items, domains)
    for t in (2, 4):
        future = items.clone()
        future[:, t + 1:] = (future[:, t + 1:] + 5) % NUM_ITEMS + 1
        flipped = domains.clone()
        flipped[:, t + 1:] = 1 - flipped[:, t + 1:]
        changed, _ = model.encode(future, flipped)
        torch.testing.assert_close(changed[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(changed[:, t + 1:], base[:, t + 1:])
    padded = EvalBatch(items=torch.nn.functional.pad(items, (2, 0)), target=items[:, -1],
                       exclude=items.clone(), domains=torch.nn.functional.pad(domains, (2, 0)))
    plain = EvalBatch(items=items, target=items[:, -1], exclude=items.clone(), domains=domains)
    torch.testing.assert_close(model.user_vectors(padded), model.user_vectors(plain), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.user_vectors(plain), base[:, -1])


# ---------------------------------------------------------------- edge cases
EDGE_BATCHES: dict[str, Callable[[], TrainBatch]] = {
    "all-padding-row": lambda: TrainBatch(items=torch.tensor([[0, 0, 0], [1, 2, 3]]),
                                          targets=torch.tensor([[0, 0, 0], [2, 3, 4]]),
                                          domains=torch.tensor([[0, 0, 0], [0, 1, 1]])),
    "one-domain-rows": lambda: TrainBatch(items=torch.tensor([[0, 5, 6], [1, 2, 3]]),
                                          targets=torch.tensor([[0, 6, 7], [2, 3, 4]]),
                                          domains=torch.tensor([[0, 1, 1], [0, 0, 0]])),
    "length-1": lambda: TrainBatch(items=torch.tensor([[4], [0]]), targets=torch.tensor([[5], [0]]),
                                   domains=torch.tensor([[1], [0]])),
    "all-padding": lambda: TrainBatch(items=torch.zeros(2, 3, dtype=torch.int64),
                                      targets=torch.zeros(2, 3, dtype=torch.int64),
                                      domains=torch.zeros(2, 3, dtype=torch.int64)),
}


@pytest.mark.parametrize("case", list(EDGE_BATCHES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", MODELS)
def test_edge_cases_are_finite(kind: str, mode: str, case: str) -> None:
    batch = EDGE_BATCHES[case]()
    model = make_model(kind, seed=0, std=0.3, acd_mode=mode, backend="cpp" if kind == "plus" else "torch")
    out = model.losses(batch)
    assert all(bool(torch.isfinite(v).all()) for v in out.values()), out
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
    vectors = model.user_vectors(eval_of(batch))
    assert vectors.shape == (2, 16) and bool(torch.isfinite(vectors).all())
    if case == "one-domain-rows" and kind == "autocdsr":
        # row 1 is single-domain; row 0 has items of domain 1 only (its padding is not a key)
        assert float(out["acd"]) == 0.0


def test_item_table_is_the_tied_embedding() -> None:
    for kind in MODELS:
        model = make_model(kind)
        weight, bias = model.item_table()
        assert weight is model.item_embedding.weight and bias is None and weight.shape == (NUM_ITEMS + 1, 16)


# ---------------------------------------------------------------- layer options
def test_layer_domains_and_causal_options() -> None:
    torch.manual_seed(0)
    config = make_config("autocdsr")
    layer = TransformerLayer(config).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    padding = torch.tensor([[True, False, False, False, False], [False] * 5])
    domains = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 1, 0, 1]])
    plain = layer(x, key_padding_mask=padding)
    out, acd = layer(x, key_padding_mask=padding, domains=domains)
    torch.testing.assert_close(out, plain)  # the domains only add the acd output
    assert acd.shape == (2, 2, 5) and acd.dtype == torch.float32
    total, count = explicit_acd(layer, x, padding, domains, ~padding)
    torch.testing.assert_close((acd.double() * (~padding)[:, None]).sum() / count, total / count,
                               atol=1e-6, rtol=1e-6)
    bidirectional = layer(x, key_padding_mask=padding, causal=False)
    assert not torch.allclose(bidirectional[:, :-1], plain[:, :-1])
    torch.testing.assert_close(bidirectional[:, -1], plain[:, -1])  # the last row sees every key either way
    attention = DIFAttention(16, 2, (), use_position=False, causal=False).double()
    attention.load_state_dict(layer.attention.state_dict())
    torch.testing.assert_close(layer.attention(x, key_padding_mask=padding, causal=False),
                               attention(x, key_padding_mask=padding))
    torch.testing.assert_close(attention(x, key_padding_mask=padding, causal=True),
                               layer.attention(x, key_padding_mask=padding))
    with pytest.raises(ValueError, match="causal"):
        layer.attention(x, causal=1)  # type: ignore[arg-type]
    gate = DIFAttention(16, 2, (), fusion="gate", use_position=False, max_len=8)
    with pytest.raises(ValueError, match="fusion='sum'"):
        gate(x.float(), domains=domains)
    with pytest.raises(ValueError, match="domains"):
        layer(x, domains=torch.zeros(2, 4, dtype=torch.int64))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kind,field,value", [
    ("autocdsr", "num_domains", 0),
    ("autocdsr", "acd_mode", "adaptive"),
    ("autocdsr", "acd_weight", float("nan")),
    ("autocdsr", "pareto_vectors", 0),
    ("autocdsr", "pareto_region", 3),
    ("autocdsr", "pareto_region", -1),
    ("autocdsr", "pareto_normalization", "max"),
    ("autocdsr", "pareto_scale", "acd"),
    ("autocdsr", "pareto_init_steps", -1),
    ("plus", "num_ib_tokens", 0),
    ("plus", "domain_layers", 0),
    ("plus", "shared_layers", -1),
    ("plus", "heads", 3),
])
def test_bad_config_names_field(kind: str, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        make_config(kind, **{field: value})


def test_wrong_config_type() -> None:
    with pytest.raises(TypeError, match="AutoCDSRConfig"):
        AutoCDSR(SASRecConfig(num_items=NUM_ITEMS))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AutoCDSRConfig"):
        AutoCDSR(make_config("plus"))
    with pytest.raises(TypeError, match="AutoCDSRPlusConfig"):
        AutoCDSRPlus(make_config("autocdsr"))  # type: ignore[arg-type]
    # num_domains comes from the data set: a config may leave it unset, a model needs it
    with pytest.raises(ValueError, match="num_domains must be set"):
        AutoCDSR(AutoCDSRConfig(num_items=NUM_ITEMS))


@pytest.mark.parametrize("kind", MODELS)
def test_bad_batches(kind: str) -> None:
    model = make_model(kind)
    batch = synthetic_batch(rows=3)
    with pytest.raises(ValueError, match="batch.domains is None"):
        model.losses(replace(batch, domains=None))
    with pytest.raises(ValueError, match="batch.domains holds ids outside"):
        model.losses(replace(batch, domains=batch.domains + 1))
    with pytest.raises(ValueError, match="batch.domains must be an integer tensor"):
        model.losses(replace(batch, domains=batch.domains[:, 1:]))
    with pytest.raises(ValueError, match="batch.domains must be an integer tensor"):
        model.losses(replace(batch, domains=batch.domains.float()))
    with pytest.raises(ValueError, match="max_len"):
        model.losses(TrainBatch(items=torch.ones(1, 11, dtype=torch.int64),
                                targets=torch.ones(1, 11, dtype=torch.int64), domains=torch.zeros(1, 11,
                                                                                                  dtype=torch.int64)))
    evaluation = replace(eval_of(batch), domains=None)
    if kind == "plus":
        with pytest.raises(ValueError, match="batch.domains is None"):
            model.user_vectors(evaluation)
    else:  # AutoCDSR's representation does not depend on domains (they only enter the loss)
        torch.testing.assert_close(model.user_vectors(evaluation), model.user_vectors(eval_of(batch)))
    if kind == "plus":
        with pytest.raises(ValueError, match="stage"):
            model.encode(batch.items, batch.domains, stage="merged")  # type: ignore[call-arg]
