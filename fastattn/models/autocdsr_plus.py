"""AutoCDSR+ (Ju et al., KDD 2025): K information-bottleneck tokens in front of the history, one
encoder per domain (keys: the IB tokens and the domain's own items), IB states averaged across
domains after every layer, a shared encoder over the merged items; a_cd = the attention items put
on the IB tokens, combined with the recommendation loss as in AutoCDSR. The math, the backbones
(causal: the IB tokens read no history; bidirectional: they read, and are read by, the items of
every domain encoder, as in the official code), the official settings and the deviations are in
`fastattn.models.autocdsr`'s docstring; this module adds the config, the model and its spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..data.batch import EvalBatch
from .autocdsr import AutoCDSRConfig, _ACDRecommender, _row_sum, check_domains
from .blocks import check_choice, check_int, check_items, init_weights
from .config import check_config, option
from .encoder import TransformerStack
from .spec import SMALL, ModelSpec

__all__ = ["AutoCDSRPlus", "AutoCDSRPlusConfig"]


@dataclass(kw_only=True)
class AutoCDSRPlusConfig(AutoCDSRConfig):
    """AutoCDSR+ options: the `AutoCDSRConfig` fields plus

    num_ib_tokens: K >= 1 information-bottleneck tokens (official: 4).
    domain_layers: depth (>= 1) of each domain's encoder; IB states are averaged after every layer.
    shared_layers: depth (>= 0) of the shared encoder after the merge; None = `layers`.
    """

    num_ib_tokens: int = option(4, "information-bottleneck tokens")
    domain_layers: int = option(2, "layers of each per-domain encoder")
    shared_layers: Optional[int] = option(None, "layers of the shared encoder (default: --layers)")

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


class AutoCDSRPlus(_ACDRecommender):
    """AutoCDSR+: IB tokens, per-domain encoders with domain key masks, IB averaging, a shared
    encoder (module docstring); a_cd = attention on the IB tokens, combined like AutoCDSR.

    losses(TrainBatch with domains; bidirectional: also target_domains) → {"loss", "rec", "acd",
    "w_acd"}; user_vectors(EvalBatch with domains) → (B, D) state of the last item (column L-1 of
    the item part; bidirectional: of a [MASK] appended after it); item_table() → (rows
    0..num_items of the item embedding (num_items+1, D), L2-normalised for loss="inbatch"; None).
    `encode(..., stage="domain")` returns the item states right after the domain encoders (before
    the merge), `stage="ib"` the IB states there, for inspection.
    """

    def __init__(self, config: AutoCDSRPlusConfig) -> None:
        super().__init__()
        self.config = check_config(config, AutoCDSRPlusConfig)
        self._build_inputs(config)
        self.ib_embedding = torch.nn.Embedding(config.num_ib_tokens, config.hidden)
        self.domain_encoders = torch.nn.ModuleList(
            TransformerStack(config, config.domain_layers) for _ in range(config.num_domains))
        self.fusion_norm = torch.nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.shared_encoder = TransformerStack(config, config.num_shared_layers)
        init_weights(self, config.init_std)

    def encode(self, items: torch.Tensor, domains: torch.Tensor, stage: str = "shared"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """items, domains (B, L) → (states (B, L, D) of the items, acd scalar).

        stage="shared": the output of the shared encoder (what predictions use); "domain": each
        item's state from its own domain encoder, before the merge (a [MASK] of the bidirectional
        backbone: the sum of its states in every domain encoder); "ib": the IB states (B, K, D)
        after the last domain layer's averaging. acd = mean attention mass on the IB tokens over
        the valid items in their own domain encoder (and each [MASK] in every one), heads and
        domain layers.
        """
        check_choice("stage", stage, ("shared", "domain", "ib"))
        cfg = self.config
        b, length = items.shape
        k = cfg.num_ib_tokens
        padding = items == 0
        ib = self.ib_embedding.weight.unsqueeze(0).expand(b, k, cfg.hidden)
        x_items = self.embed_items(items)
        z0 = self.normalize_input(torch.cat([ib, x_items], dim=1))  # (B, K + L, D)
        # the IB tokens get a domain id of their own, so the kernel's a_cd of an item in its own
        # domain encoder (keys: IB + own-domain items) is exactly its attention mass on the IB tokens
        ib_domain = domains.new_full((b, k), cfg.num_domains)
        members = [(~padding) & (domains == d) for d in range(cfg.num_domains)]  # the rows of each encoder
        dom_full = [torch.cat([ib_domain, domains], dim=1)] * cfg.num_domains
        if self.bidirectional:
            # a [MASK] belongs to every domain encoder (official create_domain_mask: its domain is
            # what it hides), with that encoder's domain id: its a_cd there is its mass on the IB tokens
            is_mask = items == self.mask_id
            members = [rows | is_mask for rows in members]
            dom_full = [torch.cat([ib_domain, torch.where(is_mask, d, domains)], dim=1)
                        for d in range(cfg.num_domains)]
        ib_visible = padding.new_zeros(b, k)
        masks = [torch.cat([ib_visible, ~rows], dim=1) for rows in members]  # True = hidden key
        causal = not self.bidirectional
        states = [z0] * cfg.num_domains
        total = z0.new_zeros((), dtype=torch.float32)
        for layer_index in range(cfg.domain_layers):
            for d, encoder in enumerate(self.domain_encoders):
                states[d], acd = encoder[layer_index](states[d], key_padding_mask=masks[d], domains=dom_full[d],
                                                      causal=causal)
                total = total + _row_sum(acd[:, :, k:], members[d])
            shared_ib = self._exchange_ib([s[:, :k] for s in states])
            states = [torch.cat([ib_d, s[:, k:]], dim=1) for ib_d, s in zip(shared_ib, states)]
        # a tensor: no device sync. Causal: Σ_d members = the valid items; bidirectional: each [MASK] once per domain
        count = torch.stack([rows.sum() for rows in members]).sum() * (cfg.heads * cfg.domain_layers)
        acd_mean = total / count.clamp_min(1)
        if stage == "ib":
            return states[0][:, :k], acd_mean
        # each item from its own domain's encoder (padded slots: 0; they are never read)
        item_states = sum(s[:, k:] * rows.unsqueeze(-1).to(s.dtype) for s, rows in zip(states, members))
        assert isinstance(item_states, torch.Tensor)
        if stage == "domain":
            return item_states, acd_mean
        h = self.fusion_norm(z0[:, k:] + item_states)
        return self.shared_encoder(h, padding, causal=causal), acd_mean

    def _exchange_ib(self, ib_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The IB states (B, K, D) each domain encoder continues with after a layer, from the ones it
        produced: all get their mean over the domain encoders (official ib_token_sync) — the only
        path by which one domain's items reach another domain's encoder."""
        mean = torch.stack(ib_states).mean(dim=0)
        return [mean] * len(ib_states)

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        check_items(batch, self.config.num_items, self.config.max_len)
        items, domains = self.prediction_inputs(batch.items, check_domains(batch, self.config.num_domains))
        assert domains is not None
        return self.encode(items, domains)[0][:, -1]


SPEC = ModelSpec(
    name="autocdsr_plus", config_cls=AutoCDSRPlusConfig, model_cls=AutoCDSRPlus, needs_domains=True,
    presets={
        "small": {**SMALL, "acd_mode": "pareto", "num_ib_tokens": 4, "domain_layers": 2, "shared_layers": 1},
        # the official KuaiRand AutoCDSR+ run (snap-research/AutoCDSR, hf_transformer_cd_sid_ib_kuairand_pareto.yaml
        # over hf_transformer_cd_sid_ib_kuairand.yaml, hf_transformer_cd_sid_kuairand.yaml and t5_encoder.yaml):
        # d_model 32, d_ff 32, dropout_rate 0.15 (also on the attention probabilities), 4 IB tokens
        # communicating after each of 3 domain-encoder layers, a 3-layer shared encoder with 4 heads (its domain
        # encoders have 2 heads; here one head count for all), the Pareto plugin; Adam lr 1e-4, weight_decay
        # 1e-5, sequence_length 800, batch_size_per_device 16 sequences, trainer max_epochs 10.
        "paper": {"hidden": 32, "layers": 3, "heads": 4, "inner": 32, "dropout": 0.15, "attn_dropout": 0.15,
                  "acd_mode": "pareto", "num_ib_tokens": 4, "domain_layers": 3, "shared_layers": 3,
                  "max_len": 800, "lr": 1e-4, "weight_decay": 1e-5, "batch_size": 16, "batch_unit": "sequences",
                  "epochs": 10},
    })
