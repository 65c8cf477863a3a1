"""MAN: Mixed Attention Network for cross-domain sequential recommendation (Lin et al., WSDM 2024),
on fastattn's kernels (protocol: docs/training.md, "Evaluation protocol").

Notation: a left-padded mixed-domain batch items (B, L) with domain ids dom (B, L) in
0..G-1 (G = num_domains), E the item table (num_items+1, D, tied output), padding = items == 0,
K = num_prototypes. Every position t predicts the next item, whose domain d*(t) is known
(`TrainBatch.target_domains`, `EvalBatch.target_domain`).

Encoding layer (causal SASRec blocks, `blocks.TransformerLayer`, post-LN)::

    global:   g = Enc_glob(E[items] + Dom[dom] + P_glob[pos])        key mask = padding
    local d:  h_d = Enc_d(E[items] + P_d[pos_d])                     key mask = padding OR dom != d
              pos_d(t) = (number of domain-d items at positions <= t) − 1

Each encoder is Dropout(LayerNorm(input)) then `layers` causal blocks with its own weights, so
the local encoder of domain d only ever reads domain-d items (its keys hide every other slot).
The local state of domain d at position t is its output at the latest domain-d position
last_d(t) = max{u <= t : dom(u) = d, not padding} (a cumulative max of indices), or a learned
empty vector ε_d when there is none::

    s_d(t) = h_d(last_d(t))   if last_d(t) exists, else ε_d

Mixed attention layer. Every block is multi-head attention on `fastattn.dif_attention` followed
by LayerNorm(query + Dropout(W_o ·)) (post-LN, as the encoder blocks, no feed-forward):

- item similarity (target-aware in the paper, see deviations): attention over item
  embeddings with an item as the query: global  a_g(t) = Attn(q = E[items_t], k = v = E[items_u],
  u <= t); local  a_d(t) = Attn(q = E[items_{last_d(t)}], k = v = E[items_u], u <= t,
  dom(u) = d).
- sequence fusion (cross attention, queries ≠ keys): f_d(t) = Attn(q = s_d(t), k = v = g_u, u <= t).
- group prototypes: K learned prototypes p_k (K, D) attend, non-causally, to every global
  state visible at time t: c_k(t) = Attn(q = p_k, k = v = g_u, u <= t), then pooled by the
  global state: π(t) = Σ_k softmax_k(g_t · c_k(t) / sqrt(D)) c_k(t).

Prediction layer: two-layer MLPs (3D → inner → D, GELU, dropout) over the concatenated pooled
features, local per domain, added::

    z_glob(t) = MLP_glob([g_t | a_g(t) | π(t)])
    z_loc(t)  = MLP_{d*}([s_{d*}(t) | a_{d*}(t) | f_{d*}(t)])            d* = d*(t), target domain
    u(t) = z_loc(t) + z_glob(t),        score(t, j) = u(t) · E[j]

Loss over the valid positions n (input item and next item present), with the positive y_n and
M = num_negatives items z_{n,1..M} per position, each uniform over the items ≠ y_n (torch's RNG,
one draw each; duplicates among negatives are allowed)::

    sampled_ce = mean_n [ logsumexp(u_n·E[y_n], u_n·E[z_n,1], …, u_n·E[z_n,M]) − u_n·E[y_n] ]
    proto      = || P̂ P̂ᵀ − I ||_F² / K²          P̂ = row-normalized prototypes (0 when orthogonal)
    loss       = sampled_ce + proto_weight · proto

Causality. Training computes every position at once: item similarity and fusion are causal
attention (Lq = Lk = L); the prototype queries are repeated at every position (the K prototypes
folded into the head axis, (B, K·H, L, dh)) so causal attention gives each position t
prototypes that see exactly the keys <= t. Evaluation (`user_vectors`) needs only the last
position, so it runs cross attention with Lq ≠ Lk and causal=False over the whole history:
Lq = 1 for item similarity / fusion and Lq = K for the prototypes (the paper's non-causal
prototype attention); both paths give the same vector at the last position.

Deviations from the paper, and why:

- Target-aware item similarity would make the score a non-linear function of the candidate,
  but full-catalog evaluation scores every item as u · E[j] (`fastattn.topk_items`). The query is
  therefore the most recent item (global) or the target domain's most recent item (local), and
  the candidate only enters through the final dot product; the prediction MLPs likewise see the
  pooled features and not the candidate embedding.
- Negatives are uniform over the whole catalog (not the target domain's items), matching the
  evaluation, which ranks the whole catalog; defaults num_negatives = 100, proto_weight = 0.1,
  num_prototypes = 8 are our choices, not values taken from the paper.
- Item similarity aggregates item embeddings (keys = values = E[items]); the encoder states
  enter through s_d, g and the fusion / prototype blocks.
- A learned domain embedding is added to the global encoder's input (the mixed sequence would
  otherwise only know domains through the items); the prototypes pool by the global state.
- num_domains = 1 is supported (single-domain data: `domains` / `target_domain` may be None and
  mean "all domain 0"); MAN then has one local branch that sees what the global one sees.
- Every domain branch runs in every step; one that no row of the batch targets gets zero
  gradients (skipping it would need a host read of the target domains, a device sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.batch import EvalBatch, TrainBatch
from ..functional import dif_attention
from ..nn import Dropout
from .base import SequentialRecommender
from .blocks import (check_finite, check_int, check_items, check_range, flat_targets, init_weights, masked_mean,
                     positions_from_padding, sample_negatives)
from .config import EncoderConfig, catalog_field, check_config, option
from .encoder import EmbeddingBlock, TransformerStack
from .spec import SMALL, ModelSpec

__all__ = ["MAN", "MANConfig", "CrossAttention", "PrototypeAttention", "SequenceEncoder", "last_index",
           "prototype_regularizer", "sampled_softmax_loss"]


@dataclass(kw_only=True)
class MANConfig(EncoderConfig):
    """MAN options: the `EncoderConfig` fields (every encoder has `layers` causal blocks; `inner` is
    also the width of the prediction MLPs) plus

    num_domains: G >= 1, the number of domains (domain ids 0..G-1); the training loop fills it
        from the data set (`SequenceDataset.num_domains`).
    num_prototypes: K >= 1 learned group prototypes.
    num_negatives: M >= 1 uniformly sampled negatives per target in the sampled softmax.
    proto_weight: >= 0, weight of the prototype regularizer (0 disables it; still reported).
    Needs num_items >= 2 (a negative must differ from the positive).
    """

    num_domains: int = catalog_field(1)
    num_prototypes: int = option(8, "learned group prototypes")
    num_negatives: int = option(100, "sampled negatives per target in its sampled softmax")
    proto_weight: float = option(0.1, "weight of the prototype regularizer")

    def validate(self) -> None:
        super().validate()
        if self.num_items is not None and self.num_items < 2:
            raise ValueError(f"num_items must be >= 2 for MAN (a sampled negative must differ from the target), "
                             f"got {self.num_items}")
        check_int("num_domains", self.num_domains)
        check_int("num_prototypes", self.num_prototypes)
        check_int("num_negatives", self.num_negatives)
        check_finite("proto_weight", self.proto_weight, minimum=0.0)


# ---------------------------------------------------------------- building blocks
class SequenceEncoder(EmbeddingBlock):
    """One causal SASRec encoder: x_0 = Dropout(LayerNorm(inputs + P[positions])) (the shared
    `EmbeddingBlock` without an item table), then `layers` `TransformerLayer`s with a key padding mask.

    forward(inputs (B, L, D) float, positions (B, L) int64 in [0, max_len), key_padding_mask (B, L)
    bool True = hidden key) → (B, L, D). Outputs at hidden slots are computed but meaningless.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.build_embedding(config, item_table=False)
        self.layers = TransformerStack(config, config.layers)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor,
                key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize_input(inputs + self.position_embedding(positions)), key_padding_mask)


class CrossAttention(torch.nn.Module):
    """Multi-head attention whose queries come from one sequence and keys/values from another:
    out = LayerNorm(query + Dropout(W_o · MHA(W_q query, W_k keys, W_v values))).

    forward(query (B, Lq, D), keys (B, Lk, D), values (B, Lk, D), key_padding_mask (B, Lk) bool,
    causal: key j visible to query i iff j <= i (Lq = Lk here)) → (B, Lq, D). Runs on
    `fastattn.dif_attention`; a query with no visible key gets a zero context (no NaN).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.heads, self.attn_dropout, self.backend = config.heads, config.attn_dropout, config.backend
        self.query = torch.nn.Linear(config.hidden, config.hidden)
        self.key = torch.nn.Linear(config.hidden, config.hidden)
        self.value = torch.nn.Linear(config.hidden, config.hidden)
        self.dense = torch.nn.Linear(config.hidden, config.hidden)
        self.dropout = Dropout(config.dropout, backend=config.backend)
        self.norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) → (B, H, L, D / H)."""
        b, length, d = x.shape
        return x.view(b, length, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_padding_mask: torch.Tensor, causal: bool) -> torch.Tensor:
        context = dif_attention(self.split(self.query(query)), self.split(self.key(keys)),
                                self.split(self.value(values)), causal=causal, key_padding_mask=key_padding_mask,
                                dropout_p=self.attn_dropout if self.training else 0.0, backend=self.backend)
        context = context.transpose(1, 2).reshape(query.shape)
        return self.norm(query + self.dropout(self.dense(context)))


def prototype_regularizer(prototypes: torch.Tensor) -> torch.Tensor:
    """|| P̂ P̂ᵀ − I ||_F² / K² for prototypes P (K, D), P̂ = rows scaled to unit norm: 0 when the
    prototypes are pairwise orthogonal, (K² − K) / K² when they all point the same way."""
    k = prototypes.shape[0]
    unit = torch.nn.functional.normalize(prototypes, dim=-1)
    gram = unit @ unit.t()
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum() / (k * k)


class PrototypeAttention(torch.nn.Module):
    """Group-prototype attention: K learned prototypes p_k attend (non-causally) to the states
    visible at a time step; out_k = LayerNorm(p_k + Dropout(W_o · MHA(p_k, W_k states, W_v states))).

    forward(states (B, L, D), key_padding_mask (B, L) bool, last_only):
      - last_only=False → (B, L, K, D): at every position t, the prototypes over the keys u <= t
        (the K prototypes are folded into the head axis, (B, K·H, L, dh), and attention is
        causal, so position t never sees a later key);
      - last_only=True → (B, 1, K, D): the prototypes over the whole history, Lq = K queries,
        Lk = L keys, causal=False (equal to the last position of the other path).
    """

    def __init__(self, config: EncoderConfig, num_prototypes: int) -> None:
        super().__init__()
        self.heads, self.attn_dropout, self.backend = config.heads, config.attn_dropout, config.backend
        self.prototypes = torch.nn.Parameter(torch.empty(num_prototypes, config.hidden))
        self.key = torch.nn.Linear(config.hidden, config.hidden)
        self.value = torch.nn.Linear(config.hidden, config.hidden)
        self.dense = torch.nn.Linear(config.hidden, config.hidden)
        self.dropout = Dropout(config.dropout, backend=config.backend)
        self.norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, states: torch.Tensor, key_padding_mask: torch.Tensor, last_only: bool) -> torch.Tensor:
        b, length, d = states.shape
        h, dh, kp = self.heads, d // self.heads, self.prototypes.shape[0]
        k = self.key(states).view(b, length, h, dh).transpose(1, 2)      # (B, H, L, dh)
        v = self.value(states).view(b, length, h, dh).transpose(1, 2)
        protos = self.prototypes.to(states.dtype).view(kp, h, dh)
        dropout_p = self.attn_dropout if self.training else 0.0
        if last_only:
            q = protos.transpose(0, 1).unsqueeze(0).expand(b, h, kp, dh)    # (B, H, K, dh)
            out = dif_attention(q, k, v, causal=False, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                backend=self.backend)                        # (B, H, K, dh)
            context = out.permute(0, 2, 1, 3).reshape(b, 1, kp, d)
        else:
            q = protos[None, :, :, None, :].expand(b, kp, h, length, dh).reshape(b, kp * h, length, dh)
            k = k.unsqueeze(1).expand(b, kp, h, length, dh).reshape(b, kp * h, length, dh)
            v = v.unsqueeze(1).expand(b, kp, h, length, dh).reshape(b, kp * h, length, dh)
            out = dif_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                backend=self.backend)                        # (B, K·H, L, dh)
            context = out.view(b, kp, h, length, dh).permute(0, 3, 1, 2, 4).reshape(b, length, kp, d)
        return self.norm(protos.reshape(kp, d) + self.dropout(self.dense(context)))

    def regularizer(self) -> torch.Tensor:
        """`prototype_regularizer` of this layer's prototypes (scalar)."""
        return prototype_regularizer(self.prototypes)


class PredictionMLP(torch.nn.Module):
    """(…, 3D) → (…, D): W_2 Dropout(GELU(W_1 x + b_1)) + b_2 with W_1: 3D → inner."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense_1 = torch.nn.Linear(3 * config.hidden, config.inner)
        self.dense_2 = torch.nn.Linear(config.inner, config.hidden)
        self.dropout = Dropout(config.dropout, backend=config.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_2(self.dropout(torch.nn.functional.gelu(self.dense_1(x))))


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool → (B, L) int64: the largest u <= t with mask[b, u], or -1 when there is none."""
    steps = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, steps, torch.full_like(steps, -1)).cummax(dim=1).values


def sampled_softmax_loss(rows: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                         item_weight: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean_n [logsumexp(r_n·E[y_n], r_n·E[z_n,1..M]) − r_n·E[y_n]]: cross-entropy with the positive
    at index 0. rows (N, D), positives (N,), negatives (N, M) int64 item ids, item_weight (V, D);
    valid (N,) bool: the mean runs over these rows only (the others contribute exactly 0; None =
    every row). N = 0, or no valid row, gives 0 (with a graph)."""
    if rows.shape[0] == 0:
        return rows.sum() * 0.0 + item_weight.sum() * 0.0
    pos = (rows * item_weight[positives]).sum(-1, keepdim=True)                   # (N, 1)
    neg = torch.bmm(item_weight[negatives], rows.unsqueeze(-1)).squeeze(-1)       # (N, M)
    logits = torch.cat([pos, neg], dim=1)
    per_row = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return per_row.mean() if valid is None else masked_mean(per_row, valid)


# ---------------------------------------------------------------- the model
class MAN(SequentialRecommender):
    """MAN on fastattn kernels; see the module docstring for the math.

    losses(TrainBatch) → {"loss", "sampled_ce", "proto"}; user_vectors(EvalBatch) → (B, D) for the
    row's target domain (`EvalBatch.target_domain`, required when num_domains > 1);
    item_table() → (item embedding (num_items+1, D), None).
    """

    def __init__(self, config: MANConfig) -> None:
        super().__init__()
        self.config = check_config(config, MANConfig)
        g = config.num_domains
        self.item_embedding = torch.nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)
        self.domain_embedding = torch.nn.Embedding(g, config.hidden)
        # global part
        self.global_encoder = SequenceEncoder(config)
        self.global_similarity = CrossAttention(config)
        self.prototype_attention = PrototypeAttention(config, config.num_prototypes)
        self.global_predict = PredictionMLP(config)
        # local part: one branch per domain
        self.local_encoders = torch.nn.ModuleList(SequenceEncoder(config) for _ in range(g))
        self.local_empty = torch.nn.Parameter(torch.empty(g, config.hidden))
        self.local_similarity = torch.nn.ModuleList(CrossAttention(config) for _ in range(g))
        self.local_fusion = torch.nn.ModuleList(CrossAttention(config) for _ in range(g))
        self.local_predict = torch.nn.ModuleList(PredictionMLP(config) for _ in range(g))
        init_weights(self, config.init_std)
        torch.nn.init.normal_(self.local_empty, std=config.init_std)
        torch.nn.init.normal_(self.prototype_attention.prototypes, std=config.init_std)

    # ------------------------------------------------------------ batch checks
    def _check_domains(self, name: str, domains: Optional[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """Domain ids of `shape`, int64 in [0, num_domains); None only for num_domains == 1 (→ zeros)."""
        g = self.config.num_domains
        if domains is None:
            if g == 1:
                return torch.zeros(shape, dtype=torch.int64, device=self.item_embedding.weight.device)
            raise ValueError(f"{name} is required: MAN predicts with the local branch of the next item's domain "
                             f"(num_domains={g}); the batch has {name}=None")
        if (not isinstance(domains, torch.Tensor) or domains.dtype.is_floating_point or domains.dtype.is_complex
                or domains.dtype == torch.bool or tuple(domains.shape) != shape):
            raise ValueError(f"{name} must be an integer tensor of shape {shape}, got "
                             f"{getattr(domains, 'dtype', type(domains).__name__)} "
                             f"{tuple(getattr(domains, 'shape', ()))}")
        domains = domains.to(torch.int64)
        check_range(domains, 0, g,
                    f"{name} holds domain ids outside [0, {g}) (num_domains={g}; set it from the data set)")
        return domains

    # ------------------------------------------------------------ encoders
    def encode_global(self, items: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """items, domains (B, L) → global encoder states g (B, L, D) over the mixed sequence."""
        padding = items == 0
        inputs = self.item_embedding(items) + self.domain_embedding(domains)
        return self.global_encoder(inputs, positions_from_padding(padding), padding)

    def encode_local(self, items: torch.Tensor, domains: torch.Tensor, domain: int) -> torch.Tensor:
        """Local encoder of `domain` on the mixed batch: (B, L, D), meaningful at that domain's
        positions (keys of padding and of other domains are hidden; positions count that domain's
        items only, so the result equals the encoder run on the domain's own subsequence)."""
        own = (items != 0) & (domains == domain)
        positions = (own.long().cumsum(dim=1) - 1).clamp_min(0)
        return self.local_encoders[domain](self.item_embedding(items), positions, ~own)

    def local_states(self, items: torch.Tensor, domains: torch.Tensor, domain: int,
                     last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """s_d(t): the local output at the latest `domain` position <= t, else the learned empty
        vector. Returns (states (B, Lq, D), last (B, Lq) int64 index or -1); Lq = 1 with last_only."""
        h = self.encode_local(items, domains, domain)
        last = last_index((items != 0) & (domains == domain))
        if last_only:
            last = last[:, -1:]
        gathered = h.gather(1, last.clamp_min(0).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        empty = self.local_empty[domain].to(h.dtype)
        return torch.where((last >= 0).unsqueeze(-1), gathered, empty), last

    def local_features(self, items: torch.Tensor, domains: torch.Tensor, domain: int, glob: torch.Tensor,
                       last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pooled features of the local branch of `domain`, each (B, Lq, D): the local state
        s_d, the local item similarity a_d (query = the latest domain-d item, keys/values = the
        domain-d items so far; both read domain-d items only) and the sequence fusion f_d
        (query = s_d, keys/values = the global states glob (B, L, D) so far)."""
        padding = items == 0
        emb = self.item_embedding(items)
        causal = not last_only
        state, last = self.local_states(items, domains, domain, last_only)
        query = self.item_embedding(items.gather(1, last.clamp_min(0)) * (last >= 0))  # latest domain-d item
        hidden = padding | (domains != domain)
        similarity = self.local_similarity[domain](query, emb, emb, hidden, causal)
        fused = self.local_fusion[domain](state, glob, glob, padding, causal)
        return state, similarity, fused

    # ------------------------------------------------------------ representations
    def encode(self, items: torch.Tensor, domains: torch.Tensor, target_domains: torch.Tensor,
               last_only: bool = False) -> torch.Tensor:
        """User vectors u(t) = z_loc(t) + z_glob(t).

        items, domains (B, L) int64 (left padded; domain ids in [0, num_domains)); target_domains
        (B, Lq) int64, the domain of the item to predict after each query position. last_only=False:
        every position, Lq = L (causal attention); last_only=True: the last position only, Lq = 1
        (cross attention over the whole history). Returns (B, Lq, D).
        """
        padding = items == 0
        emb = self.item_embedding(items)
        glob = self.encode_global(items, domains)
        causal = not last_only
        rows = slice(items.shape[1] - 1, None) if last_only else slice(None)
        # global part: item similarity (query = the latest item), prototypes pooled by the global state
        g_now = glob[:, rows]
        similarity = self.global_similarity(emb[:, rows], emb, emb, padding, causal)
        groups = self.prototype_attention(glob, padding, last_only)                      # (B, Lq, K, D)
        weights = torch.softmax((groups * g_now.unsqueeze(2)).sum(-1) / math.sqrt(groups.shape[-1]), dim=-1)
        pooled = (weights.unsqueeze(-1) * groups).sum(2)
        vectors = self.global_predict(torch.cat([g_now, similarity, pooled], dim=-1))
        # local part of each row's target domain
        local = torch.zeros_like(vectors)
        for d in range(self.config.num_domains):
            # Every branch runs, also one that no row of the batch targets (it then gets zero
            # gradients): skipping it would need a host read of target_domains, i.e. a device sync.
            wanted = target_domains == d
            z_d = self.local_predict[d](torch.cat(self.local_features(items, domains, d, glob, last_only), dim=-1))
            local = torch.where(wanted.unsqueeze(-1), z_d, local)
        return vectors + local

    # ------------------------------------------------------------ SequentialRecommender
    def sample_negatives(self, targets: torch.Tensor) -> torch.Tensor:
        """(N,) targets → (N, num_negatives) items, each uniform over 1..num_items without its row's
        target (`blocks.sample_negatives`: one draw each, no redraw loop; torch's RNG)."""
        return sample_negatives(targets, self.config.num_items, self.config.num_negatives)

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        shape = tuple(batch.items.shape)
        domains = self._check_domains("batch.domains", batch.domains, shape)
        target_domains = self._check_domains("batch.target_domains", batch.target_domains, shape)
        vectors = self.encode(batch.items, domains, target_domains)
        rows = vectors.reshape(-1, vectors.shape[-1])  # every position; those without a target are masked
        targets = flat_targets(batch)
        negatives = self.sample_negatives(targets)
        sampled_ce = sampled_softmax_loss(rows, targets, negatives, self.item_embedding.weight, targets != 0)
        proto = self.prototype_attention.regularizer()
        if self.config.proto_weight > 0:
            loss = sampled_ce + self.config.proto_weight * proto
        else:
            loss, proto = sampled_ce, proto.detach()
        return {"loss": loss, "sampled_ce": sampled_ce, "proto": proto}

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        b = batch.items.shape[0]
        domains = self._check_domains("batch.domains", batch.domains, tuple(batch.items.shape))
        target_domain = self._check_domains("batch.target_domain", batch.target_domain, (b,))
        return self.encode(batch.items, domains, target_domain.unsqueeze(1), last_only=True)[:, 0]

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.item_embedding.weight, None


SPEC = ModelSpec(
    name="man", config_cls=MANConfig, model_cls=MAN,
    presets={
        # num_prototypes 8, num_negatives 100 and proto_weight 0.1 are our choices (module docstring)
        "small": {**SMALL, "num_prototypes": 8, "num_negatives": 100, "proto_weight": 0.1},
        # the official code (Guanyu-Lin/MAN): the flags of examples/00_quick_start/sequential.py (num_groups
        # 10 prototypes, train_num_ngs 9 negatives per positive, max_seq_length 20, lr 1e-3, batch_size 20
        # training instances, i.e. targets, 100 epochs) and its SASRec backbone, the one these encoders
        # follow (models/sequential/sasrec.py: 2 blocks, 1 head, width 32 = its 24-wide item and 8-wide
        # category embeddings concatenated, here one 32-wide item table; feed-forward width = width;
        # dropout 0). Its default backbone is SURGE, a graph model not built here. Unknown in a form that
        # maps here, so kept from "small": the prototype regularizer's weight (0.1); its L2 terms (embed_l2,
        # layer_l2 1e-2 on the batch's embeddings) are not a weight decay and are left out.
        "paper": {"hidden": 32, "layers": 2, "heads": 1, "inner": 32, "dropout": 0.0, "attn_dropout": 0.0,
                  "num_prototypes": 10, "num_negatives": 9, "proto_weight": 0.1, "max_len": 20, "lr": 1e-3,
                  "batch_size": 20, "epochs": 100},
    })
