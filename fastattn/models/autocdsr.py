"""AutoCDSR and AutoCDSR+ (Ju et al., KDD 2025, "Revisiting Self-attention for Cross-domain
Sequential Recommendation"; official code snap-research/AutoCDSR), on fastattn's kernels.

AutoCDSR: one Transformer over the mixed-domain history; its attention also returns, from the
fused kernel (math: fastattn/ops/attention/__init__.py), the cross-domain attention mass of every query row::

    x_0 = Dropout(LayerNorm(E[items] + P[pos]))             as SASRec's "ce" recipe
    (x_l, acd_l) = Layer_l(x_{l-1}, domains)                 causal, key padding mask
    acd_l[b, h, i] = Σ_j P_l[b, h, i, j] · [d(x_i) != d(x_j)]
    rec = mean_n [logsumexp_j x_L,n·E_j − x_L,n·E_{y_n}]       full softmax over valid positions
    acd = mean of acd_l[b, h, i] over valid query rows (item != 0), heads and layers
    score(b, t, j) = x_L[b, t] · E[j]                        tied item table

AutoCDSR+: K learned information-bottleneck (IB) tokens in front of the left-padded history,
one encoder stack per domain, then a shared stack::

    z_0 = Dropout(LayerNorm([B_1..B_K ; E[items] + P[pos]]))          (B, K + L, D), IB tokens have no position
    domain encoder d, layer l:  z^d_l = Layer^d_l(z^d_{l-1})  with keys = IB tokens + items of domain d
                                (key padding mask: padding and other domains hidden), causal
    after each layer:           z^d_l[:, :K] ← mean_d z^d_l[:, :K]    (the IB tokens carry what crosses domains)
    item state:                 u_t = z^{d(t)}_{last}[:, K + t]      (each item from its own domain's encoder)
    merge (official code):      m = LayerNorm(x_0 + u)                residual to the input embedding
    shared encoder:             causal Transformer layers over the merged items (IB tokens dropped, as
                                in the official code), key padding mask
    acd = mean over valid items t, heads, domain layers of Σ_{j IB} P^{d(t)}[t, j]
          (the attention an item puts on the IB tokens in its own domain encoder: in AutoCDSR+ the
          only cross-domain path, so the official code regularizes exactly this — its
          `attention_score` — with the Pareto plugin). It runs on the fused kernel too: the IB
          tokens get the domain id `num_domains`, so "keys of another domain" = IB keys there.

Loss (both models), ordered as in the official code L = (acd, rec):

- acd_mode="fixed": loss = rec + acd_weight · acd (the official linear-scalar loop).
- acd_mode="pareto": g_acd, g_rec = gradients of acd and rec on the shared parameters (every
  parameter except the item embedding table, which the official code leaves out: ignore_table)
  by `torch.autograd.grad(..., retain_graph=True)`; weights (w_acd, w_rec) = Pareto MTL
  (`fastattn.models.pareto`) with preference vectors p_k = (cos(kπ/2K), sin(kπ/2K)), k = 0..K
  (K = pareto_vectors), region Ω_k (k = pareto_region), l2-normalized gradients; optionally a
  feasibility phase for the first pareto_init_steps training steps. loss = w_rec·rec + w_acd·acd
  with the weights detached, so one ordinary backward trains the model. pareto_scale="rec"
  divides both weights by w_rec (the official `loss + acd · w_acd / w_rec`: the recommendation
  gradient keeps its scale, so learning rates carry over from SASRec); "sum" keeps Σ|w| = 1.
  When either gradient is zero on the shared parameters (a batch without any cross-domain pair
  has acd ≡ 0), the step is the plain recommendation step (w_acd = 0, w_rec = 1).

Defaults reproduce the official configuration: its preference list [(0,1), (1,0), (.707,.707)]
on (acd, rec) is `preference_vectors(2)`; its region index 1 — DESIGN's "Ω_1" — is the vector
(1, 0), which is k = 0 here. So pareto_vectors=2, pareto_region=0.

Deviations from the paper / official code, and why:
- Causal next-item (SASRec-style) training at every position instead of BERT4Rec's bidirectional
  masked-item objective: the project's batches and evaluation are causal. Consequence for
  AutoCDSR+: IB tokens sit before every item, so under the causal mask they attend only to IB
  tokens — they never read the history (an IB token that did would leak later items into earlier
  predictions). They still give every item a learned, domain-shared attention target, and their
  states are averaged across domain encoders after each layer as specified, but cross-domain
  mixing then happens only in the shared encoder. A bidirectional objective would restore the
  paper's IB communication; the layers accept causal=False for that.
- acd of AutoCDSR+ sums the attention over the K IB keys (the mass on the IB tokens, in [0, 1])
  where the official code takes the mean over them (a factor 1/K); rows are the valid items in
  their own domain encoder (the official mean also includes padding and other-domain rows), and
  the result is averaged over layers and domain encoders (the official code sums them).
- Absolute learned positions, post-LN RecBole layers and a dot-product score (the evaluation
  loop ranks by user_vector · E[j]) instead of T5 layers with relative position bias and cosine
  scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..data.batch import EvalBatch, TrainBatch
from .base import SequentialRecommender
from .blocks import (EncoderConfig, TransformerLayer, check_choice, check_finite, check_int, check_items, check_range,
                     flat_targets, full_softmax_loss, init_weights, positions_from_padding)
from .pareto import (NORMALIZATIONS, pareto_mtl_init_weights_from_gram, pareto_mtl_weights_from_gram,
                     preference_vectors)

ACD_MODES = ("pareto", "fixed")
PARETO_SCALES = ("rec", "sum")

__all__ = ["ACD_MODES", "PARETO_SCALES", "AutoCDSR", "AutoCDSRConfig", "AutoCDSRPlus", "AutoCDSRPlusConfig"]


@dataclass(kw_only=True)
class AutoCDSRConfig(EncoderConfig):
    """AutoCDSR options: the `EncoderConfig` fields plus

    num_domains: number of domains (>= 1, from the data set: `SequenceDataset.num_domains`);
        batches must carry domain ids in [0, num_domains).
    acd_mode: "pareto" (Pareto multi-task weights every step) | "fixed" (loss = rec + acd_weight·acd).
    acd_weight: the fixed weight λ of acd (finite; 0 trains the recommendation loss only, a
        negative value would reward cross-domain attention). Only used by acd_mode="fixed".
    pareto_vectors: K >= 1, the preference vectors p_k = (cos(kπ/2K), sin(kπ/2K)), k = 0..K, on
        the loss vector (acd, rec). Default 2: the official set {(1,0), (.707,.707), (0,1)}.
    pareto_region: k in [0, K], the region Ω_k the solution is kept in. Default 0: p_0 = (1, 0),
        the official code's region (its index 1 into [(0,1), (1,0), (.707,.707)]).
    pareto_normalization: gradient normalization before the min-norm solve: "l2" (official) |
        "none" | "loss" | "loss+" (see `fastattn.models.pareto`).
    pareto_scale: "rec" (divide the weights by w_rec: loss = rec + (w_acd/w_rec)·acd, official) |
        "sum" (Σ|w| = 1).
    pareto_init_steps: training steps (calls of `losses` in training mode) that run Pareto MTL's
        feasibility phase while the losses lie outside Ω_k (0 = none, as in the official code).
    """

    num_domains: int
    acd_mode: str = "pareto"
    acd_weight: float = 0.1
    pareto_vectors: int = 2
    pareto_region: int = 0
    pareto_normalization: str = "l2"
    pareto_scale: str = "rec"
    pareto_init_steps: int = 0

    def validate(self) -> None:
        super().validate()
        check_int("num_domains", self.num_domains)
        check_choice("acd_mode", self.acd_mode, ACD_MODES)
        check_finite("acd_weight", self.acd_weight)
        check_int("pareto_vectors", self.pareto_vectors)
        if (not isinstance(self.pareto_region, int) or isinstance(self.pareto_region, bool)
                or not 0 <= self.pareto_region <= self.pareto_vectors):
            raise ValueError(f"pareto_region must be an int in [0, pareto_vectors={self.pareto_vectors}], "
                             f"got {self.pareto_region!r}")
        check_choice("pareto_normalization", self.pareto_normalization, NORMALIZATIONS)
        check_choice("pareto_scale", self.pareto_scale, PARETO_SCALES)
        check_int("pareto_init_steps", self.pareto_init_steps, minimum=0)


@dataclass(kw_only=True)
class AutoCDSRPlusConfig(AutoCDSRConfig):
    """AutoCDSR+ options: the `AutoCDSRConfig` fields plus

    num_ib_tokens: K >= 1 information-bottleneck tokens (official: 4).
    domain_layers: depth (>= 1) of each domain's encoder; IB states are averaged after every layer.
    shared_layers: depth (>= 0) of the shared encoder after the merge; None = `layers`.
    """

    num_ib_tokens: int = 4
    domain_layers: int = 2
    shared_layers: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        check_int("num_ib_tokens", self.num_ib_tokens)
        check_int("domain_layers", self.domain_layers)
        if self.shared_layers is not None:
            check_int("shared_layers", self.shared_layers, minimum=0)

    @property
    def num_shared_layers(self) -> int:
        """shared_layers, or `layers` when it is None."""
        return self.layers if self.shared_layers is None else self.shared_layers


def check_domains(batch: Union[TrainBatch, EvalBatch], num_domains: int) -> torch.Tensor:
    """batch.domains as (B, L) int64, or ValueError naming it (missing, wrong shape/dtype, ids out of range)."""
    domains = batch.domains
    if domains is None:
        raise ValueError("batch.domains is None: AutoCDSR needs the domain id of every history item "
                         "(a data set with domains, e.g. make_synthetic or the crossdomain files)")
    if (not isinstance(domains, torch.Tensor) or domains.dtype.is_floating_point or domains.dtype == torch.bool
            or domains.shape != batch.items.shape):
        raise ValueError(f"batch.domains must be an integer tensor shaped like items {tuple(batch.items.shape)}, "
                         f"got {getattr(domains, 'dtype', type(domains).__name__)} "
                         f"{tuple(getattr(domains, 'shape', ()))}")
    domains = domains.long()
    check_range(domains, 0, num_domains,
                f"batch.domains holds ids outside [0, {num_domains}) (num_domains={num_domains})")
    return domains


def _row_sum(acd: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ over heads and the rows marked in rows (B, L) of acd (B, H, L) (the caller divides)."""
    return (acd * rows[:, None, :].to(acd.dtype)).sum()


class _ACDRecommender(SequentialRecommender):
    """Shared by both models: the item table, the input embedding and the rec/acd combination."""

    config: AutoCDSRConfig

    def _build_inputs(self, config: AutoCDSRConfig) -> None:
        self.item_embedding = torch.nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)
        self.position_embedding = torch.nn.Embedding(config.max_len, config.hidden)
        self.norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = torch.nn.Dropout(config.dropout)
        # the last Pareto weights (w_acd, w_rec) as used in the loss, and the training steps taken
        self.register_buffer("pareto_weights", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.register_buffer("pareto_steps", torch.zeros((), dtype=torch.int64))

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) → E[items] + P[pos] (B, L, D), positions counted from each row's first item."""
        return self.item_embedding(items) + self.position_embedding(positions_from_padding(items == 0))

    def shared_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every trainable parameter the Pareto gradients are taken on: all but
        the item embedding table (official ignore_table)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and n != "item_embedding.weight"]

    def _flat_grad(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])

    def task_weights(self, rec: torch.Tensor, acd: torch.Tensor) -> tuple[float, float]:
        """(w_acd, w_rec) for this step (see the module docstring); updates `pareto_weights`.

        "fixed" reads nothing on the host. "pareto" solves a small quadratic program on the host:
        its inputs (the 2×2 Gram matrix of the two gradients, both losses and the step count) come
        over in one device→host read per step (`_to_host`), and the weights go back as Python floats.
        """
        cfg = self.config
        if cfg.acd_mode == "fixed":
            return float(cfg.acd_weight), 1.0
        if not (torch.is_grad_enabled() and rec.requires_grad and acd.requires_grad):
            w = self.pareto_weights  # no graph (e.g. under torch.no_grad): the last step's weights
            return float(w[0]), float(w[1])
        params = [p for _, p in self.shared_parameters()]
        grads = torch.stack([self._flat_grad(acd, params), self._flat_grad(rec, params)]).double()
        gram = grads @ grads.T
        packed = torch.stack([gram[0, 0], gram[0, 1], gram[1, 1], acd.detach().double(), rec.detach().double(),
                              self.pareto_steps.double()])
        g00, g01, g11, acd_value, rec_value, steps = self._to_host(packed).tolist()
        if not (g00 > 0 and g11 > 0):
            w_acd, w_rec = 0.0, 1.0  # one task is stationary here: MGDA would stop the other one too
        else:
            w_acd, w_rec = self._pareto_solve(torch.tensor([[g00, g01], [g01, g11]], dtype=torch.float64),
                                              torch.tensor([acd_value, rec_value], dtype=torch.float64), steps)
        if self.training:
            self.pareto_steps += 1
        self.pareto_weights.copy_(torch.tensor([w_acd, w_rec], dtype=torch.float64))
        return w_acd, w_rec

    def _to_host(self, packed: torch.Tensor) -> torch.Tensor:
        """The Pareto step's one device→host read: packed (6,) float64 → the same values on the CPU."""
        return packed.cpu()

    def _pareto_solve(self, gram: torch.Tensor, values: torch.Tensor, steps: float) -> tuple[float, float]:
        """(w_acd, w_rec) from the Gram matrix (2, 2) of (g_acd, g_rec) and the losses (acd, rec), on the CPU."""
        cfg = self.config
        prefs = preference_vectors(cfg.pareto_vectors)
        weights = None
        if self.training and steps < cfg.pareto_init_steps:
            weights = pareto_mtl_init_weights_from_gram(gram, values, prefs, cfg.pareto_region,
                                                        normalization=cfg.pareto_normalization)
        if weights is None:
            weights = pareto_mtl_weights_from_gram(gram, values, prefs, cfg.pareto_region,
                                                   normalization=cfg.pareto_normalization)
        w_acd, w_rec = float(weights[0]), float(weights[1])
        if cfg.pareto_scale == "rec" and w_rec > 1e-12:
            w_acd, w_rec = w_acd / w_rec, 1.0
        return w_acd, w_rec

    def _task_losses(self, batch: TrainBatch, hidden: torch.Tensor, acd: torch.Tensor) -> dict[str, torch.Tensor]:
        # every position; those without a target are masked (no boolean gather: no device sync)
        rec = full_softmax_loss(hidden.reshape(-1, hidden.shape[-1]), flat_targets(batch), self.item_embedding.weight,
                                self.config.backend)
        return {"rec": rec, "acd": acd}

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return self.combine_loss_terms(self.loss_terms(batch))

    def combine_loss_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"rec", "acd"} (with their graphs) → {"loss", "rec", "acd", "w_acd"}.

        Kept out of `loss_terms` so that a compiled training step (fastattn.training_step)
        captures the whole forward and both task losses in one graph while the Pareto weights
        (torch.autograd.grad through that graph's compiled backward, then the small host solve
        and the Python-float weights, which would break the graph and, as guarded constants,
        recompile it every step) stay eager."""
        rec, acd = terms["rec"], terms["acd"]
        w_acd, w_rec = self.task_weights(rec, acd)
        loss = w_rec * rec + w_acd * acd
        return {"loss": loss, "rec": rec.detach(), "acd": acd.detach(),
                "w_acd": torch.tensor(w_acd, dtype=torch.float32)}

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.item_embedding.weight, None


class AutoCDSR(_ACDRecommender):
    """AutoCDSR: a causal Transformer over the mixed-domain sequence, rec loss and the fused a_cd,
    combined by Pareto MTL or a fixed weight (module docstring).

    losses(TrainBatch with domains) → {"loss", "rec", "acd", "w_acd"}; user_vectors(EvalBatch) →
    (B, D) state at column L-1 (domains not needed: they only enter the a_cd loss);
    item_table() → (item embedding (num_items+1, D), None).
    """

    def __init__(self, config: AutoCDSRConfig) -> None:
        super().__init__()
        if not isinstance(config, AutoCDSRConfig) or isinstance(config, AutoCDSRPlusConfig):
            raise TypeError(f"config must be an AutoCDSRConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self._build_inputs(config)
        self.layers = torch.nn.ModuleList(TransformerLayer(config) for _ in range(config.layers))
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor, domains: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """items (B, L) → (hidden (B, L, D), acd): with domains (B, L), acd is the scalar mean of
        a_cd over valid query rows, heads and layers (0 without valid rows); else None."""
        hidden, per_layer = self._run_layers(items, domains)
        if domains is None:
            return hidden, None
        valid = items != 0
        total = torch.stack([_row_sum(acd, valid) for acd in per_layer]).sum()  # float32, as acd
        count = valid.sum() * (self.config.heads * len(self.layers))  # a tensor: no device sync
        return hidden, total / count.clamp_min(1)

    def acd_per_layer(self, items: torch.Tensor, domains: torch.Tensor) -> list[torch.Tensor]:
        """The raw a_cd (B, H, L) float32 of every layer (for inspection and tests)."""
        return self._run_layers(items, domains)[1]

    def _run_layers(self, items: torch.Tensor, domains: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(hidden (B, L, D), each layer's a_cd (B, H, L); empty without domains)."""
        padding = items == 0
        x = self.dropout(self.norm(self.embed_items(items)))
        per_layer: list[torch.Tensor] = []
        for layer in self.layers:
            if domains is None:
                x = layer(x, key_padding_mask=padding)
            else:
                x, acd = layer(x, key_padding_mask=padding, domains=domains)
                per_layer.append(acd)
        return x, per_layer

    def loss_terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        domains = check_domains(batch, self.config.num_domains)
        hidden, acd = self.encode(batch.items, domains)
        assert acd is not None
        return self._task_losses(batch, hidden, acd)

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        return self.encode(batch.items)[0][:, -1]


class AutoCDSRPlus(_ACDRecommender):
    """AutoCDSR+: IB tokens, per-domain encoders with domain key masks, IB averaging, a shared
    encoder (module docstring); a_cd = attention on the IB tokens, combined like AutoCDSR.

    losses(TrainBatch with domains) → {"loss", "rec", "acd", "w_acd"}; user_vectors(EvalBatch
    with domains) → (B, D) state of the last item (column L-1 of the item part);
    item_table() → (item embedding (num_items+1, D), None). `encode(..., stage="domain")`
    returns the item states right after the domain encoders (before the merge), for inspection.
    """

    def __init__(self, config: AutoCDSRPlusConfig) -> None:
        super().__init__()
        if not isinstance(config, AutoCDSRPlusConfig):
            raise TypeError(f"config must be an AutoCDSRPlusConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self._build_inputs(config)
        self.ib_embedding = torch.nn.Embedding(config.num_ib_tokens, config.hidden)
        self.domain_encoders = torch.nn.ModuleList(
            torch.nn.ModuleList(TransformerLayer(config) for _ in range(config.domain_layers))
            for _ in range(config.num_domains))
        self.fusion_norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.shared_encoder = torch.nn.ModuleList(
            TransformerLayer(config) for _ in range(config.num_shared_layers))
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor, domains: torch.Tensor, stage: str = "shared"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """items, domains (B, L) → (states (B, L, D) of the items, acd scalar).

        stage="shared": the output of the shared encoder (what predictions use); "domain": each
        item's state from its own domain encoder, before the merge. acd = mean attention mass on
        the IB tokens over valid items (in their own domain encoder), heads and domain layers.
        """
        check_choice("stage", stage, ("shared", "domain"))
        cfg = self.config
        b, length = items.shape
        k = cfg.num_ib_tokens
        padding = items == 0
        ib = self.ib_embedding.weight.unsqueeze(0).expand(b, k, cfg.hidden)
        x_items = self.embed_items(items)
        z0 = self.dropout(self.norm(torch.cat([ib, x_items], dim=1)))  # (B, K + L, D)
        # the IB tokens get a domain id of their own, so the kernel's a_cd of an item in its own
        # domain encoder (keys: IB + own-domain items) is exactly its attention mass on the IB tokens
        dom_full = torch.cat([domains.new_full((b, k), cfg.num_domains), domains], dim=1)
        ib_visible = padding.new_zeros(b, k)
        own = [(~padding) & (domains == d) for d in range(cfg.num_domains)]
        masks = [torch.cat([ib_visible, ~rows], dim=1) for rows in own]  # True = hidden key
        states = [z0] * cfg.num_domains
        total = z0.new_zeros((), dtype=torch.float32)
        for layer_index in range(cfg.domain_layers):
            for d, encoder in enumerate(self.domain_encoders):
                states[d], acd = encoder[layer_index](states[d], key_padding_mask=masks[d], domains=dom_full)
                total = total + _row_sum(acd[:, :, k:], own[d])
            ib_mean = torch.stack([s[:, :k] for s in states]).mean(dim=0)
            states = [torch.cat([ib_mean, s[:, k:]], dim=1) for s in states]
        count = (~padding).sum() * (cfg.heads * cfg.domain_layers)  # a tensor: no device sync
        acd_mean = total / count.clamp_min(1)
        # each item from its own domain's encoder (padded slots: 0; they are never read)
        item_states = sum(s[:, k:] * rows.unsqueeze(-1).to(s.dtype) for s, rows in zip(states, own))
        assert isinstance(item_states, torch.Tensor)
        if stage == "domain":
            return item_states, acd_mean
        h = self.fusion_norm(z0[:, k:] + item_states)
        for layer in self.shared_encoder:
            h = layer(h, key_padding_mask=padding)
        return h, acd_mean

    def loss_terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        check_items(batch, self.config.num_items, self.config.max_len)
        domains = check_domains(batch, self.config.num_domains)
        hidden, acd = self.encode(batch.items, domains)
        return self._task_losses(batch, hidden, acd)

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        domains = check_domains(batch, self.config.num_domains)
        return self.encode(batch.items, domains)[0][:, -1]
