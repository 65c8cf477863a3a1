"""Drop-in use: one training step of existing recommenders before and after swapping fastattn in.

Cases (all training steps: forward, loss, backward, Adam step; dropout as configured):
- recbole_sasrec: RecBole 1.2.1's SASRec (hidden 64, 2 layers, 2 heads, inner 256, dropout 0.5,
  loss_type CE), right-padded batches of B sequences of length L, catalog V items.
  Providers: "recbole" (unpatched) and "fastattn" (`fastattn.integrations.recbole.patch_model`:
  fused attention + full-catalog cross-entropy). L ∈ {50, 200}, V ∈ {12k, 1M}. Both run with
  autograd anomaly detection off; RecBole 1.2.1 switches it on process-wide when its sequential
  models are imported (sine.py), which is what its own Trainer runs under: "recbole_anomaly"
  (V = 12k) is the unpatched model with it on, to show that cost.
- torch_mha_sasrec: a plain PyTorch SASRec in the layout of pmixer/SASRec.pytorch
  (torch.nn.MultiheadAttention, sequence-first, causal bool mask, point-wise FFN, BCE with one
  negative per position). Providers "torch" and "fastattn"
  (`fastattn.integrations.replace_multihead_attention(model, ignore_need_weights=True)`).
  L ∈ {50, 200}, V = 12k (its loss only scores 2 items per position).

Peak memory (extra_info peak_mem_mb) is one step's working memory above what the model and
batch hold (bench/suite/_common.py: CUDA allocator counters, CPU profiler allocation events).

Run: python -m pytest bench/suite/bench_integrations.py --benchmark-only   (see bench/README.md)
"""
from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from _common import bench_size, sweep, time_training_step, training_step

LENGTHS = sweep(full=(50, 200), quick=(50,), tiny=(8,))
CATALOGS = sweep(full=(12_101, 1_000_000), quick=(12_101, 100_000), tiny=(100, 1_000))  # Beauty's 12,101 items, a million
BATCH = 4 if bench_size() == "tiny" else 256
HIDDEN = 64

# --------------------------------------------------------------------------- RecBole SASRec

class _Dataset:
    def __init__(self, items: int) -> None:
        self.items = items

    def num(self, field: str) -> int:
        return self.items


def _recbole_sasrec(items: int, length: int, device: torch.device) -> torch.nn.Module:
    from recbole.model.sequential_recommender import SASRec

    torch.autograd.set_detect_anomaly(False)  # RecBole's import turned it on (see the module docstring)

    config = {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": length,
        "device": device, "n_layers": 2, "n_heads": 2, "hidden_size": HIDDEN, "inner_size": 256,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "initializer_range": 0.02, "loss_type": "CE",
    }
    torch.manual_seed(0)
    return SASRec(config, _Dataset(items)).to(device).train()


def _recbole_batch(items: int, length: int, device: torch.device) -> Any:
    from recbole.data.interaction import Interaction

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, length + 1, (BATCH,), generator=gen)
    seq = torch.randint(1, items, (BATCH, length), generator=gen)
    seq[torch.arange(length)[None, :] >= lengths[:, None]] = 0  # RecBole pads on the right
    target = torch.randint(1, items, (BATCH,), generator=gen)
    return Interaction({"item_id_list": seq, "item_length": lengths, "item_id": target}).to(device)


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None,
                    reason="RecBole is not installed (pip install recbole==1.2.1, in the test extras)")
@pytest.mark.parametrize("items", CATALOGS, ids=lambda v: f"V={v}")
@pytest.mark.parametrize("length", LENGTHS, ids=lambda v: f"L={v}")
@pytest.mark.parametrize("provider", ["recbole", "recbole_anomaly", "fastattn"])
def test_recbole_sasrec_train_step(benchmark: BenchmarkFixture, bench_device: torch.device, provider: str,
                                   length: int, items: int) -> None:
    if provider == "recbole_anomaly" and items > CATALOGS[0]:
        pytest.skip("the anomaly-detection cost is shown at V=12k; at 1M it would only add minutes")
    model = _recbole_sasrec(items, length, bench_device)
    if provider == "fastattn":
        from fastattn.integrations.recbole import patch_model

        patch_model(model)
    batch = _recbole_batch(items, length, bench_device)
    step = training_step(model, lambda: model.calculate_loss(batch), bench_device)
    if provider == "recbole_anomaly":
        plain_step = step

        def step() -> None:
            with torch.autograd.set_detect_anomaly(True):
                plain_step()
    time_training_step(benchmark, step, bench_device, f"recbole_sasrec L={length} V={items}",
          {"op": "recbole_sasrec", "provider": provider, "L": length, "V": items, "B": BATCH})


# --------------------------------------------------------------------------- plain PyTorch SASRec

class TorchMHASASRec(torch.nn.Module):
    """SASRec written against torch.nn.MultiheadAttention, in pmixer/SASRec.pytorch's layout:
    pre-LayerNorm queries, sequence-first attention with a causal bool mask and the default
    need_weights, Conv1d-free point-wise FFN, BCE on one positive and one negative per position."""

    def __init__(self, items: int, length: int, hidden: int = HIDDEN, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.item_emb = torch.nn.Embedding(items + 1, hidden, padding_idx=0)
        self.pos_emb = torch.nn.Embedding(length, hidden)
        self.emb_dropout = torch.nn.Dropout(dropout)
        self.attention_norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.attention_layers = torch.nn.ModuleList(
            torch.nn.MultiheadAttention(hidden, heads, dropout) for _ in range(blocks))
        self.ffn_norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.ffns = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.Dropout(dropout), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.Dropout(dropout)) for _ in range(blocks))
        self.last_norm = torch.nn.LayerNorm(hidden, eps=1e-8)

    def features(self, seq: torch.Tensor) -> torch.Tensor:
        length = seq.shape[1]
        x = self.item_emb(seq) * self.item_emb.embedding_dim ** 0.5
        x = self.emb_dropout(x + self.pos_emb(torch.arange(length, device=seq.device)))
        keep = (seq != 0).unsqueeze(-1)
        x = x * keep
        mask = ~torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        for norm, attention, ffn_norm, ffn in zip(self.attention_norms, self.attention_layers,
                                                  self.ffn_norms, self.ffns):
            x = x.transpose(0, 1)
            q = norm(x)
            out, _ = attention(q, x, x, attn_mask=mask)
            x = (q + out).transpose(0, 1)
            x = ffn_norm(x)
            x = (x + ffn(x)) * keep
        return self.last_norm(x)

    def loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        h = self.features(seq)
        pos_logits = (h * self.item_emb(pos)).sum(-1)
        neg_logits = (h * self.item_emb(neg)).sum(-1)
        valid = pos != 0
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return bce(pos_logits[valid], torch.ones_like(pos_logits[valid])) + \
            bce(neg_logits[valid], torch.zeros_like(neg_logits[valid]))


@pytest.mark.parametrize("length", LENGTHS, ids=lambda v: f"L={v}")
@pytest.mark.parametrize("provider", ["torch", "fastattn"])
def test_torch_mha_sasrec_train_step(benchmark: BenchmarkFixture, bench_device: torch.device, provider: str,
                                     length: int) -> None:
    items = CATALOGS[0]
    torch.manual_seed(0)
    model = TorchMHASASRec(items, length).to(bench_device).train()
    if provider == "fastattn":
        from fastattn.integrations import replace_multihead_attention

        model = replace_multihead_attention(model, ignore_need_weights=True)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(1, items + 1, (BATCH, length + 1), generator=gen)
    lengths = torch.randint(2, length + 2, (BATCH,), generator=gen)
    seq[torch.arange(length + 1)[None, :] < (length + 1 - lengths)[:, None]] = 0  # left padding, as pmixer
    seq = seq.to(bench_device)
    neg = torch.randint(1, items + 1, (BATCH, length), generator=gen).to(bench_device)
    step = training_step(model, lambda: model.loss(seq[:, :-1], seq[:, 1:], neg), bench_device)
    time_training_step(benchmark, step, bench_device, f"torch_mha_sasrec L={length}",
          {"op": "torch_mha_sasrec", "provider": provider, "L": length, "V": items, "B": BATCH})
