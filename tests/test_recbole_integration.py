"""fastattn.integrations.recbole against RecBole 1.2.1's own models (a test dependency, see pyproject).

RecBole's Config breaks on numpy 2 (np.float_) and quick_start imports ray, so the models are
built from their classes with the few config keys they read and a one-method dataset."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from recbole.data.interaction import Interaction
from recbole.model.layers import MultiHeadAttention, TransformerEncoder
from recbole.model.sequential_recommender import BERT4Rec, SASRec

# Importing RecBole's sequential models switches on anomaly detection process-wide (its sine.py);
# that would slow every later test of the session, and fastattn does not need it.
torch.autograd.set_detect_anomaly(False)

from fastattn import nn as fnn  # noqa: E402
from fastattn.integrations.recbole import FusedMultiHeadAttention, mask_structure, patch_model  # noqa: E402

N_ITEMS, MAX_LEN, BATCH = 41, 9, 6  # item 0 is RecBole's padding id


class _Dataset:
    """The one thing RecBole's sequential models ask of a dataset."""

    def num(self, field: str) -> int:
        return N_ITEMS


def _config(**overrides: Any) -> dict[str, Any]:
    config = {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": MAX_LEN,
        "device": "cpu", "n_layers": 2, "n_heads": 2, "hidden_size": 16, "inner_size": 32,
        "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "initializer_range": 0.02, "loss_type": "CE",
    }
    config.update(overrides)
    return config


def _sasrec(seed: int = 0, **overrides: Any) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(_config(**overrides), _Dataset())


def _batch(seed: int = 1) -> Interaction:
    """Right-padded sequences (RecBole's layout) of lengths 1..MAX_LEN, with next items."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 3, MAX_LEN, 5, 2, MAX_LEN - 1])
    seq = torch.randint(1, N_ITEMS, (BATCH, MAX_LEN), generator=gen)
    seq[torch.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
    return Interaction({"item_id_list": seq, "item_length": lengths,
                        "item_id": torch.randint(1, N_ITEMS, (BATCH,), generator=gen)})


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    fnn.checks._warned_reasons.clear()


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_patched_sasrec_equals_recbole(backend: str) -> None:
    """Same outputs, loss, gradients and full-sort scores as the unpatched model; state_dict unchanged."""
    original = _sasrec()
    patched = patch_model(copy.deepcopy(original), backend=backend)
    assert patched.fastattn_patched == {"attention_layers": 2, "cross_entropy": True}
    assert all(type(m) is FusedMultiHeadAttention for m in patched.modules() if isinstance(m, MultiHeadAttention))
    assert patched.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(patched.state_dict()[k], v) for k, v in original.state_dict().items())
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # RecBole's causal mask is recognized: no fallback warning
        losses = [m.calculate_loss(batch) for m in (original, patched)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, p_ref), p_ours in zip(original.named_parameters(), patched.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-6, rtol=1e-4, msg=name)
    original.eval(), patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched.full_sort_predict(batch), original.full_sort_predict(batch),
                                   atol=1e-5, rtol=1e-5)


def test_full_sort_topk_equals_topk_of_recbole_scores() -> None:
    model = patch_model(_sasrec(), backend="cpp").eval()
    batch = _batch()
    history = batch["item_id_list"].clone()
    history[history == 0] = -1  # -1: no item
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        scores[:, 0] = float("-inf")  # what RecBole's Trainer does: padding id and history never ranked
        scores.scatter_(1, batch["item_id_list"], float("-inf"))
        expected_scores, expected_items = scores.topk(10, dim=1)
        got_scores, got_items = model.full_sort_topk(batch, 10, exclude_history=history)
    torch.testing.assert_close(got_scores, expected_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_items, expected_items)


def test_short_training_run_matches_recbole() -> None:
    """30 Adam steps from the same initialization: the patched model's losses follow RecBole's.

    Dropout is 0 here because the kernel draws its own dropout masks (different random numbers
    from torch's Dropout), so with dropout the two runs agree only in distribution."""
    runs = []
    for patch in (False, True):
        model = _sasrec(seed=3)
        if patch:
            assert patch_model(model, backend="cpp").fastattn_patched["cross_entropy"]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for step in range(30):
            loss = model.calculate_loss(_batch(seed=100 + step % 5))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append(losses)
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), atol=1e-3, rtol=1e-3)
    assert runs[0][-1] < runs[0][0] - 0.5  # the run learns something, so the comparison means something


@pytest.mark.parametrize("bidirectional", [False, True])
def test_transformer_encoder_masks(bidirectional: bool) -> None:
    """Both of RecBole's mask patterns (causal (B,1,L,L), bidirectional (B,1,1,L)) run fused and match."""
    torch.manual_seed(0)
    encoder = TransformerEncoder(n_layers=2, n_heads=2, hidden_size=16, inner_size=32, hidden_dropout_prob=0.0,
                                 attn_dropout_prob=0.0, hidden_act="gelu", layer_norm_eps=1e-12)
    model = _sasrec()
    seq = _batch()["item_id_list"]
    mask = model.get_attention_mask(seq, bidirectional=bidirectional)
    causal, padding = mask_structure(mask)
    assert causal is not bidirectional and torch.equal(padding, seq == 0)
    x = torch.randn(BATCH, MAX_LEN, 16)
    expected = encoder(x, mask)[-1]
    fused = copy.deepcopy(encoder)
    for module in fused.modules():
        if type(module) is MultiHeadAttention:
            module.__class__ = FusedMultiHeadAttention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fused(x, mask)[-1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_other_masks_run_recbole_attention_with_a_warning() -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(2, 16, 0.0, 0.0, 1e-12)
    fused = copy.deepcopy(layer)
    fused.__class__ = FusedMultiHeadAttention
    x = torch.randn(2, 5, 16)
    band = torch.zeros(2, 1, 5, 5)
    band[..., 0, 3:] = -10000.0  # not causal, not padding
    soft = torch.randn(2, 1, 5, 5)  # a bias, not a mask
    for mask in (band, soft):
        assert mask_structure(mask) is None
        fnn.checks._warned_reasons.clear()
        with pytest.warns(UserWarning, match="runs RecBole's own attention"):
            got = fused(x, mask)
        torch.testing.assert_close(got, layer(x, mask))


def test_bert4rec_attention_is_patched_and_equal() -> None:
    """BERT4Rec: bidirectional mask, its own loss (not swapped), attention layers fused."""
    config = _config(mask_ratio=0.2, ft_ratio=0.5, MASK_ITEM_SEQ="Mask_item_id_list", POS_ITEMS="Pos_item_id",
                     NEG_ITEMS="Neg_item_id", MASK_INDEX="MASK_INDEX")
    torch.manual_seed(0)
    original = BERT4Rec(config, _Dataset())
    patched = patch_model(copy.deepcopy(original), backend="cpp")
    assert patched.fastattn_patched == {"attention_layers": 2, "cross_entropy": False}
    original.eval(), patched.eval()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(patched.full_sort_predict(batch), original.full_sort_predict(batch),
                                   atol=1e-5, rtol=1e-5)


def test_bpr_loss_keeps_recbole_loss() -> None:
    model = patch_model(_sasrec(loss_type="BPR"))
    assert model.fastattn_patched == {"attention_layers": 2, "cross_entropy": False}
    assert not hasattr(model, "full_sort_topk")


def test_warns_when_anomaly_detection_is_on() -> None:
    with torch.autograd.set_detect_anomaly(True):
        with pytest.warns(UserWarning, match="anomaly detection is on"):
            patch_model(_sasrec())
    assert not torch.is_anomaly_enabled()


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="model must be a RecBole SequentialRecommender"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(_sasrec(), backend="gpu")
