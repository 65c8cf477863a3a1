"""AutoCDSR and AutoCDSR+ (Ju et al., KDD 2025, "Revisiting Self-attention for Cross-domain
Sequential Recommendation"; official code snap-research/AutoCDSR), on fastattn's kernels. This
module holds AutoCDSR and what both share; AutoCDSR+ is `fastattn.models.autocdsr_plus`.

AutoCDSR: one Transformer over the mixed-domain history; its attention also returns, from the
fused kernel (math: docs/design.md, "The cross-domain attention mass a_cd"), the cross-domain
attention mass of every query row::

    x_0 = Dropout(LayerNorm(E[items] + P[pos]))             as SASRec's "ce" recipe
    (x_l, acd_l) = Layer_l(x_{l-1}, domains)                 causal (see Backbones), key padding mask
    acd_l[b, h, i] = Σ_j P_l[b, h, i, j] · [d(x_i) != d(x_j)]
    rec = mean_n [logsumexp_j x_L,n·E_j − x_L,n·E_{y_n}]       full softmax over valid positions (loss="ce")
    acd = mean of acd_l[b, h, i] over valid query rows (item != 0), heads and layers
    score(b, t, j) = x_L[b, t] · E[j]                        tied item table

AutoCDSR+: K learned information-bottleneck (IB) tokens in front of the left-padded history,
one encoder stack per domain, then a shared stack::

    z_0 = Dropout(LayerNorm([B_1..B_K ; E[items] + P[pos]]))          (B, K + L, D), IB tokens have no position
    domain encoder d, layer l:  z^d_l = Layer^d_l(z^d_{l-1})  with keys = IB tokens + items of domain d
                                (key padding mask: padding and other domains hidden), causal (see Backbones)
    after each layer:           z^d_l[:, :K] ← mean_d z^d_l[:, :K]    (the IB tokens carry what crosses domains)
    item state:                 u_t = z^{d(t)}_{last}[:, K + t]      (each item from its own domain's encoder)
    merge (official code):      m = LayerNorm(x_0 + u)                residual to the input embedding
    shared encoder:             Transformer layers over the merged items (IB tokens dropped, as in the
                                official code), key padding mask, causal (see Backbones)
    acd = mean over valid items t, heads, domain layers of Σ_{j IB} P^{d(t)}[t, j]
          (the attention an item puts on the IB tokens in its own domain encoder: in AutoCDSR+ the
          only cross-domain path, so the official code regularizes exactly this — its
          `attention_score` — with the Pareto plugin). It runs on the fused kernel too: the IB
          tokens get the domain id `num_domains`, so "keys of another domain" = IB keys there.

Backbones (`backbone`, both models):

- "causal" (default): next-item training at every position, as SASRec — the formulas above with
  the causal mask in every attention; a prediction is the state of the last item.
- "bidirectional": BERT4Rec's Cloze objective (`fastattn.models.bert4rec`; `encoder.ClozeBlock`
  holds what they share). The training sequence is s = [items, last target] (the oldest column
  dropped at max_len) with domains [domains, target_domains[:, -1]]; each real position is
  replaced by [MASK] (m = num_items + 1, an extra row of E) with probability mask_prob, at least
  one per row, drawn afresh every step from torch's RNG; every attention runs with causal=False
  (key padding mask only); rec is taken over the masked positions only (targets 0 elsewhere); a
  prediction is the state at a [MASK] appended after the history. Where a [MASK] sits in the
  domain structure: AutoCDSR keeps its position's domain id, which enters a_cd only (the hidden
  states never read a domain id, so nothing is revealed to the prediction). AutoCDSR+ follows the
  official code (`create_domain_mask`: the domain of a masked token is what it hides, unknown at
  prediction): a [MASK] is a query and a key in every domain encoder, its domain id there is that
  encoder's (so its a_cd is its mass on the IB tokens, as for the domain's items) and its merged
  state u_t is the sum of its states over the domain encoders. The IB tokens then attend to, and
  are attended by, the items of each domain encoder, and their states are averaged across domains
  after every layer: an item of another domain reaches a domain encoder only through them.

Item loss (`loss`, both backbones): "ce" = the full softmax above; "inbatch" = the AutoCDSR code's
in-batch contrastive loss (`blocks.in_batch_softmax_loss`, temperature tau), on the same rows and
targets; item_table() is then L2-normalised (the cosine that loss trains).

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
on (acd, rec) is `preference_vectors(2)`; its region index 1 — the "Ω_1" of docs/design.md, section
"AutoCDSR's Pareto weighting" — is the vector (1, 0), which is k = 0 here. So pareto_vectors=2, pareto_region=0.

Deviations from the paper / official code, and why:
- The default backbone is causal next-item (SASRec-style) training at every position, where the
  official code trains a bidirectional masked-item objective (backbone="bidirectional" here).
  Consequence for AutoCDSR+ on the causal backbone: IB tokens sit before every item, so under the
  causal mask they attend only to IB tokens — they never read the history (an IB token that did
  would leak later items into earlier predictions). They still give every item a learned,
  domain-shared attention target, and their states are averaged across domain encoders after each
  layer as specified, but cross-domain mixing then happens only in the shared encoder. The
  bidirectional backbone restores the paper's IB communication.
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
from .blocks import (append_column, check_choice, check_finite, check_int, check_items, check_range, flat_targets,
                     init_weights)
from .config import ClozeConfig, catalog_field, check_config, option
from .encoder import ClozeBlock, TransformerStack
from .pareto import (NORMALIZATIONS, pareto_mtl_init_weights_from_gram, pareto_mtl_weights_from_gram,
                     preference_vectors)
from .spec import SMALL, ModelSpec

ACD_MODES = ("pareto", "fixed")
PARETO_SCALES = ("rec", "sum")
BACKBONES = ("causal", "bidirectional")

__all__ = ["ACD_MODES", "BACKBONES", "PARETO_SCALES", "AutoCDSR", "AutoCDSRConfig", "check_domains"]


@dataclass(kw_only=True)
class AutoCDSRConfig(ClozeConfig):
    """AutoCDSR options: the `ClozeConfig` fields (the `EncoderConfig` ones, mask_prob — read by the
    bidirectional backbone only —, loss "ce" | "inbatch" and tau) plus

    num_domains: number of domains (>= 1, from the data set: `SequenceDataset.num_domains`; None
        until it is known); batches must carry domain ids in [0, num_domains).
    backbone: "causal" (next-item training at every position, as SASRec) | "bidirectional" (the
        Cloze objective of BERT4Rec; module docstring, "Backbones").
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

    num_domains: Optional[int] = catalog_field()
    backbone: str = option("causal", "causal (next item at every position, as sasrec) | bidirectional (cloze "
                                     "training with --mask-prob, as bert4rec)")
    acd_mode: str = option("pareto", "pareto (Pareto MTL weights each step) | fixed (rec + acd_weight * a_cd)")
    acd_weight: float = option(0.1, "weight of the mean a_cd in --acd-mode fixed")
    pareto_vectors: int = option(2, "K, preference vectors p_k = (cos k*pi/2K, sin k*pi/2K), k = 0..K")
    pareto_region: int = option(0, "k of the region Omega_k the solution is kept in")
    pareto_normalization: str = option("l2", "gradient normalization before the min-norm solve: "
                                             "l2 | none | loss | loss+")
    pareto_scale: str = option("rec", "rec (loss = rec + w_acd/w_rec * a_cd) | sum (|w_acd| + |w_rec| = 1)")
    pareto_init_steps: int = option(0, "training steps of Pareto MTL's feasibility phase (0 = none)")

    def validate(self) -> None:
        super().validate()
        if self.num_domains is not None:
            check_int("num_domains", self.num_domains)
        check_choice("backbone", self.backbone, BACKBONES)
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


def check_domains(batch: Union[TrainBatch, EvalBatch], num_domains: int, field: str = "domains") -> torch.Tensor:
    """batch.domains (or batch.target_domains with field="target_domains") as (B, L) int64, or
    ValueError naming it (missing, wrong shape/dtype, ids out of range)."""
    domains = getattr(batch, field)
    if domains is None:
        need = ("the domain id of every history item" if field == "domains" else
                "the domain of the last target (the bidirectional backbone appends it to the sequence)")
        raise ValueError(f"batch.{field} is None: AutoCDSR needs {need} "
                         "(a data set with domains, e.g. make_synthetic or the crossdomain files)")
    if (not isinstance(domains, torch.Tensor) or domains.dtype.is_floating_point or domains.dtype == torch.bool
            or domains.shape != batch.items.shape):
        raise ValueError(f"batch.{field} must be an integer tensor shaped like items {tuple(batch.items.shape)}, "
                         f"got {getattr(domains, 'dtype', type(domains).__name__)} "
                         f"{tuple(getattr(domains, 'shape', ()))}")
    domains = domains.long()
    check_range(domains, 0, num_domains,
                f"batch.{field} holds ids outside [0, {num_domains}) (num_domains={num_domains})")
    return domains


def _row_sum(acd: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ over heads and the rows marked in rows (B, L) of acd (B, H, L) (the caller divides)."""
    return (acd * rows[:, None, :].to(acd.dtype)).sum()


class _ACDRecommender(SequentialRecommender, ClozeBlock):
    """Shared by AutoCDSR and AutoCDSR+ (`fastattn.models.autocdsr_plus`): the input embedding and
    the backbone's training and prediction inputs and item loss (`ClozeBlock`), and the rec/acd
    combination. Subclasses define encode(items, domains) → (hidden (B, L, D), acd scalar)."""

    config: AutoCDSRConfig

    def _build_inputs(self, config: AutoCDSRConfig) -> None:
        self.build_embedding(config, mask_row=config.backbone == "bidirectional")
        # the last Pareto weights (w_acd, w_rec) as used in the loss, and the training steps taken
        self.register_buffer("pareto_weights", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.register_buffer("pareto_steps", torch.zeros((), dtype=torch.int64))

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

    @property
    def bidirectional(self) -> bool:
        """True for backbone="bidirectional": Cloze training, attention with causal=False."""
        return self.config.backbone == "bidirectional"

    def encode(self, items: torch.Tensor, domains: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def training_inputs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items, domains, targets), each (B, L') int64, that the encoder and the item loss read.

        causal: the batch's items and domains, and each position's next item where it has one
        (`flat_targets`, 0 elsewhere; L' = L). bidirectional: one Cloze draw (`ClozeBlock.cloze`:
        [MASK]ed inputs and targets only at the masked positions) over [items, last target], and
        the domains [domains, target_domains[:, -1]] (L' = min(L + 1, max_len)).
        """
        check_items(batch, self.config.num_items, self.config.max_len)
        domains = check_domains(batch, self.config.num_domains)
        if not self.bidirectional:
            return batch.items, domains, flat_targets(batch)
        last = check_domains(batch, self.config.num_domains, "target_domains")[:, -1:]
        inputs, targets = self.cloze(batch)
        return inputs, append_column(domains, last, self.config.max_len), targets

    def prediction_inputs(self, items: torch.Tensor, domains: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The history (B, L) (and its domains, or None) as the encoder reads it to predict the next
        item at its last column: unchanged (causal), or with a [MASK] appended (bidirectional; the
        oldest column dropped at max_len). The [MASK]'s domain id is never read — AutoCDSR's
        predictions read no domain, AutoCDSR+ puts a [MASK] in every domain encoder — so it is 0."""
        if not self.bidirectional:
            return items, domains
        if domains is not None:
            domains = append_column(domains, torch.zeros_like(domains[:, :1]), self.config.max_len)
        return self.append_mask(items), domains

    def loss_terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        items, domains, targets = self.training_inputs(batch)
        hidden, acd = self.encode(items, domains)
        assert acd is not None
        # every position; those without a target are masked (no boolean gather: no device sync)
        return {"rec": self.item_loss(hidden, targets), "acd": acd}

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
        return self.ranking_table(), None


class AutoCDSR(_ACDRecommender):
    """AutoCDSR: a Transformer (causal or bidirectional: `backbone`) over the mixed-domain sequence,
    rec loss and the fused a_cd, combined by Pareto MTL or a fixed weight (module docstring).

    losses(TrainBatch with domains; bidirectional: also target_domains) → {"loss", "rec", "acd",
    "w_acd"}; user_vectors(EvalBatch) → (B, D) state at column L-1 (causal) or at a [MASK] appended
    after it (bidirectional) — domains not needed: they only enter the a_cd loss; item_table() →
    (rows 0..num_items of the item embedding (num_items+1, D), L2-normalised for loss="inbatch"; None).
    """

    def __init__(self, config: AutoCDSRConfig) -> None:
        super().__init__()
        # exactly: AutoCDSR+'s config (a subclass) belongs to AutoCDSRPlus
        self.config = check_config(config, AutoCDSRConfig, exact=True)
        self._build_inputs(config)
        self.layers = TransformerStack(config, config.layers)
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor, domains: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """items (B, L) (bidirectional: may hold [MASK] = num_items + 1) → (hidden (B, L, D), acd):
        with domains (B, L), acd is the scalar mean of a_cd over valid query rows (item != 0),
        heads and layers (0 without valid rows); else None."""
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
        x = self.embed(items)
        causal = not self.bidirectional
        if domains is None:
            return self.layers(x, items == 0, causal=causal), []
        return self.layers(x, items == 0, domains=domains, causal=causal)

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        items, _ = self.prediction_inputs(batch.items, None)
        return self.encode(items)[0][:, -1]


SPEC = ModelSpec(
    name="autocdsr", config_cls=AutoCDSRConfig, model_cls=AutoCDSR, needs_domains=True,
    presets={
        # the official Pareto setting (preference (1, 0) on (a_cd, rec)) on the CE backbone
        "small": {**SMALL, "acd_mode": "pareto"},
        # the official KuaiRand run (snap-research/AutoCDSR configs): its backbone hf_transformer_kuairand.yaml
        # over huggingface_model/t5_encoder.yaml (d_model 32, 6 layers, 4 heads, d_ff 32, dropout_rate 0.15,
        # which T5 also applies to the attention probabilities), optim/default.yaml (Adam, lr 1e-4,
        # weight_decay 1e-5), kuairand_dataloader.yaml (sequence_length 800, batch_size_per_device 16
        # sequences; the run's device count is not fixed: devices -1), trainer max_epochs 10. Its per-head
        # width d_kv 32 has no counterpart here (head width = hidden / heads).
        "paper": {"hidden": 32, "layers": 6, "heads": 4, "inner": 32, "dropout": 0.15, "attn_dropout": 0.15,
                  "acd_mode": "pareto", "max_len": 800, "lr": 1e-4, "weight_decay": 1e-5, "batch_size": 16,
                  "batch_unit": "sequences", "epochs": 10},
    })
