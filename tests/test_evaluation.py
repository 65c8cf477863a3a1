"""Metrics and ranking protocols against hand-computed cases."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from fastattn.data.batch import EvalBatch
from fastattn.evaluation import (evaluate_model, full_ranking_ranks, metrics_from_ranks, ndcg_at,
                                 per_domain_metrics, sampled_ranks)
from fastattn.models.base import SequentialRecommender


def test_metrics_from_hand_ranks() -> None:
    m = metrics_from_ranks(torch.tensor([0, 3, 9, 25]), ks=(5, 10, 20))
    assert m["HR@5"] == pytest.approx(2 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["HR@10"] == pytest.approx(3 / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 4)
    assert m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@20"] == m["NDCG@10"]
    assert ndcg_at(3, 5) == pytest.approx(1 / math.log2(5)) and ndcg_at(5, 5) == 0.0


def test_metrics_prefix_and_bad_ks() -> None:
    assert set(metrics_from_ranks([1], ks=(1,), prefix="sampled_")) == {"sampled_HR@1", "sampled_NDCG@1"}
    assert metrics_from_ranks([], ks=(5,)) == {"HR@5": 0.0, "NDCG@5": 0.0}
    with pytest.raises(ValueError, match="ks must be"):
        metrics_from_ranks([0], ks=(0,))
    with pytest.raises(ValueError, match="ks must be"):
        metrics_from_ranks([0], ks=())


def _catalog() -> torch.Tensor:
    # 6 items (row 0 = padding) on a line: item j scores j for the user vector (1, 0)
    weight = torch.zeros(7, 2)
    weight[:, 0] = torch.arange(7, dtype=torch.float32)
    weight[0, 0] = 100.0  # the padding row would win if it were not excluded
    return weight


def test_full_ranking_by_hand() -> None:
    weight, user = _catalog(), torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([6, 4, 5])
    exclude = torch.tensor([[0, -1, -1], [0, 6, -1], [0, 5, 6]])
    ranks = full_ranking_ranks(user, weight, target, exclude, k=3)
    # row 0: 6 is best -> 0; row 1: 6 excluded, 5 > 4 -> rank 1; row 2: target excluded -> miss (k)
    assert ranks.tolist() == [0, 1, 3]
    ranks = full_ranking_ranks(user, weight, torch.tensor([1, 1, 1]), exclude, k=3)
    assert ranks.tolist() == [3, 3, 3]  # item 1 ranks below the cut-off


def test_sampled_protocol_by_hand() -> None:
    weight = torch.zeros(150, 2)
    weight[:, 0] = torch.arange(150, dtype=torch.float32)  # item j scores j for the user (1, 0)
    user, gen = torch.tensor([[1.0, 0.0]]), torch.Generator().manual_seed(0)
    assert int(sampled_ranks(user, weight, torch.tensor([149]), None, gen)) == 0
    assert int(sampled_ranks(user, weight, torch.tensor([1]), None, gen)) == 100
    # ties count against the target: every negative scores the same
    assert int(sampled_ranks(user, torch.ones(150, 2), torch.tensor([3]), None, gen)) == 100
    with pytest.raises(ValueError, match="more than 101 items"):
        sampled_ranks(user, _catalog(), torch.tensor([6]), None, gen)


def test_sampled_negatives_avoid_history_and_target() -> None:
    # excluded items 1..199 score highest, the target next, items 200..299 lowest: any excluded
    # item drawn as a negative would push the target's rank above 0
    weight = torch.zeros(300, 1)
    weight[1:200, 0] = 10.0
    weight[5, 0] = 5.0
    weight[200:, 0] = -1.0
    exclude = torch.cat([torch.arange(1, 5), torch.arange(6, 200)]).unsqueeze(0)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert int(sampled_ranks(torch.ones(1, 1), weight, torch.tensor([5]), exclude, gen)) == 0


class _FixedModel(SequentialRecommender):
    """Scores = the catalog of _catalog(); user vector (1, 0) whatever the history."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(_catalog())

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(batch.items.shape[0], 2)

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.weight, None


def test_evaluate_model_restores_training_mode() -> None:
    model = _FixedModel().train()
    batches = [EvalBatch(items=torch.tensor([[0, 3], [2, 3]]), target=torch.tensor([6, 5]),
                         exclude=torch.tensor([[0, 3, -1], [0, 2, 3]]))]
    out = evaluate_model(model, batches, "cpu", ks=(1, 5))
    assert model.training
    assert out["HR@1"] == pytest.approx(0.5) and out["HR@5"] == pytest.approx(1.0)
    assert out["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert out["users"] == 2
    sampled = evaluate_model(model, batches, "cpu", ks=(1,), sampled=False)
    assert "sampled_HR@1" not in sampled


def test_keeping_the_history_in_the_ranking() -> None:
    model = _FixedModel()
    batches = [EvalBatch(items=torch.tensor([[0, 6]]), target=torch.tensor([5]),
                         exclude=torch.tensor([[0, 6]]))]
    # item 6 (seen) outranks the target 5 only when the history stays in the ranking
    assert evaluate_model(model, batches, "cpu", ks=(1,))["HR@1"] == 1.0
    kept = evaluate_model(model, batches, "cpu", ks=(1, 2), exclude_history=False)
    assert kept["HR@1"] == 0.0 and kept["HR@2"] == 1.0


def test_per_domain_metrics_by_hand() -> None:
    ranks = torch.tensor([0, 3, 30, 1])
    domains = torch.tensor([1, 0, 1, 1])
    out = per_domain_metrics(ranks, domains, ks=(2, 5))
    assert out["domain0_users"] == 1 and out["domain1_users"] == 3
    assert out["domain0_HR@2"] == 0.0 and out["domain0_HR@5"] == 1.0
    assert out["domain0_NDCG@5"] == pytest.approx(1 / math.log2(5))
    assert out["domain1_HR@2"] == pytest.approx(2 / 3)
    assert out["domain1_NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert "domain2_users" not in out
    with pytest.raises(ValueError, match="same shape"):
        per_domain_metrics(ranks, domains[:2])


def test_evaluate_model_reports_target_domains() -> None:
    model = _FixedModel()
    batch = EvalBatch(items=torch.tensor([[0, 6], [0, 6]]), target=torch.tensor([5, 6]),
                      exclude=torch.tensor([[0, -1], [0, -1]]), target_domain=torch.tensor([0, 1]))
    out = evaluate_model(model, [batch], "cpu", ks=(1,), exclude_history=False)
    assert out["domain0_users"] == 1 and out["domain1_users"] == 1
    # item 6 outranks item 5 (history kept): the domain-1 user (target 6) hits, the domain-0 one misses
    assert out["domain0_HR@1"] == 0.0 and out["domain1_HR@1"] == 1.0 and out["HR@1"] == 0.5
    single = evaluate_model(model, [EvalBatch(items=batch.items, target=batch.target, exclude=batch.exclude)],
                            "cpu", ks=(1,))
    assert not [k for k in single if k.startswith("domain")]
