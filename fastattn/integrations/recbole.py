"""fastattn inside RecBole (1.2.x) sequential models, parameters unchanged.

    from recbole.model.sequential_recommender import SASRec
    from fastattn.integrations.recbole import patch_model

    model = patch_model(SASRec(config, dataset))   # same state_dict, same outputs, fused kernels

What `patch_model` swaps:

- every `recbole.model.layers.MultiHeadAttention` (the attention of `TransformerEncoder`, used
  by SASRec, SASRecF, FDSA, BERT4Rec, CORE, GCSAN, S3Rec, …) runs `fastattn.dif_attention`:
  no (B, H, L, L) score tensor, attention dropout inside the kernel. RecBole passes an additive
  mask (0 / -10000) of shape (B, 1, L, L) (causal & not padding) or (B, 1, 1, L)
  (bidirectional); the layer reads the key padding and causality from it and checks that it
  is one of those two patterns (one comparison per layer). Any other mask runs RecBole's own
  attention, with a warning the first time.
- for the models whose CE loss is ``forward(item_seq, item_seq_len) @ item_embedding.weightᵀ``
  (SASRec, SASRecF, FDSA, LightSANs) with ``loss_type="CE"``: `calculate_loss` runs
  `fastattn.full_item_cross_entropy`, which never builds the (B, n_items) logits, and the model
  gains `full_sort_topk(interaction, k, exclude_history=None)` (chunked top-k through
  `fastattn.topk_items`, no (B, n_items) scores either).

`full_sort_predict` keeps returning the dense (B, n_items) scores: RecBole's Trainer needs them
(its evaluator runs torch.topk over them), so evaluation inside RecBole's Trainer still costs
eval_batch_size × n_items floats; use `full_sort_topk` in your own loop to avoid that.

RecBole 1.2.1 turns on `torch.autograd.set_detect_anomaly(True)` for the whole process when
its sequential models are imported (recbole/model/sequential_recommender/sine.py, at import):
every backward op is then checked for NaN and every forward op records a stack trace, which
makes a RecBole SASRec training step about 1.5× slower on a CPU (bench/results/integrations-cpu.md).
`patch_model` leaves that global switch alone but warns; call
``torch.autograd.set_detect_anomaly(False)`` after importing RecBole to drop the cost.

Numerically a patched model equals the unpatched one up to float32 rounding (same parameters,
same math); with dropout the random masks differ (the kernel draws its own), so two runs
agree in distribution, not bit for bit.
"""
from __future__ import annotations

import types
from typing import Any, Optional

import torch

try:
    from recbole.model.abstract_recommender import SequentialRecommender
    from recbole.model.layers import MultiHeadAttention
except ImportError as error:  # pragma: no cover - exercised only without RecBole
    raise ImportError("fastattn.integrations.recbole needs RecBole: pip install recbole==1.2.1 "
                      f"(import failed: {error})") from error

from .._dispatch import BACKENDS
from ..functional import dif_attention, full_item_cross_entropy, topk_items
from ..nn.checks import visible_keys, warn_once

__all__ = ["FusedMultiHeadAttention", "patch_model", "CE_MODELS"]

# RecBole models whose CE branch of calculate_loss is exactly
#   logits = self.forward(item_seq, item_seq_len) @ self.item_embedding.weight.T; CrossEntropyLoss(logits, pos)
CE_MODELS = ("SASRec", "SASRecF", "FDSA", "LightSANs")

def _warn_once(reason: str) -> None:
    warn_once(f"fastattn.integrations.recbole: {reason}")


def mask_structure(attention_mask: torch.Tensor) -> Optional[tuple[bool, torch.Tensor]]:
    """(causal, key_padding_mask (B, L) bool) read from RecBole's extended attention mask, or None.

    RecBole's `get_attention_mask` gives (B, 1, L, L) = tril & key-not-padding, or with
    bidirectional=True (B, 1, 1, L) = key-not-padding, as 0 (visible) / -10000 (hidden). None when
    `attention_mask` is anything else (the caller then runs RecBole's own attention).
    """
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return None
    visible = visible_keys(attention_mask, "attention_mask")
    if visible is None:
        return None
    visible = visible[:, 0]  # (B, Lq, L)
    lq, length = visible.shape[1], visible.shape[2]
    if lq == 1:
        return False, ~visible[:, 0]
    if lq != length:
        return None
    key_visible = visible[:, -1]  # the last query row sees every non-padding key under either pattern
    causal = torch.ones(length, length, dtype=torch.bool, device=visible.device).tril()
    if bool((visible == (causal & key_visible[:, None, :])).all()):
        return True, ~key_visible
    if bool((visible == key_visible[:, None, :]).all()):
        return False, ~key_visible
    return None


class FusedMultiHeadAttention(MultiHeadAttention):
    """RecBole's `MultiHeadAttention` with the attention itself on `fastattn.dif_attention`.

    Same parameters and forward(input_tensor (B, L, H), attention_mask) → (B, L, H) as RecBole's:
    LayerNorm(x + dropout(dense(softmax(q kᵀ / sqrt(d) + mask) v))). Modules become this class
    through `patch_model` (their `__class__` is swapped; nothing is copied).
    """

    fastattn_backend: str = "auto"

    def forward(self, input_tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        structure = mask_structure(attention_mask)
        if structure is None:
            _warn_once(f"an attention mask of shape {tuple(attention_mask.shape)} that is neither RecBole's causal "
                       "nor its bidirectional padding mask runs RecBole's own attention")
            return super().forward(input_tensor, attention_mask)
        causal, padding = structure
        b, length, hidden = input_tensor.shape
        heads, d = self.num_attention_heads, self.attention_head_size

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, length, heads, d).transpose(1, 2)

        q, k, v = split(self.query(input_tensor)), split(self.key(input_tensor)), split(self.value(input_tensor))
        context = dif_attention(q, k, v, causal=causal, key_padding_mask=padding if bool(padding.any()) else None,
                                dropout_p=self.attn_dropout.p if self.training else 0.0,
                                backend=self.fastattn_backend)
        hidden_states = self.dense(context.transpose(1, 2).reshape(b, length, hidden))
        hidden_states = self.out_dropout(hidden_states)
        return self.LayerNorm(hidden_states + input_tensor)


def _fused_calculate_loss(self: SequentialRecommender, interaction: Any) -> torch.Tensor:
    """CE over the whole catalog without the (B, n_items) logits (SASRec's calculate_loss, loss_type CE)."""
    seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
    return full_item_cross_entropy(seq_output, self.item_embedding.weight, interaction[self.POS_ITEM_ID],
                                   backend=self.fastattn_backend)


def _full_sort_topk(self: SequentialRecommender, interaction: Any, k: int,
                    exclude_history: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per sequence over the whole catalog, chunked (no (B, n_items) scores).

    interaction: a RecBole Interaction with the item sequence and its length. exclude_history:
    optional (B, M) int64 item ids never to recommend (-1 = none), e.g. the sequence itself.
    Item 0 (RecBole's padding) is always excluded. Returns (scores (B, k) float32, items (B, k)
    int64), best first.
    """
    item_seq = interaction[self.ITEM_SEQ]
    seq_output = self.forward(item_seq, interaction[self.ITEM_SEQ_LEN])
    padding_item = torch.zeros(item_seq.shape[0], 1, dtype=torch.int64, device=item_seq.device)
    exclude = padding_item if exclude_history is None else torch.cat([padding_item, exclude_history.long()], dim=1)
    return topk_items(seq_output, self.item_embedding.weight, k, exclude=exclude)


def patch_model(model: SequentialRecommender, *, backend: str = "auto") -> SequentialRecommender:
    """Run a RecBole sequential model on fastattn's kernels; returns the same object, changed in place.

    Attention: every `recbole.model.layers.MultiHeadAttention` inside becomes a
    `FusedMultiHeadAttention` (same parameters). Loss: for `CE_MODELS` with loss_type "CE",
    `calculate_loss` uses `fastattn.full_item_cross_entropy` and `model.full_sort_topk` is added.
    backend: as in `fastattn.dif_attention`. The state_dict is unchanged. What was swapped is in
    `model.fastattn_patched` ({"attention_layers": n, "cross_entropy": bool}); a model with nothing
    to swap raises ValueError.
    """
    if not isinstance(model, SequentialRecommender):
        raise TypeError(f"model must be a RecBole SequentialRecommender, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if torch.is_anomaly_enabled():
        _warn_once("torch.autograd anomaly detection is on (RecBole 1.2.1 enables it when its sequential models "
                   "are imported) and slows every training step; torch.autograd.set_detect_anomaly(False) turns it off")
    layers = 0
    for module in model.modules():
        if type(module) is MultiHeadAttention or type(module) is FusedMultiHeadAttention:
            module.__class__ = FusedMultiHeadAttention
            module.fastattn_backend = backend
            layers += 1
    cross_entropy = type(model).__name__ in CE_MODELS and getattr(model, "loss_type", None) == "CE"
    if cross_entropy:
        model.calculate_loss = types.MethodType(_fused_calculate_loss, model)
        model.full_sort_topk = types.MethodType(_full_sort_topk, model)
    if layers == 0 and not cross_entropy:
        raise ValueError(f"nothing to patch in {type(model).__name__}: it has no recbole MultiHeadAttention layer and "
                         f"is not one of {CE_MODELS} with loss_type='CE'")
    model.fastattn_backend = backend
    model.fastattn_patched = {"attention_layers": layers, "cross_entropy": cross_entropy}
    return model
