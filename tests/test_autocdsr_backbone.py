"""AutoCDSR / AutoCDSR+ backbones (issue 20, item 2) and their item-loss choice (item 3).

The bidirectional AutoCDSR+: its IB states read the history (perturbation) and an item of another
domain reaches a domain encoder only through the IB tokens (with the IB exchange cut, nothing
moves); a [MASK]'s domain id is never read. The bidirectional loss reads the masked positions
only; predictions read an appended [MASK]; torch and C++ backends agree on the losses and
gradients of every backbone × model × loss; no host read on the meta device; a compiled step equals
the eager one; the causal default is today's model; tiny `python -m fastattn train` runs of every
new path finish with a falling loss; a bad --backbone is one line naming it. Tiny shapes only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fastattn.__main__ import main
from fastattn.data import SyntheticConfig, make_synthetic
from fastattn.data.batch import EvalBatch, TrainBatch
from fastattn.data.batching import train_batches
from fastattn.models.autocdsr import AutoCDSR, AutoCDSRConfig
from fastattn.models.autocdsr_plus import AutoCDSRPlus, AutoCDSRPlusConfig
from fastattn.models.blocks import cloze_sequences, in_batch_softmax_loss

from cpp_required import cpp_tests_mark
from test_no_host_sync import meta_step

NUM_ITEMS = 30
KINDS = ["autocdsr", "plus"]
BACKBONES = ["causal", "bidirectional"]
LOSSES = ["ce", "inbatch"]
SYN = "synthetic:num_users=80,num_items=40,min_len=3,max_len=8,seed=5"

Model = AutoCDSR | AutoCDSRPlus


def make_model(kind: str, seed: int = 0, std: float = 0.0, **overrides: Any) -> Model:
    """A tiny model without dropout; std > 0 re-draws every non-norm parameter (varied attention)."""
    fields: dict[str, Any] = dict(num_items=NUM_ITEMS, num_domains=2, hidden=16, layers=1, heads=2, inner=32,
                                  dropout=0.0, attn_dropout=0.0, max_len=10, backend="torch")
    if kind == "plus":
        fields.update(num_ib_tokens=3, domain_layers=2, shared_layers=1)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = AutoCDSRPlus(AutoCDSRPlusConfig(**fields)) if kind == "plus" else AutoCDSR(AutoCDSRConfig(**fields))
    if std > 0:
        for name, p in model.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(p, std=std)
    return model


def synthetic_batch(rows: int = 8) -> TrainBatch:
    ds = make_synthetic(SyntheticConfig(num_users=40, num_items=NUM_ITEMS, num_attributes=5, num_tags=6,
                                        min_len=3, max_len=10, seed=0))
    batch = next(train_batches(ds, rows, 10, shuffle=False))
    assert batch.domains is not None and batch.target_domains is not None
    return batch


# A hand-made history: two left-padded rows over both domains, and [MASK]ed slots (id NUM_ITEMS + 1).
MASK = NUM_ITEMS + 1
ITEMS = torch.tensor([[0, 3, 4, MASK, 6, 7, 8, MASK], [1, 2, 9, 10, MASK, 12, 13, 14]])
DOMAINS = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1, 0, 0]])


def perturbed(domain: int, items: torch.Tensor = ITEMS) -> torch.Tensor:
    """items with new ids at the real items of `domain` ([MASK] and padding kept)."""
    slots = (DOMAINS == domain) & (items != 0) & (items != MASK)
    return torch.where(slots, (items + 7) % NUM_ITEMS + 1, items)


# ---------------------------------------------------------------- the bidirectional AutoCDSR+ IB tokens
def test_ib_states_read_the_history_only_when_bidirectional() -> None:
    for backbone in BACKBONES:
        model = make_model("plus", seed=4, std=0.3, backbone=backbone).double().eval()
        items = ITEMS if backbone == "bidirectional" else ITEMS.masked_fill(ITEMS == MASK, 5)
        with torch.no_grad():
            ib, _ = model.encode(items, DOMAINS, stage="ib")
            assert ib.shape == (2, 3, 16)
            for domain in (0, 1):
                other, _ = model.encode(perturbed(domain, items), DOMAINS, stage="ib")
                if backbone == "bidirectional":  # every domain's items reach the IB states (of every row)
                    assert (other - ib).abs().amax(dim=(1, 2)).min() > 1e-4, domain
                else:  # the causal mask keeps them on the IB tokens only (the documented limitation)
                    torch.testing.assert_close(other, ib, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cut", [False, True])
def test_other_domains_reach_a_domain_encoder_only_through_the_ib_tokens(cut: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("plus", seed=4, std=0.3, backbone="bidirectional").double().eval()
    if cut:  # each domain encoder keeps its own IB states: no path between the domains is left
        monkeypatch.setattr(model, "_exchange_ib", lambda ib_states: ib_states)
    for mine, other in ((0, 1), (1, 0)):
        rows = (DOMAINS == mine) & (ITEMS != 0) & (ITEMS != MASK)  # a [MASK] merges every encoder
        with torch.no_grad():
            before, _ = model.encode(ITEMS, DOMAINS, stage="domain")
            after, _ = model.encode(perturbed(other), DOMAINS, stage="domain")
            ib_before, _ = model.encode(ITEMS, DOMAINS, stage="ib")  # with the cut: encoder 0's own
            ib_after, _ = model.encode(perturbed(other), DOMAINS, stage="ib")
        moved = (after[rows] - before[rows]).abs().amax()
        if cut:
            assert float(moved) <= 1e-12, (mine, float(moved))
            if mine == 0:
                torch.testing.assert_close(ib_after, ib_before, atol=1e-12, rtol=0)
        else:
            assert float(moved) > 1e-4, (mine, float(moved))  # the IB exchange is a live path
        own_slots = (DOMAINS == other) & (ITEMS != 0) & (ITEMS != MASK)
        assert (after[own_slots] - before[own_slots]).abs().amax() > 1e-4  # the perturbed items do move


@pytest.mark.parametrize("kind", KINDS)
def test_the_domain_of_a_masked_item_is_never_read(kind: str) -> None:
    """A [MASK] hides its item and its domain: flipping the domain id at [MASK] slots changes no
    state (AutoCDSR reads domains in a_cd only; AutoCDSR+ puts a [MASK] in every domain encoder)."""
    model = make_model(kind, seed=2, std=0.3, backbone="bidirectional").double().eval()
    flipped = torch.where(ITEMS == MASK, 1 - DOMAINS, DOMAINS)
    with torch.no_grad():
        hidden, acd = model.encode(ITEMS, DOMAINS)
        hidden_flipped, acd_flipped = model.encode(ITEMS, flipped)
    torch.testing.assert_close(hidden_flipped, hidden, atol=1e-12, rtol=0)
    if kind == "plus":  # the a_cd of AutoCDSR+ is the mass on the IB tokens: no domain id of a [MASK] in it
        torch.testing.assert_close(acd_flipped, acd, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- the bidirectional loss
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_loss_reads_the_masked_positions_only(kind: str, loss: str) -> None:
    batch = synthetic_batch()
    model = make_model(kind, seed=1, std=0.2, backbone="bidirectional", loss=loss, tau=0.3).double()
    torch.manual_seed(7)
    rec = model.loss_terms(batch)["rec"]
    torch.manual_seed(7)  # the same Cloze draw
    items, domains, targets = model.training_inputs(batch)
    masked = targets != 0
    assert torch.equal(masked, items == model.mask_id) and bool(masked.any(dim=1).all())
    assert batch.items.shape[1] + 1 <= model.config.max_len  # nothing dropped: the domains line up below
    assert torch.equal(torch.where(masked, targets, items), cloze_sequences(batch, model.config.max_len))
    assert torch.equal(domains, torch.cat([batch.domains, batch.target_domains[:, -1:]], dim=1))
    hidden, _ = model.encode(items, domains)
    table = model.item_embedding.weight
    assert table.shape[0] == NUM_ITEMS + 2  # the [MASK] row
    rows, wanted = hidden[masked], targets[masked]
    if loss == "ce":  # dense float64 cross-entropy over the catalog (the [MASK] row is no class)
        reference = torch.nn.functional.cross_entropy(rows @ table[1:NUM_ITEMS + 1].T, wanted - 1)
    else:
        reference = in_batch_softmax_loss(rows, wanted, table[:NUM_ITEMS + 1], 0.3)
    torch.testing.assert_close(rec, reference, atol=1e-10, rtol=1e-10)
    grad, = torch.autograd.grad(model.item_loss(hidden, targets), hidden)
    assert bool((grad[~masked] == 0).all()) and bool((grad[masked] != 0).any())


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_prediction_reads_an_appended_mask(kind: str) -> None:
    model = make_model(kind, seed=3, std=0.2, backbone="bidirectional", max_len=8).eval()
    history = ITEMS.masked_fill(ITEMS == MASK, 5)  # a full row (max_len 8): its oldest item makes room
    batch = EvalBatch(items=history, target=torch.ones(2, dtype=torch.int64), exclude=history.clone(),
                      domains=DOMAINS)
    with torch.no_grad():
        vectors = model.user_vectors(batch)
        for last_domain in (0, 1):  # the appended [MASK]'s domain id is not read
            seq = torch.cat([history, torch.full((2, 1), MASK)], 1)[:, 1:]
            doms = torch.cat([DOMAINS, torch.full((2, 1), last_domain)], 1)[:, 1:]
            torch.testing.assert_close(vectors, model.encode(seq, doms)[0][:, -1], atol=1e-6, rtol=0)
    weight, bias = model.item_table()
    assert bias is None and weight.shape == (NUM_ITEMS + 1, 16)  # no [MASK] row: never ranked


# ---------------------------------------------------------------- backends
def _losses_and_grads(model: Model, batch: TrainBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(3)  # the same masks for both backends
    out = model.losses(batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=cpp_tests_mark())])
def test_fused_backend_matches_torch(backend: str, kind: str, backbone: str, loss: str) -> None:
    batch = synthetic_batch(rows=6)
    (fused, fused_grads), (ref, ref_grads) = (
        _losses_and_grads(make_model(kind, seed=3, std=0.3, backend=name, backbone=backbone, loss=loss).double(),
                          batch) for name in (backend, "torch"))
    assert float(ref["acd"]) > 0.01
    for key in ("loss", "rec", "acd", "w_acd"):
        torch.testing.assert_close(fused[key], ref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    assert fused_grads.keys() == ref_grads.keys()
    assert len(ref_grads) == len(fused_grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_step_reads_no_tensor_value(kind: str, loss: str) -> None:
    """On the meta device (no data) a host read raises: the Cloze draw and the domain masks need none."""
    def build(common: dict[str, Any]) -> torch.nn.Module:
        options = dict(common, num_domains=2, acd_mode="fixed", backbone="bidirectional", loss=loss)
        if kind == "plus":
            return AutoCDSRPlus(AutoCDSRPlusConfig(**options, num_ib_tokens=2, domain_layers=1, shared_layers=1))
        return AutoCDSR(AutoCDSRConfig(**options))

    meta_step(build, 0.3)


@cpp_tests_mark()  # the compared pair runs backend="auto": the C++ kernels
@pytest.mark.parametrize("kind,loss", [("autocdsr", "ce"), ("plus", "inbatch")])
def test_compiled_bidirectional_step_equals_eager(kind: str, loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile: the Cloze draw, the bidirectional encoders and both task losses trace into one
    graph, and compiled steps (Pareto weights) give the eager losses, gradients and parameters."""
    import test_compile_step  # here, not at the top: it imports torch._dynamo and other test modules

    def build(common: dict[str, Any]) -> torch.nn.Module:
        options = dict(common, num_domains=2, acd_mode="pareto", backbone="bidirectional", loss=loss)
        if kind == "plus":
            return AutoCDSRPlus(AutoCDSRPlusConfig(**options, num_ib_tokens=2, domain_layers=1, shared_layers=1))
        return AutoCDSR(AutoCDSRConfig(**options))

    monkeypatch.setitem(test_compile_step.MODELS, "bidirectional", build)
    test_compile_step._check_step("bidirectional", "aot_eager")


# ---------------------------------------------------------------- the causal default
@pytest.mark.parametrize("kind", KINDS)
def test_causal_is_the_default_and_reads_no_cloze_option(kind: str) -> None:
    batch = synthetic_batch(rows=4)
    default = make_model(kind, seed=0)
    assert (default.config.backbone, default.config.loss) == ("causal", "ce")
    assert default.item_embedding.weight.shape[0] == NUM_ITEMS + 1  # no [MASK] row
    results = []
    for model in (default, make_model(kind, seed=0, backbone="causal", mask_prob=0.6)):
        out = model.losses(batch)
        out["loss"].backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    for key in ("loss", "rec", "acd"):
        assert torch.equal(results[0][0][key], results[1][0][key]), key
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name
    assert default.item_table()[0] is default.item_embedding.weight


# ---------------------------------------------------------------- the command line
def _train(out: Path, model: str, *extra: str) -> dict[str, Any]:
    args = ["train", "--model", model, "--data", SYN, "--out", str(out), "--hidden", "16", "--layers", "1",
            "--heads", "2", "--inner", "32", "--dropout", "0.1", "--attn-dropout", "0.1", "--max-len", "8",
            "--batch-size", "128", "--lr", "0.01", "--epochs", "5", "--patience", "5", "--no-progress", *extra]
    if model == "autocdsr_plus":
        args += ["--num-ib-tokens", "2", "--domain-layers", "1", "--shared-layers", "1"]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


NEW_PATHS = [(model, backbone, loss) for model in ("autocdsr", "autocdsr_plus") for backbone in BACKBONES
             for loss in LOSSES if (backbone, loss) != ("causal", "ce")]


@pytest.mark.parametrize("model,backbone,loss", NEW_PATHS, ids=["-".join(p) for p in NEW_PATHS])
def test_cli_trains_every_new_path(tmp_path: Path, model: str, backbone: str, loss: str) -> None:
    # a higher mask rate than the default: more Cloze targets per epoch, a clearer fall in 5 epochs
    metrics = _train(tmp_path / "run", model, "--backbone", backbone, "--loss", loss, "--tau", "0.2",
                     "--mask-prob", "0.4")
    options = metrics["config"]["model_options"]
    assert (options["backbone"], options["loss"], options["tau"], options["mask_prob"]) == (backbone, loss, 0.2, 0.4)
    rec = [h["rec"] for h in metrics["history"]]
    assert len(rec) == 5 and all(math.isfinite(r) for r in rec) and rec[-1] < rec[0], rec
    for split in ("valid", "test"):
        assert 0.0 <= metrics[split]["NDCG@10"] <= 1.0


def test_cli_bad_backbone_is_one_line_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for model, value in (("autocdsr", "sideways"), ("autocdsr_plus", "Bidirectional"), ("sasrec", "bidirectional")):
        assert main(["train", "--model", model, "--data", SYN, "--out", str(tmp_path / "run"),
                     "--backbone", value, "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--backbone" in lines[0], lines
        assert not (tmp_path / "run").exists()
