"""MQSA-TED: learning on a tiny batch, fused backend against backend="torch", the α=1 short tower
(= SASRec), the long queries on a hand case, the TED loss against a dense float64 computation,
and the errors of bad configs and a missing teacher. Tiny shapes only.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastattn.data.batch import EvalBatch, TrainBatch
from fastattn.models import MQSATED, MQSATEDConfig, SASRec, SASRecConfig
from fastattn.models.mqsa_ted import long_queries

from cpp_required import cpp_tests_mark

CPP = pytest.param("cpp", marks=cpp_tests_mark())
NUM_ITEMS = 8
# Left-padded training sequences (the rows of the batch below); items 1..8.
SEQUENCES = [[1, 2, 3, 4, 5, 6], [0, 0, 2, 3, 4, 5], [0, 0, 0, 7, 8, 1], [0, 3, 4, 5, 6, 7]]


def config(**overrides: object) -> MQSATEDConfig:
    fields = dict(num_items=NUM_ITEMS, hidden=16, layers=1, heads=2, inner=32, dropout=0.0, attn_dropout=0.0,
                  max_len=8, backend="torch")
    fields.update(overrides)
    return MQSATEDConfig(**fields)  # type: ignore[arg-type]


def train_batch() -> TrainBatch:
    full = torch.tensor([s + [t] for s, t in zip(SEQUENCES, [7, 6, 2, 8])])
    items, targets = full[:, :-1].clone(), full[:, 1:].clone()
    targets[items == 0] = 0
    return TrainBatch(items=items, targets=targets)


def eval_batch() -> EvalBatch:
    items = torch.tensor(SEQUENCES)
    return EvalBatch(items=items, target=torch.tensor([7, 6, 2, 8]), exclude=items.clone())


def make_model(seed: int = 0, **overrides: object) -> MQSATED:
    torch.manual_seed(seed)
    model = MQSATED(config(**overrides))
    model.set_teacher(SEQUENCES)
    return model


def test_loss_falls() -> None:
    model = make_model()
    batch = train_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        out = model.losses(batch)
        assert set(out) == {"loss", "ce", "kd"}
        torch.testing.assert_close(out["loss"], out["ce"] + 0.1 * out["kd"])
        first = float(out["loss"].detach()) if first is None else first
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert float(model.losses(batch)["loss"].detach()) < 0.5 * first


@pytest.mark.parametrize("backend", [CPP])
def test_fused_backend_matches_torch(backend: str) -> None:
    batch = train_batch()
    results = []
    for name in (backend, "torch"):
        model = make_model(seed=3, backend=name)
        for p in model.parameters():  # larger than the default init so every part matters
            torch.nn.init.normal_(p, std=0.3)
        out = model.losses(batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, grads))
    (fused, fused_grads), (ref, ref_grads) = results
    for key in ("loss", "ce", "kd"):
        torch.testing.assert_close(fused[key], ref[key], atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_alpha_one_is_the_short_tower_and_sasrec() -> None:
    model = make_model(alpha=1.0).eval()
    batch = eval_batch()
    with torch.no_grad():
        vectors = model.user_vectors(batch)
        short = model.encode_short(batch.items)
        assert torch.equal(vectors, short[:, -1])
        sasrec = SASRec(SASRecConfig(num_items=NUM_ITEMS, hidden=16, layers=1, heads=2, inner=32, dropout=0.0,
                                     attn_dropout=0.0, max_len=8, backend="torch")).eval()
        missing, unexpected = sasrec.load_state_dict(model.state_dict(), strict=False)
        assert not missing and all(k.startswith("long_attention.") for k in unexpected)
        torch.testing.assert_close(sasrec.user_vectors(batch), vectors)
    # α < 1 mixes in the long tower
    model.config.alpha = 0.5
    with torch.no_grad():
        short, long = model.encode_towers(batch.items)
        torch.testing.assert_close(model.user_vectors(batch), 0.5 * short[:, -1] + 0.5 * long[:, -1])
        assert not torch.allclose(long, short)


@pytest.mark.parametrize("length", [1, 3, 10])
def test_long_queries_hand_case(length: int) -> None:
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    padding = torch.tensor([[True, True, False, False, False],
                            [False, False, False, False, False],
                            [True, True, True, True, False]])
    got = long_queries(states, padding, length)
    for b in range(3):
        for t in range(5):
            if padding[b, t]:
                continue
            valid = [u for u in range(t + 1) if not padding[b, u]][-length:]
            expected = torch.stack([states[b, u] for u in valid]).mean(0)
            torch.testing.assert_close(got[b, t], expected, msg=lambda m: f"b={b} t={t}: {m}")
    # L larger than the valid positions so far: the mean of all of them
    if length == 10:
        torch.testing.assert_close(got[0, 4], states[0, 2:5].mean(0))
        torch.testing.assert_close(got[2, 4], states[2, 4])


@pytest.mark.parametrize("backend", ["torch", CPP])
def test_kd_loss_matches_dense_float64(backend: str) -> None:
    tau = 0.5
    model = make_model(backend=backend, tau=tau, kd_weight=0.3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    # Dense teacher by hand from the same next-item transitions (padding skipped).
    counts = np.zeros((NUM_ITEMS + 1, NUM_ITEMS + 1))
    for seq in SEQUENCES:
        for a, b in zip(seq[:-1], seq[1:]):
            if a and b:
                counts[a, b] += 1
    counts = torch.from_numpy(counts[1:, 1:])
    ratio = counts / counts.max(dim=1, keepdim=True).values.clamp_min(1.0)
    teacher = torch.softmax(ratio / tau, dim=1)  # rows without successors: uniform
    torch.testing.assert_close(model.teacher.to_dense(NUM_ITEMS), teacher, atol=1e-6, rtol=1e-5)

    batch = train_batch()
    mask = (batch.items != 0) & (batch.targets != 0)
    inputs = batch.items[mask]
    table = model.item_embedding.weight.detach().double()
    student = torch.log_softmax(table[inputs] @ table[1:].T / tau, dim=1)
    expected = -(teacher[inputs - 1] * student).sum(1).mean()

    out = model.losses(batch)
    torch.testing.assert_close(out["kd"].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], out["ce"] + 0.3 * out["kd"])
    # the gradient of kd reaches the item table
    model.zero_grad()
    out["kd"].backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", CPP])
def test_small_tau_trains(backend: str) -> None:
    """τ = 1e-3 (issue 15): the teacher overflowed to NaN and the first step stopped on its row sums."""
    model = make_model(tau=1e-3, backend=backend)
    assert torch.isfinite(model.teacher.to_dense(NUM_ITEMS)).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        out = model.losses(train_batch())
        assert all(bool(torch.isfinite(v)) for v in out.values())
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        optimizer.step()


def test_teacher_from_csr_equals_list() -> None:
    model = make_model()
    flat = [np.array([i for i in s if i]) for s in SEQUENCES]
    indptr = np.cumsum([0] + [len(s) for s in flat])
    csr = SimpleNamespace(indptr=indptr, items=np.concatenate(flat))
    a, b = model.teacher, model.set_teacher(csr)
    torch.testing.assert_close(a.to_dense(NUM_ITEMS), b.to_dense(NUM_ITEMS))
    with pytest.raises(ValueError, match="outside"):
        model.set_teacher([[1, NUM_ITEMS + 1]])


@pytest.mark.parametrize("field, value", [("long_query_len", 0), ("long_query_len", 1.5), ("alpha", 1.5),
                                          ("alpha", -0.1), ("tau", 0.0), ("tau", float("inf")),
                                          ("tau", float("nan")), ("tau", -1e-3),
                                          ("kd_weight", -1.0), ("kd_weight", float("nan"))])
def test_bad_config_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


def test_missing_teacher() -> None:
    torch.manual_seed(0)
    model = MQSATED(config())
    with pytest.raises(ValueError, match="set_teacher"):
        model.losses(train_batch())
    # kd_weight = 0: no teacher needed, kd reported as 0
    model = MQSATED(config(kd_weight=0.0))
    out = model.losses(train_batch())
    assert float(out["kd"]) == 0.0 and torch.equal(out["loss"], out["ce"])
    with pytest.raises(TypeError):
        MQSATED(SASRecConfig(num_items=NUM_ITEMS))  # type: ignore[arg-type]
