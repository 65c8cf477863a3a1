"""BERT4Rec (issue 20, item 1) and the in-batch contrastive loss (item 3) for BERT4Rec and SASRec.

The Cloze draw (rate, at least one per row, never padding, uniform fallback, determinism per
seed), the training sequence, the loss against a hand-written float64 BERT4Rec, no information
from a hidden item reaching its own prediction, the in-batch loss and its gradients against a
dense float64 reference, torch vs C++ backends, prediction with an appended [MASK], and tiny
`python -m fastattn train` runs (every evaluation protocol, resume). Tiny shapes only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import fastattn.train as training
from fastattn.__main__ import main
from fastattn.data.batch import EvalBatch, TrainBatch
from fastattn.models import BERT4Rec, BERT4RecConfig, SASRec, SASRecConfig, SequentialRecommender
from fastattn.models.bert4rec import cloze_sequences
from fastattn.models.blocks import cloze_positions, in_batch_softmax_loss

from cpp_required import cpp_tests_mark

NUM_ITEMS = 30
SYN = "synthetic:num_users=150,num_items=120,min_len=4,max_len=12,seed=4"  # > 101 items: --sampled-eval works


def bert4rec(backend: str = "torch", loss: str = "ce", dropout: float = 0.0, max_len: int = 10,
             **kwargs: Any) -> BERT4Rec:
    config = BERT4RecConfig(num_items=NUM_ITEMS, hidden=16, heads=2, inner=32, dropout=dropout,
                            attn_dropout=dropout, max_len=max_len, loss=loss, backend=backend, **kwargs)
    return BERT4Rec(config)


def sasrec(backend: str = "torch", loss: str = "inbatch", **kwargs: Any) -> SASRec:
    return SASRec(SASRecConfig(num_items=NUM_ITEMS, hidden=16, heads=2, inner=32, dropout=0.0, attn_dropout=0.0,
                               max_len=10, loss=loss, backend=backend, **kwargs))


def batch_from(seq: torch.Tensor) -> TrainBatch:
    """The next-item batch of left-padded sequences seq (B, L+1): items = seq[:, :-1], targets = seq[:, 1:]
    where an input item exists (what `fastattn.data.train_batches` builds)."""
    items, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    return TrainBatch(items, targets * (items != 0))


def sequences(rows: int = 4, length: int = 8, lengths: tuple[int, ...] = (8, 5, 2, 7), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, NUM_ITEMS + 1, (rows, length), generator=g)
    return seq * (torch.arange(length)[None, :] >= length - torch.tensor(lengths)[:, None])


# ---------------------------------------------------------------- the Cloze draw
@pytest.mark.parametrize("prob", [0.2, 0.5])
def test_cloze_rate_at_least_one_and_never_padding(prob: float) -> None:
    rows, length = 3000, 40
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, length + 1, (rows,), generator=g)
    lengths[:40] = length  # some full rows, some single-item and empty rows
    lengths[40:80], lengths[80:120] = 1, 0
    real = torch.arange(length)[None, :] >= length - lengths[:, None]
    torch.manual_seed(0)
    hidden = cloze_positions(real, prob)
    assert hidden.dtype == torch.bool and hidden.shape == real.shape
    assert not bool((hidden & ~real).any())  # padding never hidden
    per_row = hidden.sum(1)
    assert bool((per_row[lengths > 0] >= 1).all()) and bool((per_row[lengths == 0] == 0).all())
    assert bool((hidden[40:80, -1]).all())  # a single item is always the one hidden
    # rows of >= 30 items: the forced extra mask has probability (1 - p)^30 < 1e-3; the rate is
    # binomial with n = their real positions, held to 5 standard deviations
    long = lengths >= 30
    n = int(real[long].sum())
    rate = float(hidden[long].sum()) / n
    assert abs(rate - prob) < 5 * math.sqrt(prob * (1 - prob) / n) + (1 - prob) ** 30, (rate, prob)


def test_cloze_fallback_is_uniform_over_real_positions() -> None:
    """With a tiny prob almost every row falls back to one forced position: uniform over its 4 real
    items (chi-square), never a padded slot."""
    rows = 8000
    real = torch.zeros(rows, 6, dtype=torch.bool)
    real[:, 2:] = True
    torch.manual_seed(3)
    hidden = cloze_positions(real, 1e-6)
    assert bool((hidden.sum(1) == 1).all())
    counts = hidden[:, 2:].sum(0).double()
    expected = rows / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 3 + 6 * math.sqrt(6), counts.tolist()  # 3 degrees of freedom, about 6 standard deviations


def test_cloze_is_deterministic_per_seed_and_consistent() -> None:
    model = bert4rec()
    batch = batch_from(sequences(rows=6, length=10, lengths=(10, 3, 1, 9, 6, 10)))
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(model.cloze(batch))
    (inputs, targets), (inputs2, targets2), (inputs3, _) = draws
    assert torch.equal(inputs, inputs2) and torch.equal(targets, targets2)
    assert not torch.equal(inputs, inputs3)  # another seed, other masks (38 real positions)
    assert not torch.equal(model.cloze(batch)[0], model.cloze(batch)[0])  # the stream moves on: fresh masks
    seq = cloze_sequences(batch, model.config.max_len)
    hidden = inputs == model.mask_id
    assert torch.equal(targets != 0, hidden)  # a target exactly where [MASK] was put
    assert torch.equal(targets[hidden], seq[hidden]) and torch.equal(inputs[~hidden], seq[~hidden])
    assert torch.equal(hidden.any(1), (seq != 0).any(1))  # >= 1 per row with an item (row 2 has none)
    assert not bool((hidden & (seq == 0)).any())


def test_cloze_sequence_appends_the_last_target_and_drops_the_oldest_at_max_len() -> None:
    seq = sequences(rows=3, length=6, lengths=(6, 4, 2))
    batch = batch_from(seq)
    assert torch.equal(cloze_sequences(batch, 10), seq)  # L + 1 = 6 <= max_len
    assert torch.equal(cloze_sequences(batch, 5), seq[:, 1:])  # the oldest column goes
    prefixes = TrainBatch(batch.items, batch.targets * (torch.arange(5) == 4))  # batch unit "prefixes"
    assert torch.equal(cloze_sequences(prefixes, 10), seq)


# ---------------------------------------------------------------- the loss against float64 references
def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def bert4rec_float64(model: BERT4Rec, inputs: torch.Tensor) -> torch.Tensor:
    """BERT4Rec's encoder written out in float64 from the model's weights, per row and head:
    embeddings + positions, then per layer bidirectional attention over the non-padding keys,
    residual + LayerNorm, GELU feed-forward, residual + LayerNorm. inputs (B, L) → (B, L, D)."""
    d = model.config.hidden
    out = torch.zeros(*inputs.shape, d, dtype=torch.float64)
    for b in range(inputs.shape[0]):
        real = [t for t in range(inputs.shape[1]) if inputs[b, t] != 0]
        pos = torch.zeros(inputs.shape[1], dtype=torch.int64)
        pos[real] = torch.arange(len(real))
        x = model.item_embedding.weight.double()[inputs[b]] + model.position_embedding.weight.double()[pos]
        x = _layer_norm(x, model.norm)
        for layer in model.layers:
            att = layer.attention
            heads, dh = att.heads, d // att.heads
            qkv = x @ att.in_proj.weight.double().t() + att.in_proj.bias.double()
            q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
            context = torch.zeros_like(x)
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)
                scores = q[:, cols] @ k[real, cols].t() / math.sqrt(dh)  # every query, the real keys
                context[:, cols] = torch.softmax(scores, dim=-1) @ v[real, cols]
            x = _layer_norm(x + context @ att.dense.weight.double().t() + att.dense.bias.double(), att.norm)
            ff = layer.feed_forward
            inner = torch.nn.functional.gelu(x @ ff.dense_1.weight.double().t() + ff.dense_1.bias.double())
            x = _layer_norm(x + inner @ ff.dense_2.weight.double().t() + ff.dense_2.bias.double(), ff.norm)
        out[b] = x
    return out


def in_batch_float64(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """The in-batch loss row by row: positive = own target, negatives = the other rows' targets that
    differ from it (0 = no target), cosine similarities / tau, mean over the rows with a target."""
    terms = []
    for n in range(targets.shape[0]):
        if targets[n] == 0:
            continue
        q = hidden[n] / hidden[n].norm()
        columns = [n] + [m for m in range(targets.shape[0]) if targets[m] != 0 and targets[m] != targets[n]]
        keys = weight[targets[columns]]
        logits = (keys / keys.norm(dim=1, keepdim=True)) @ q / tau
        terms.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(terms).mean() if terms else hidden.sum() * 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=cpp_tests_mark())])
@pytest.mark.parametrize("loss", ["ce", "inbatch"])
def test_loss_equals_float64_reference(backend: str, loss: str) -> None:
    torch.manual_seed(0)
    model = bert4rec(backend, loss, tau=0.3).double()
    for p in model.parameters():  # larger than the default init, so attention is far from uniform
        torch.nn.init.normal_(p, std=0.3)
    batch = batch_from(sequences(rows=4, length=7, lengths=(7, 4, 2, 6)))
    torch.manual_seed(11)
    got = model.losses(batch)
    torch.manual_seed(11)
    inputs, targets = model.cloze(batch)
    with torch.no_grad():
        hidden = bert4rec_float64(model, inputs)
        weight = model.item_embedding.weight.double()
        rows, flat = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if loss == "ce":
            chosen = flat != 0
            log_probs = torch.log_softmax(rows[chosen] @ weight[1:NUM_ITEMS + 1].t(), dim=-1)  # [MASK] row out
            expected = -log_probs.gather(1, (flat[chosen] - 1)[:, None]).mean()
        else:
            expected = in_batch_float64(rows, flat, weight, 0.3)
    assert set(got) == {"loss", loss} and int((targets != 0).sum()) >= 4
    torch.testing.assert_close(got["loss"], expected, atol=1e-10, rtol=1e-10)


def test_no_information_from_a_hidden_item_reaches_its_prediction() -> None:
    """Changing the original item at a hidden position changes nothing the model computes there
    (the input is [MASK] either way, and the draw ignores item ids), only the target; changing a
    visible item does change the state at the hidden position (so the check can fail)."""
    torch.manual_seed(0)
    model = bert4rec(loss="ce").double()
    seq = sequences(rows=3, length=8, lengths=(8, 6, 8), seed=2)
    torch.manual_seed(7)
    inputs, targets = model.cloze(batch_from(seq))
    b, t = [int(i) for i in (targets != 0).nonzero()[0]]
    visible = next(j for j in range(seq.shape[1]) if seq[b, j] != 0 and targets[b, j] == 0)

    def run(changed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        batch = batch_from(changed)
        loss = model.losses(batch)["loss"].detach()
        torch.manual_seed(7)
        inputs, targets = model.cloze(batch)
        return model.encode(inputs).detach(), targets, loss

    base_states, base_targets, base_loss = run(seq)
    hidden_changed = seq.clone()
    hidden_changed[b, t] = seq[b, t] % NUM_ITEMS + 1
    states, new_targets, loss = run(hidden_changed)
    assert torch.equal(states, base_states)  # bit for bit: no path from the hidden item
    assert new_targets[b, t] == hidden_changed[b, t] and loss != base_loss  # only the target moved
    visible_changed = seq.clone()
    visible_changed[b, visible] = seq[b, visible] % NUM_ITEMS + 1
    states, _, _ = run(visible_changed)
    assert not torch.allclose(states[b, t], base_states[b, t])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_batch_loss_and_gradients_match_dense_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(8, 6, generator=g, dtype=torch.float64)
    weight[0] = 0  # the padding row
    targets = torch.tensor([3, 0, 3, 5, 1, 0, 7, 5, 3])  # duplicates and rows without a target
    h, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
    loss = in_batch_softmax_loss(h, targets, w, tau=0.2)
    loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = in_batch_float64(h64, targets, w64, 0.2)
    expected.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=tol, rtol=tol)
    assert bool((h.grad[targets == 0] == 0).all()) and bool((w.grad[0] == 0).all())  # left-out rows: exactly 0
    # a duplicate is no negative: the loss of a row whose other columns all share its target is 0
    alone = in_batch_softmax_loss(hidden[:3], torch.tensor([2, 2, 0]), weight, tau=0.2)
    assert float(alone) == 0.0
    # nothing to score: 0 with a graph
    none = in_batch_softmax_loss(h, torch.zeros(9, dtype=torch.int64), w, tau=0.2)
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_sasrec_in_batch_loss_on_next_items() -> None:
    """SASRec's "inbatch" is the in-batch loss of its causal states against the batch's next items."""
    torch.manual_seed(0)
    model = sasrec(tau=0.5).double()
    batch = batch_from(sequences())
    got = model.losses(batch)
    with torch.no_grad():
        rows = model.encode(batch.items).reshape(-1, 16)
        expected = in_batch_float64(rows, batch.targets.reshape(-1), model.item_embedding.weight, 0.5)
    assert set(got) == {"loss", "inbatch"}
    torch.testing.assert_close(got["loss"], expected, atol=1e-10, rtol=1e-10)
    weight, bias = model.item_table()  # ranked by cosine: unit rows, the padding row 0
    assert bias is None and weight.shape == (NUM_ITEMS + 1, 16)
    torch.testing.assert_close(weight[1:].norm(dim=1), torch.ones(NUM_ITEMS, dtype=torch.float64))
    assert bool((weight[0] == 0).all())


# ---------------------------------------------------------------- backends
def _loss_and_grads(model: SequentialRecommender, batch: TrainBatch) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same masks for both backends
    losses = model.losses(batch)
    losses["loss"].backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


CASES: dict[str, Callable[..., SequentialRecommender]] = {
    "bert4rec-ce": lambda backend: bert4rec(backend, "ce"),
    "bert4rec-inbatch": lambda backend: bert4rec(backend, "inbatch"),
    "sasrec-inbatch": lambda backend: sasrec(backend, "inbatch"),
}


@pytest.mark.parametrize("name,backend", [
    *(pytest.param(name, "cpp", marks=cpp_tests_mark()) for name in CASES),
    ("bert4rec-ce", "triton"),  # the Triton kernels' causal=False path (in the interpreter on CPU: tiny)
])
def test_fused_backend_matches_torch(name: str, backend: str) -> None:
    torch.manual_seed(0)
    reference = CASES[name]("torch")
    fused = CASES[name](backend)
    fused.load_state_dict(reference.state_dict())
    if backend == "triton":
        batch = batch_from(sequences(rows=2, length=5, lengths=(5, 3)))
    else:
        batch = batch_from(sequences(rows=4, length=9, lengths=(9, 6, 3, 8)))
    losses_ref, grads_ref = _loss_and_grads(reference, batch)
    losses, grads = _loss_and_grads(fused, batch)
    assert losses.keys() == losses_ref.keys() and grads.keys() == grads_ref.keys()
    assert len(grads_ref) == len(list(reference.parameters()))  # every parameter is trained
    for key in losses:
        torch.testing.assert_close(losses[key], losses_ref[key], atol=1e-5, rtol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], grads_ref[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


# ---------------------------------------------------------------- prediction
def test_user_vectors_read_an_appended_mask() -> None:
    torch.manual_seed(0)
    model = bert4rec(max_len=6).eval()
    history = sequences(rows=4, length=6, lengths=(6, 5, 1, 0), seed=5)  # a full row and an empty history
    batch = EvalBatch(items=history, target=torch.ones(4, dtype=torch.int64), exclude=history.clone())
    mask = torch.full((4, 1), model.mask_id)
    with torch.no_grad():
        vectors = model.user_vectors(batch)
        # max_len 6: the full row drops its oldest item to make room for [MASK]
        expected = model.encode(torch.cat([history, mask], 1)[:, 1:])[:, -1]
        short = model.user_vectors(EvalBatch(items=history[1:2, 1:], target=batch.target[1:2],
                                             exclude=batch.exclude[1:2]))
        tail = model.user_vectors(EvalBatch(items=history[2:, 4:], target=batch.target[2:],
                                            exclude=batch.exclude[2:]))
    assert vectors.shape == (4, 16) and bool(torch.isfinite(vectors).all())
    torch.testing.assert_close(vectors, expected, atol=0, rtol=0)
    torch.testing.assert_close(short[0], vectors[1], atol=1e-5, rtol=1e-5)  # left padding does not matter
    torch.testing.assert_close(tail, vectors[2:], atol=1e-5, rtol=1e-5)
    weight, bias = model.item_table()
    assert bias is None and weight.shape == (NUM_ITEMS + 1, 16)  # no [MASK] row: it is never ranked
    assert weight.data_ptr() == model.item_embedding.weight.data_ptr() and bool((weight[0] == 0).all())
    assert model.item_embedding.weight.shape == (NUM_ITEMS + 2, 16)


def test_bert4rec_learns_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = bert4rec(dropout=0.1)
    seq = (torch.arange(9)[None, :] + torch.tensor([0, 3, 7, 12])[:, None]) % NUM_ITEMS + 1  # item i → i + 1
    batch = batch_from(seq)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_now() -> float:
        model.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            value = float(model.losses(batch)["loss"])
        model.train()
        return value

    before = loss_now()
    for _ in range(80):
        optimizer.zero_grad()
        model.losses(batch)["loss"].backward()
        optimizer.step()
    after = loss_now()
    assert after < 0.4 * before, (before, after)
    assert bool((model.item_embedding.weight[0] == 0).all())  # the padding row never moves


@pytest.mark.parametrize("kwargs, field", [
    ({"mask_prob": 0.0}, "mask_prob"), ({"mask_prob": 1.0}, "mask_prob"),
    ({"mask_prob": float("nan")}, "mask_prob"), ({"mask_prob": True}, "mask_prob"), ({"loss": "bce"}, "loss"),
    ({"tau": 0.0}, "tau"), ({"tau": float("inf")}, "tau"),
])
def test_bad_config(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BERT4RecConfig(num_items=5, **kwargs)
    if field == "tau":
        with pytest.raises(ValueError, match=field):
            SASRecConfig(num_items=5, loss="inbatch", **kwargs)


# ---------------------------------------------------------------- the command line
def _train(out: Path, *extra: str, model: str = "bert4rec") -> dict[str, Any]:
    args = ["train", "--model", model, "--data", SYN, "--out", str(out), "--hidden", "16", "--layers", "1",
            "--heads", "2", "--inner", "32", "--max-len", "10", "--batch-size", "256", "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_cli_trains_bert4rec_with_every_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = _train(tmp_path / "run", "--epochs", "1", "--sampled-eval")
    for split in ("valid", "test"):
        for key in ("HR@10", "NDCG@10", "sampled_HR@10", "sampled_NDCG@10"):
            assert 0.0 <= metrics[split][key] <= 1.0, (split, key)
        assert metrics[split]["sampled_HR@10"] >= metrics[split]["HR@10"]  # 100 negatives vs the catalog
    assert metrics["config"]["model"] == "bert4rec" and metrics["config"]["model_options"]["mask_prob"] == 0.2
    assert math.isfinite(metrics["history"][0]["ce"])
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--json", "--keep-history", "--sampled-eval"]) == 0
    kept = training.evaluate_checkpoint(checkpoint, exclude_history=False, log=lambda *_: None)
    excluded = training.evaluate_checkpoint(checkpoint, log=lambda *_: None)
    assert excluded["test"] == pytest.approx(metrics["test"])
    assert kept["test"]["users"] == excluded["test"]["users"]


@pytest.mark.parametrize("model", ["bert4rec", "sasrec"])
def test_cli_in_batch_loss(tmp_path: Path, model: str) -> None:
    metrics = _train(tmp_path / "run", "--epochs", "1", "--loss", "inbatch", "--tau", "0.2", model=model)
    assert metrics["config"]["model_options"]["loss"] == "inbatch"
    assert metrics["config"]["model_options"]["tau"] == 0.2
    assert math.isfinite(metrics["history"][0]["inbatch"]) and 0.0 <= metrics["test"]["NDCG@10"] <= 1.0


def test_cli_resume_redraws_the_masks_of_the_uninterrupted_run(tmp_path: Path) -> None:
    """Masks come from torch's RNG, whose state the checkpoint keeps: 1 epoch + resume = 2 epochs."""
    full = _train(tmp_path / "full", "--epochs", "2", "--dropout", "0.1")
    _train(tmp_path / "cut", "--epochs", "1", "--dropout", "0.1")
    assert main(["train", "--resume", "--out", str(tmp_path / "cut"), "--epochs", "2", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["test"] == full["test"]
