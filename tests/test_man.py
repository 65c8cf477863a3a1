"""MAN: learning on tiny synthetic cross-domain data, the fused C++ backend against backend="torch"
(float64, losses and every gradient), no future leakage, local encoders that never read other
domains, the last-position evaluation path (cross attention, Lq != Lk) against the all-positions
training path, the sampled softmax and prototype regularizer by hand, and the errors of bad
configs and batches. Tiny shapes only.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastattn.data import SyntheticConfig, make_synthetic, split_dataset, train_batches
from fastattn.data.batch import EvalBatch, TrainBatch
from fastattn.models.man import (MAN, MANConfig, last_index, prototype_regularizer, sampled_softmax_loss)
from fastattn.models.sasrec import SASRecConfig

from cpp_required import cpp_tests_mark

CPP = pytest.param("cpp", marks=cpp_tests_mark())
NUM_ITEMS = 30
HIDDEN = 16


def config(**overrides: object) -> MANConfig:
    fields = dict(num_items=NUM_ITEMS, num_domains=2, hidden=HIDDEN, layers=1, heads=2, inner=32, dropout=0.0,
                  attn_dropout=0.0, max_len=12, num_prototypes=4, num_negatives=8, proto_weight=0.1,
                  backend="torch")
    fields.update(overrides)
    return MANConfig(**fields)  # type: ignore[arg-type]


def make_model(seed: int = 0, scale: float = 0.3, **overrides: object) -> MAN:
    """A model with weights larger than the default init, so every part changes the output."""
    torch.manual_seed(seed)
    model = MAN(config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, scale)
        model.item_embedding.weight[0].zero_()
    return model


def synthetic_batch() -> TrainBatch:
    ds = make_synthetic(SyntheticConfig(num_users=12, num_items=NUM_ITEMS, num_attributes=4, num_tags=4,
                                        min_len=4, max_len=9, seed=0))
    batch = next(train_batches(split_dataset(ds).train, 12, 12, shuffle=False))
    real = batch.targets != 0
    assert set(batch.target_domains[real].tolist()) == {0, 1}  # both local branches are used
    return batch


def mixed_batch(lengths: tuple[int, ...] = (8, 5, 3), length: int = 8, seed: int = 0) -> TrainBatch:
    """Random left-padded rows with random domains (both domains in every row of length >= 3)."""
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    items = torch.randint(1, NUM_ITEMS + 1, (rows, length), generator=g)
    targets = torch.randint(1, NUM_ITEMS + 1, (rows, length), generator=g)
    domains = torch.randint(0, 2, (rows, length), generator=g)
    target_domains = torch.randint(0, 2, (rows, length), generator=g)
    domains[:, -1], domains[:, -2], domains[:, -3] = 0, 1, 0
    padding = torch.arange(length)[None, :] < (length - torch.tensor(lengths))[:, None]
    for t in (items, targets, domains, target_domains):
        t.masked_fill_(padding, 0)
    return TrainBatch(items=items, targets=targets, domains=domains, target_domains=target_domains)


def eval_of(batch: TrainBatch, target_domain: torch.Tensor) -> EvalBatch:
    return EvalBatch(items=batch.items, target=batch.targets[:, -1], exclude=batch.items.clone(),
                     domains=batch.domains, target_domain=target_domain)


def losses_and_grads(model: MAN, batch: TrainBatch, seed: int = 5
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same negatives for every backend
    out = model.losses(batch)
    out["loss"].backward()
    return ({k: v.detach() for k, v in out.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


# ---------------------------------------------------------------- learning and backends
def test_loss_falls_on_synthetic_data() -> None:
    torch.manual_seed(0)
    model = MAN(config(backend="cpp", dropout=0.1, attn_dropout=0.1))
    batch = synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            value = float(model.losses(batch)["sampled_ce"])
        model.train()
        return value

    before = eval_loss()
    for _ in range(30):
        out = model.losses(batch)
        assert set(out) == {"loss", "sampled_ce", "proto"}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)
    assert model.item_table()[0][0].abs().max() == 0  # the padding row never moves


@pytest.mark.parametrize("backend", [CPP])
def test_fused_backend_matches_torch_float64(backend: str) -> None:
    batch = synthetic_batch()
    reference = make_model(seed=3).double()
    fused = make_model(seed=3, backend=backend).double()
    fused.load_state_dict(reference.state_dict())
    out_ref, grads_ref = losses_and_grads(reference, batch)
    out, grads = losses_and_grads(fused, batch)
    for key in ("loss", "sampled_ce", "proto"):
        torch.testing.assert_close(out[key], out_ref[key], atol=1e-10, rtol=1e-10)
    assert grads_ref.keys() == {n for n, _ in reference.named_parameters()}  # every part is trained
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-10, rtol=1e-8,
                                   msg=lambda m: f"{name}: {m}")
    # the evaluation path (cross attention with Lq != Lk, non-causal) agrees too
    evalb = eval_of(batch, batch.target_domains[:, -1])
    with torch.no_grad():
        torch.testing.assert_close(fused.eval().user_vectors(evalb), reference.eval().user_vectors(evalb),
                                   atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- causality and domain separation
@pytest.mark.parametrize("backend", ["torch", CPP])
@pytest.mark.parametrize("t0", [0, 3, 6])
def test_no_future_leakage(backend: str, t0: int) -> None:
    model = make_model(backend=backend).double().eval()
    batch = mixed_batch()
    g = torch.Generator().manual_seed(t0)
    items, domains, tdom = batch.items.clone(), batch.domains.clone(), batch.target_domains.clone()
    later = (items != 0) & (torch.arange(items.shape[1]) > t0)[None, :]
    items[later] = torch.randint(1, NUM_ITEMS + 1, (int(later.sum()),), generator=g)
    domains[later] = 1 - domains[later]
    tdom[later] = 1 - tdom[later]
    with torch.no_grad():
        base = model.encode(batch.items, batch.domains, batch.target_domains)
        changed = model.encode(items, domains, tdom)
    torch.testing.assert_close(changed[:, :t0 + 1], base[:, :t0 + 1], atol=1e-10, rtol=1e-10)
    assert (changed[:, t0 + 1:] - base[:, t0 + 1:]).abs().max() > 1e-3  # the change is visible later


@pytest.mark.parametrize("backend", ["torch", CPP])
def test_local_encoder_never_reads_other_domains(backend: str) -> None:
    model = make_model(backend=backend).double().eval()
    batch = mixed_batch(lengths=(8, 6, 4, 0))
    items, domains = batch.items, batch.domains
    g = torch.Generator().manual_seed(1)
    for d in (0, 1):
        other = (items != 0) & (domains != d)
        swapped = items.clone()
        swapped[other] = torch.randint(1, NUM_ITEMS + 1, (int(other.sum()),), generator=g)
        with torch.no_grad():
            base, last = model.local_states(items, domains, d)
            moved, _ = model.local_states(swapped, domains, d)
            # (1) other-domain items never reach domain d's local states, at any position, nor its
            # local item similarity; the fusion reads them on purpose (through the global states)
            torch.testing.assert_close(moved, base, atol=1e-12, rtol=0)
            for last_only in (False, True):
                state, sim, fused = model.local_features(items, domains, d, model.encode_global(items, domains),
                                                         last_only)
                state2, sim2, fused2 = model.local_features(swapped, domains, d,
                                                            model.encode_global(swapped, domains), last_only)
                torch.testing.assert_close(state2, state, atol=1e-12, rtol=0)
                torch.testing.assert_close(sim2, sim, atol=1e-12, rtol=0)
                assert (fused2 - fused).abs().max() > 1e-3
            # ... while the global encoder and the other local branch do read them
            assert (model.encode_global(swapped, domains) - model.encode_global(items, domains)).abs().max() > 1e-3
            e_base, _ = model.local_states(items, domains, 1 - d)
            e_moved, _ = model.local_states(swapped, domains, 1 - d)
            assert (e_moved - e_base).abs().max() > 1e-3
            # (2) on the mixed batch = the encoder run on the domain's own subsequence (left padded)
            own = (items != 0) & (domains == d)
            width = int(own.sum(1).max())
            compact = torch.zeros(items.shape[0], width, dtype=torch.int64)
            for b in range(items.shape[0]):
                seq = items[b][own[b]]
                compact[b, width - len(seq):] = seq
            h_mixed = model.encode_local(items, domains, d)
            h_compact = model.encode_local(compact, torch.full_like(compact, d), d)
            torch.testing.assert_close(h_mixed[own], h_compact[compact != 0], atol=1e-10, rtol=1e-10)
            # (3) s_d(t) = h_d(latest domain-d position <= t), else the learned empty vector
            for b in range(items.shape[0]):
                for t in range(items.shape[1]):
                    seen = [u for u in range(t + 1) if own[b, u]]
                    assert int(last[b, t]) == (seen[-1] if seen else -1)
                    expected = h_mixed[b, seen[-1]] if seen else model.local_empty[d].double()
                    torch.testing.assert_close(base[b, t], expected, atol=1e-12, rtol=0)


def test_last_index_hand_case() -> None:
    mask = torch.tensor([[False, True, False, True, False], [False, False, False, False, False]])
    assert last_index(mask).tolist() == [[-1, 1, 1, 3, 3], [-1, -1, -1, -1, -1]]


# ---------------------------------------------------------------- user vectors
@pytest.mark.parametrize("backend", ["torch", CPP])
def test_user_vectors_match_training_path_and_use_target_domain(backend: str) -> None:
    model = make_model(backend=backend).double().eval()
    batch = mixed_batch(lengths=(8, 5, 3, 1, 0))
    rows, length = batch.items.shape
    results = {}
    with torch.no_grad():
        for d in (0, 1):
            target = torch.full((rows,), d)
            vectors = model.user_vectors(eval_of(batch, target))
            assert vectors.shape == (rows, HIDDEN) and vectors.dtype == torch.float64
            assert torch.isfinite(vectors).all()
            # last-position path (Lq = 1 / Lq = K, causal=False) = all-positions path (causal) at L-1
            every = model.encode(batch.items, batch.domains, target[:, None].expand(rows, length))
            torch.testing.assert_close(vectors, every[:, -1], atol=1e-10, rtol=1e-10)
            results[d] = vectors
        # the target domain chooses the local branch: every row's vector depends on it
        assert ((results[0] - results[1]).abs().amax(dim=1) > 1e-3).all()
        mixed = model.user_vectors(eval_of(batch, torch.tensor([0, 1, 0, 1, 0])))
        torch.testing.assert_close(mixed, torch.where(torch.tensor([0, 1, 0, 1, 0])[:, None] == 1,
                                                      results[1], results[0]), atol=1e-12, rtol=0)
        # extra left padding changes nothing
        pad = lambda t: torch.nn.functional.pad(t, (3, 0))  # noqa: E731
        padded = EvalBatch(items=pad(batch.items), target=batch.targets[:, -1], exclude=batch.items,
                           domains=pad(batch.domains), target_domain=torch.zeros(rows, dtype=torch.int64))
        torch.testing.assert_close(model.user_vectors(padded), results[0], atol=1e-10, rtol=1e-10)
    weight, bias = model.item_table()
    assert weight is model.item_embedding.weight and bias is None and weight.shape == (NUM_ITEMS + 1, HIDDEN)


def test_user_vectors_need_target_domain() -> None:
    model = make_model().eval()
    batch = mixed_batch()
    with pytest.raises(ValueError, match="batch.target_domain is required"):
        model.user_vectors(EvalBatch(batch.items, batch.targets[:, -1], batch.items, domains=batch.domains))
    with pytest.raises(ValueError, match="batch.target_domain must be an integer tensor of shape"):
        model.user_vectors(eval_of(batch, torch.zeros(3, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="num_domains"):
        model.user_vectors(eval_of(batch, torch.tensor([0, 2, 1])))
    with pytest.raises(ValueError, match="batch.domains is required"):
        model.user_vectors(EvalBatch(batch.items, batch.targets[:, -1], batch.items,
                                     target_domain=torch.zeros(3, dtype=torch.int64)))


# ---------------------------------------------------------------- losses by hand
def test_sampled_softmax_and_negatives_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(NUM_ITEMS + 1, 4, generator=g, dtype=torch.float64)
    rows = torch.randn(5, 4, generator=g, dtype=torch.float64)
    positives = torch.randint(1, NUM_ITEMS + 1, (5,), generator=g)
    negatives = torch.randint(1, NUM_ITEMS + 1, (5, 3), generator=g)
    expected = 0.0
    for n in range(5):
        logits = [float(rows[n] @ weight[positives[n]])] + [float(rows[n] @ weight[j]) for j in negatives[n]]
        expected += math.log(sum(math.exp(z) for z in logits)) - logits[0]
    got = sampled_softmax_loss(rows, positives, negatives, weight)
    assert abs(float(got) - expected / 5) < 1e-12
    empty = sampled_softmax_loss(rows[:0], positives[:0], negatives[:0], weight.requires_grad_())
    assert float(empty.detach()) == 0.0 and empty.requires_grad

    model = MAN(config(num_negatives=50))
    targets = torch.randint(1, NUM_ITEMS + 1, (40,), generator=g)
    drawn = model.sample_negatives(targets)
    assert drawn.shape == (40, 50) and int(drawn.min()) >= 1 and int(drawn.max()) <= NUM_ITEMS
    assert not (drawn == targets[:, None]).any()
    two = MAN(config(num_items=2, num_negatives=7))
    targets = torch.tensor([1, 2, 2])
    assert torch.equal(two.sample_negatives(targets), (3 - targets)[:, None].expand(3, 7))


def test_prototype_regularizer_and_loss_composition() -> None:
    assert float(prototype_regularizer(torch.eye(4, 6) * 3.0)) == pytest.approx(0.0, abs=1e-12)
    same = torch.ones(4, 6)
    assert float(prototype_regularizer(same)) == pytest.approx((16 - 4) / 16)
    p = torch.randn(5, 3, dtype=torch.float64)
    unit = p / p.norm(dim=1, keepdim=True)
    expected = sum((float(unit[i] @ unit[j]) - (i == j)) ** 2 for i in range(5) for j in range(5)) / 25
    assert float(prototype_regularizer(p)) == pytest.approx(expected, rel=1e-12)

    batch = synthetic_batch()
    model = make_model(proto_weight=0.7)
    torch.manual_seed(2)
    out = model.losses(batch)
    torch.testing.assert_close(out["loss"], out["sampled_ce"] + 0.7 * out["proto"])
    torch.testing.assert_close(out["proto"], prototype_regularizer(model.prototype_attention.prototypes))
    # the sampled CE is the hand formula on the same negatives (drawn for every position, then the
    # valid positions are kept)
    mask = ((batch.items != 0) & (batch.targets != 0)).reshape(-1)
    torch.manual_seed(2)
    negatives = model.sample_negatives(torch.where(mask, batch.targets.reshape(-1), 0))[mask]
    with torch.no_grad():
        rows = model.encode(batch.items, batch.domains, batch.target_domains).reshape(mask.shape[0], -1)[mask]
        expected = sampled_softmax_loss(rows, batch.targets.reshape(-1)[mask], negatives, model.item_embedding.weight)
    torch.testing.assert_close(out["sampled_ce"].detach(), expected)
    # proto_weight = 0: the loss is the sampled CE alone (proto still reported)
    zero = make_model(proto_weight=0.0)
    zero.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    out0 = zero.losses(batch)
    assert torch.equal(out0["loss"], out0["sampled_ce"]) and float(out0["proto"]) > 0
    torch.testing.assert_close(out0["sampled_ce"], out["sampled_ce"])


# ---------------------------------------------------------------- single domain, edge cases
def test_single_domain_data() -> None:
    model = make_model(num_domains=1).eval()
    batch = mixed_batch()
    plain = TrainBatch(batch.items, batch.targets)  # single-domain data: no domain tensors
    zeros = torch.zeros_like(batch.items)
    torch.manual_seed(0)
    a = model.losses(plain)
    torch.manual_seed(0)
    b = model.losses(TrainBatch(batch.items, batch.targets, domains=zeros, target_domains=zeros))
    torch.testing.assert_close(a["loss"], b["loss"], atol=0, rtol=0)
    vectors = model.user_vectors(EvalBatch(batch.items, batch.targets[:, -1], batch.items))
    assert vectors.shape == (3, HIDDEN) and torch.isfinite(vectors).all()
    with pytest.raises(ValueError, match="num_domains=1"):
        model.losses(TrainBatch(batch.items, batch.targets, domains=batch.domains, target_domains=zeros))


@pytest.mark.parametrize("backend", ["torch", CPP])
def test_edge_cases_are_finite(backend: str) -> None:
    model = make_model(backend=backend)
    # an all-padding row, a row of domain-0 items predicting a domain-1 item (empty local state), L = 1
    items = torch.tensor([[0, 0, 0, 0], [3, 4, 5, 6], [0, 0, 7, 8]])
    targets = torch.tensor([[0, 0, 0, 0], [4, 5, 6, 9], [0, 0, 8, 2]])
    domains = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    target_domains = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]])
    cases = [TrainBatch(items, targets, domains=domains, target_domains=target_domains),
             TrainBatch(items[:, -1:], targets[:, -1:], domains=domains[:, -1:],
                        target_domains=target_domains[:, -1:]),
             TrainBatch(items[:1], targets[:1], domains=domains[:1], target_domains=target_domains[:1])]
    for batch in cases:
        model.zero_grad(set_to_none=True)
        out = model.losses(batch)
        assert all(torch.isfinite(v) for v in out.values())
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        with torch.no_grad():
            vectors = model.eval().user_vectors(eval_of(batch, batch.target_domains[:, -1]))
        model.train()
        assert vectors.shape == (batch.items.shape[0], HIDDEN) and torch.isfinite(vectors).all()
    assert float(model.losses(cases[2])["sampled_ce"].detach()) == 0.0  # no valid position
    with torch.no_grad():
        state, last = model.local_states(items, domains, 1)
    assert int(last[1, -1]) == -1
    torch.testing.assert_close(state[1, -1], model.local_empty[1])


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [
    ("num_domains", 0), ("num_domains", 1.5), ("num_domains", True), ("num_prototypes", 0),
    ("num_negatives", 0), ("proto_weight", -1.0), ("proto_weight", float("nan")), ("proto_weight", True),
    ("num_items", 1), ("heads", 3), ("backend", "gpu"),
])
def test_bad_config_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match="hidden" if field == "heads" else field):
        config(**{field: value})


def test_config_defaults_and_type() -> None:
    c = MANConfig(num_items=10)
    assert (c.num_domains, c.num_prototypes, c.num_negatives, c.proto_weight) == (1, 8, 100, 0.1)
    with pytest.raises(TypeError, match="MANConfig"):
        MAN(SASRecConfig(num_items=10))  # type: ignore[arg-type]


def test_bad_batches() -> None:
    model = make_model()
    batch = mixed_batch()
    with pytest.raises(ValueError, match="batch.domains is required"):
        model.losses(TrainBatch(batch.items, batch.targets, target_domains=batch.target_domains))
    with pytest.raises(ValueError, match="batch.target_domains is required"):
        model.losses(TrainBatch(batch.items, batch.targets, domains=batch.domains))
    with pytest.raises(ValueError, match="batch.domains must be an integer tensor"):
        model.losses(TrainBatch(batch.items, batch.targets, domains=batch.domains.float(),
                                target_domains=batch.target_domains))
    with pytest.raises(ValueError, match="batch.target_domains must be an integer tensor"):
        model.losses(TrainBatch(batch.items, batch.targets, domains=batch.domains,
                                target_domains=batch.target_domains[:, 1:]))
    with pytest.raises(ValueError, match="num_domains=2"):
        model.losses(TrainBatch(batch.items, batch.targets, domains=batch.domains + 2,
                                target_domains=batch.target_domains))
    with pytest.raises(ValueError, match="max_len"):
        pad = lambda t: torch.nn.functional.pad(t, (6, 0))  # noqa: E731
        model.losses(TrainBatch(pad(batch.items), pad(batch.targets), domains=pad(batch.domains),
                                target_domains=pad(batch.target_domains)))
