"""No host sync in a training step (issue 16, item 2).

A training step of every model — forward, loss, backward, optimizer step — must read no tensor
value on the host when its tensors live on a device. Without a GPU this is proved on the meta
device: a meta tensor has no data, so any host read of one (`.item()`, `bool(t)`, `int(t)`,
`.tolist()`, a data-dependent shape such as boolean-mask indexing, `nonzero`,
`repeat_interleave` without `output_size`, `unique`, `coalesce`) raises. Each model is built on
the CPU (its init draws values), moved to "meta" and trained one step on a meta batch with
backend="torch" (the fused backends are CPU or CUDA only). Pareto-weighted AutoCDSR needs its
small multi-task solve on the host: the test checks that the solve's single host read is the
only one (it is replaced by a stub returning CPU values). Also: sampled negatives never equal
their target and are uniform over the other items.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import pytest
import torch

from fastattn.data.batch import TrainBatch
from fastattn.functional import full_item_cross_entropy, topk_items
from fastattn.models import (DIFSR, MAN, MQSATED, BERT4Rec, BERT4RecConfig, SASRec, DIFSRConfig, MANConfig,
                             MQSATEDConfig, SASRecConfig)
from fastattn.models.autocdsr import AutoCDSR, AutoCDSRConfig, _ACDRecommender
from fastattn.models.autocdsr_plus import AutoCDSRPlus, AutoCDSRPlusConfig
from fastattn.models.blocks import check_range
from fastattn.models.mqsa_ted import ted_teacher
from fastattn.ops.cross_entropy.chunked import ChunkedCrossEntropyKernels

NUM_ITEMS = 12
ATTRIBUTE_SIZES = (5, 3)
B, L = 3, 6
COMMON = dict(num_items=NUM_ITEMS, hidden=8, layers=1, heads=2, inner=16, max_len=8, backend="torch")


def _sasrec(loss: str) -> Callable[[dict[str, Any]], torch.nn.Module]:
    return lambda c: SASRec(SASRecConfig(**c, loss=loss))


def _mqsa(c: dict[str, Any]) -> torch.nn.Module:
    model = MQSATED(MQSATEDConfig(**c, kd_weight=0.5))
    model.set_teacher([[1, 2, 3, 4], [2, 3, 5], [7, 8, 1, 2, 3]])
    return model


BUILDERS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "sasrec_ce": _sasrec("ce"),
    "sasrec_bce": _sasrec("bce"),
    "sasrec_inbatch": _sasrec("inbatch"),
    "bert4rec_ce": lambda c: BERT4Rec(BERT4RecConfig(**c, loss="ce")),
    "bert4rec_inbatch": lambda c: BERT4Rec(BERT4RecConfig(**c, loss="inbatch")),
    "difsr": lambda c: DIFSR(DIFSRConfig(**c, attribute_sizes=ATTRIBUTE_SIZES, attribute_dim=4)),
    "mqsa_ted": _mqsa,
    "man": lambda c: MAN(MANConfig(**c, num_domains=2, num_prototypes=2, num_negatives=5)),
    "autocdsr_fixed": lambda c: AutoCDSR(AutoCDSRConfig(**c, num_domains=2, acd_mode="fixed", acd_weight=0.3)),
    "autocdsr_plus_fixed": lambda c: AutoCDSRPlus(AutoCDSRPlusConfig(
        **c, num_domains=2, acd_mode="fixed", acd_weight=0.3, num_ib_tokens=2, domain_layers=1, shared_layers=1)),
}
PARETO: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "autocdsr_pareto": lambda c: AutoCDSR(AutoCDSRConfig(**c, num_domains=2, acd_mode="pareto")),
    "autocdsr_plus_pareto": lambda c: AutoCDSRPlus(AutoCDSRPlusConfig(
        **c, num_domains=2, acd_mode="pareto", num_ib_tokens=2, domain_layers=1, shared_layers=1)),
}


def meta_batch() -> TrainBatch:
    """A batch with every field a model may read, all on the meta device (shapes only)."""
    def ids(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int64, device="meta")

    return TrainBatch(items=ids(B, L), targets=ids(B, L), attributes=(ids(B, L, 2), ids(B, L, 1)),
                      target_attributes=(ids(B, L, 2), ids(B, L, 1)), domains=ids(B, L), target_domains=ids(B, L))


def meta_step(build: Callable[[dict[str, Any]], torch.nn.Module], dropout: float) -> torch.nn.Module:
    """Build on the CPU, move to meta, run losses → backward → Adam step; return the model."""
    torch.manual_seed(0)
    model = build({**COMMON, "dropout": dropout, "attn_dropout": dropout}).to("meta").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = model.losses(meta_batch())
    assert losses["loss"].device.type == "meta" and losses["loss"].shape == ()
    losses["loss"].backward()
    optimizer.step()
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_training_step_reads_no_tensor_value(name: str, dropout: float) -> None:
    meta_step(BUILDERS[name], dropout)


@pytest.mark.parametrize("name", sorted(PARETO))
def test_pareto_step_reads_only_the_solver_inputs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def host_values(self: Any, packed: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(packed.shape))  # the one host read of a Pareto step: Gram matrix, losses, step
        return torch.tensor([1.0, 0.3, 2.0, 0.5, 3.0, 0.0], dtype=torch.float64)

    monkeypatch.setattr(_ACDRecommender, "_to_host", host_values)
    model = meta_step(PARETO[name], 0.0)
    assert calls == [(6,)]
    assert model.pareto_steps.device.type == "meta"


def test_chunked_cross_entropy_backward_reads_no_tensor_value() -> None:
    n, v, d = 5, NUM_ITEMS, 8
    rows, meta = torch.empty(n, device="meta"), torch.device("meta")
    ChunkedCrossEntropyKernels.backward(torch.empty(n, d, device=meta), torch.empty(v, d, device=meta), None, 1.0,
                                        rows, rows, rows, torch.empty(n, dtype=torch.int64, device=meta), rows)


def test_functional_calls_read_no_tensor_value() -> None:
    """The public functions' value checks run on CPU tensors only: on meta they are skipped."""
    hidden = torch.empty(5, 8, device="meta", requires_grad=True)
    weight = torch.empty(NUM_ITEMS, 8, device="meta", requires_grad=True)
    target = torch.empty(5, dtype=torch.int64, device="meta")
    for smoothing in (0.0, 0.1):
        full_item_cross_entropy(hidden, weight, target, label_smoothing=smoothing, backend="torch").backward()
    teacher = ted_teacher([[0, 1, 2, 3], [1, 2, 4]], NUM_ITEMS, 0.5)
    soft = teacher.to("meta").rows(torch.empty(5, dtype=torch.int64, device="meta"), width=2)
    full_item_cross_entropy(hidden, weight, soft, temperature=0.5, backend="torch").backward()
    # top-k (evaluation): the exclude check and the chunked selection read nothing either.
    exclude = torch.empty(5, 3, dtype=torch.int64, device="meta")
    scores, index = topk_items(hidden.detach(), weight.detach(), 4, exclude=exclude, backend="torch")
    assert scores.shape == index.shape == (5, 4)


# ---------------------------------------------------------------- sampled negatives
def _negative_samplers() -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    torch.manual_seed(0)
    sasrec = SASRec(SASRecConfig(**{**COMMON, "num_items": 7}, loss="bce"))
    man = MAN(MANConfig(**{**COMMON, "num_items": 7}, num_negatives=4))
    return [("sasrec", lambda t: sasrec.sample_negatives(t)[:, None]), ("man", man.sample_negatives)]


@pytest.mark.parametrize("index", [0, 1])
def test_negatives_skip_the_target_uniformly_without_a_host_read(index: int) -> None:
    """Every negative differs from its target and is uniform over the other items (chi-square over
    the (target, negative) counts of a large seeded draw); drawing reads nothing on the host."""
    name, sample = _negative_samplers()[index]
    n, per_target = 7, 6000
    targets = torch.arange(1, n + 1).repeat_interleave(per_target)
    torch.manual_seed(123)
    drawn = sample(targets)  # (N, M)
    assert drawn.shape[0] == targets.shape[0] and drawn.dtype == torch.int64
    assert bool((drawn >= 1).all()) and bool((drawn <= n).all()), name
    assert not bool((drawn == targets[:, None]).any()), name
    counts = torch.zeros(n + 1, n + 1)
    counts.index_put_((targets[:, None].expand_as(drawn).reshape(-1), drawn.reshape(-1)), torch.ones(drawn.numel()),
                      accumulate=True)
    counts = counts[1:, 1:]
    assert not bool(counts.diagonal().any())
    expected = drawn.shape[1] * per_target / (n - 1)  # per (target, other item)
    off = ~torch.eye(n, dtype=torch.bool)
    chi2 = float(((counts[off] - expected) ** 2 / expected).sum())
    dof = n * (n - 2)  # n targets, n − 1 cells each, one constraint per target
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (name, chi2, dof)  # ≈ 6 standard deviations
    sample(torch.empty(5, dtype=torch.int64, device="meta"))  # no redraw loop: nothing read on the host


# ---------------------------------------------------------------- fixed-width teacher rows
def test_soft_target_rows_at_a_fixed_width_equal_the_exact_rows() -> None:
    teacher = ted_teacher([[0, 1, 2, 3, 1, 4], [1, 2, 4, 0], [3, 3, 1]], 6, 0.5)
    width = teacher.max_row_nnz()
    assert width == int((teacher.indptr[1:] - teacher.indptr[:-1]).max())
    index = torch.tensor([[4, 1], [0, 5], [1, 3]])
    for w in (width, width + 3):
        padded = teacher.rows(index, width=w)
        assert padded.indices.shape == (6 * w,) and torch.equal(padded.indptr, torch.arange(7) * w)
        torch.testing.assert_close(padded.to_dense(6), teacher.rows(index).to_dense(6), atol=0, rtol=0)
    with pytest.raises(ValueError, match=f"more than width={width - 1} entries"):
        teacher.rows(index, width=width - 1)
    with pytest.raises(IndexError, match=r"SoftTarget.rows: row_index holds 6, outside \[0, 6\)"):
        teacher.rows(torch.tensor([1, 6]), width=width)
    with pytest.raises(ValueError, match="width must be an int >= 0"):
        teacher.rows(index, width=-1)
    assert teacher.rows(torch.zeros(0, dtype=torch.int64), width=width).num_rows == 0


# ---------------------------------------------------------------- value checks where they are free
def test_id_checks_still_raise_on_cpu_and_read_nothing_on_meta() -> None:
    check_range(torch.tensor([0, 3, 4]), 0, 5, "unused")
    with pytest.raises(ValueError, match="ids out of range"):
        check_range(torch.tensor([0, 5]), 0, 5, "ids out of range")
    check_range(torch.full((3,), 99, device="meta"), 0, 5, "never checked on meta")
    good = TrainBatch(items=torch.tensor([[0, 1, 2]]), targets=torch.tensor([[0, 2, 3]]),
                      attributes=(torch.ones(1, 3, 2, dtype=torch.int64), torch.ones(1, 3, 1, dtype=torch.int64)),
                      target_attributes=(torch.ones(1, 3, 2, dtype=torch.int64),
                                         torch.ones(1, 3, 1, dtype=torch.int64)),
                      domains=torch.zeros(1, 3, dtype=torch.int64), target_domains=torch.zeros(1, 3, dtype=torch.int64))
    bad = {"batch.items holds ids outside": dict(items=torch.tensor([[0, 1, NUM_ITEMS + 1]])),
           "batch.targets holds ids outside": dict(targets=torch.tensor([[0, -1, 3]])),
           r"batch.attributes\[1\] holds ids outside": dict(attributes=(good.attributes[0], torch.full((1, 3, 1), 3))),
           "batch.domains holds domain ids outside": dict(domains=torch.tensor([[0, 2, 0]]))}
    torch.manual_seed(0)
    models = {"difsr": BUILDERS["difsr"](COMMON), "man": BUILDERS["man"](COMMON),
              "autocdsr": BUILDERS["autocdsr_fixed"](COMMON)}
    for message, change in bad.items():
        name = "difsr" if "attributes" in message else "man" if "domains" in message else "autocdsr"
        with pytest.raises(ValueError, match=message):
            models[name].losses(replace(good, **change))
    with pytest.raises(ValueError, match=r"batch.domains holds ids outside \[0, 2\)"):
        models["autocdsr"].losses(replace(good, domains=torch.tensor([[0, 2, 0]])))


def test_training_loop_reads_the_losses_every_few_steps(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop keeps the running losses on the device and reads them (a sync on a GPU) every
    HOST_READ_EVERY steps and once at the end of the epoch, not after every step."""
    from fastattn import train as training
    from fastattn.__main__ import main

    reads: list[int] = []
    original = training._read_sums
    monkeypatch.setattr(training, "_read_sums", lambda sums: reads.append(1) or original(sums))
    steps: list[int] = []
    original_steps = training.num_train_batches
    monkeypatch.setattr(training, "num_train_batches", lambda *a, **k: steps.append(original_steps(*a, **k)) or steps[-1])
    code = main(["train", "--model", "sasrec", "--data", "synthetic:num_users=300", "--epochs", "1",
                 "--batch-size", "64", "--hidden", "16", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    assert steps and steps[0] > training.HOST_READ_EVERY  # the case is long enough to tell
    assert len(reads) == steps[0] // training.HOST_READ_EVERY + 1
