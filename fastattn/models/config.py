"""The configuration every Transformer recommender here shares, and how a config field becomes a
command-line flag or comes from the data set.

Conventions for a model's config dataclass (`fastattn.models.registry` and `python -m fastattn
train` read them):

- A field declared with `option(default, help)` is a hyper-parameter: the command line offers it as
  ``--field-name`` (underscores as dashes, the type from the annotation, the help text from the
  field's metadata) and presets may set it.
- A field declared with `catalog_field()` describes the data (catalog size, attribute
  vocabularies, number of domains): None until the data set is known, then filled by the training
  loop (`ModelSpec.catalog`); no flag.
- Plain fields (max_len, backend) are set by the loop's own options (--max-len, --backend).

Validation runs once, in `__post_init__` (`validate`); checks that need a catalog field run when it
is set (None = not known yet). A model checks only that its config is complete (`require_catalog`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from ..nn.checks import check_choice, check_int, check_positive, check_probability

BACKENDS = ("auto", "triton", "cpp", "torch")
# the item losses of `ClozeConfig.loss`: full softmax over the catalog, or in-batch contrastive
ITEM_LOSSES = ("ce", "inbatch")

__all__ = ["BACKENDS", "ITEM_LOSSES", "ClozeConfig", "EncoderConfig", "catalog_field", "check_config", "flag_fields",
           "option"]

C = TypeVar("C")


def option(default: Any, help: str) -> Any:
    """A hyper-parameter field: `default`, and `help` (the --flag's help text) in its metadata."""
    return dataclasses.field(default=default, metadata={"help": help})


def catalog_field(default: Any = None) -> Any:
    """A field filled from the data set (num_items, attribute_sizes, num_domains); None = not known yet."""
    return dataclasses.field(default=default, metadata={"catalog": True})


def flag_fields(config_cls: type) -> list[dataclasses.Field]:
    """The hyper-parameter fields of a config dataclass (those declared with `option`), in order."""
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def catalog_names(config_cls: type) -> list[str]:
    """The names of the fields the data set fills (declared with `catalog_field`)."""
    return [f.name for f in dataclasses.fields(config_cls) if f.metadata.get("catalog")]


def check_config(config: object, cls: type[C], exact: bool = False) -> C:
    """`config` itself when it is a `cls` (exactly `cls` with `exact`) whose catalog fields are all
    set; TypeError for another type, ValueError naming the missing catalog fields."""
    if not isinstance(config, cls) or (exact and type(config) is not cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"config must be {article} {cls.__name__}, got {type(config).__name__}")
    missing = [name for name in catalog_names(cls) if getattr(config, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set to build the model: they describe the data set "
                         "(the training loop fills them from it)")
    return config


@dataclass(kw_only=True)
class EncoderConfig:
    """Fields every Transformer recommender here shares (keyword-only; validated on construction).

    num_items: catalog size; item ids are 1..num_items, 0 is padding (tables have num_items+1 rows);
    None until the data set is known. hidden: model width D. layers: Transformer layers. heads:
    attention heads (must divide hidden). inner: feed-forward inner width. dropout: embedding /
    hidden dropout. attn_dropout: dropout on attention probabilities. max_len: longest history
    (position table size; longer batches are rejected). layer_norm_eps: LayerNorm epsilon.
    init_std: std of the normal init of every Linear and Embedding (RecBole's initializer_range).
    backend: "auto" | "triton" | "cpp" | "torch", passed to every fastattn call.
    """

    num_items: Optional[int] = catalog_field()
    hidden: int = option(64, "hidden size (item embedding and transformer width)")
    layers: int = option(2, "transformer layers")
    heads: int = option(2, "attention heads")
    inner: int = option(256, "feed-forward inner size")
    dropout: float = option(0.5, "hidden dropout")
    attn_dropout: float = option(0.5, "attention-probability dropout")
    max_len: int = 50
    layer_norm_eps: float = option(1e-12, "LayerNorm epsilon")
    init_std: float = option(0.02, "std of the normal initialization of every Linear and Embedding")
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (catalog fields only once they are set)."""
        if self.num_items is not None:
            check_int("num_items", self.num_items)
        check_int("hidden", self.hidden)
        check_int("layers", self.layers)
        check_int("heads", self.heads)
        if self.hidden % self.heads != 0:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        check_int("inner", self.inner)
        check_probability("dropout", self.dropout)
        check_probability("attn_dropout", self.attn_dropout)
        check_int("max_len", self.max_len)
        check_positive("layer_norm_eps", self.layer_norm_eps)
        check_positive("init_std", self.init_std)
        check_choice("backend", self.backend, BACKENDS)


@dataclass(kw_only=True)
class ClozeConfig(EncoderConfig):
    """The `EncoderConfig` fields plus the options of a Cloze (masked-item) objective and of the item
    loss, shared by BERT4Rec and AutoCDSR / AutoCDSR+ (whose bidirectional backbone is BERT4Rec's
    objective; `fastattn.models.encoder.ClozeBlock` implements them):

    mask_prob: probability in (0, 1) that a real position is replaced by [MASK] in training (at
        least one per sequence); read only by bidirectional (Cloze) training.
    loss: "ce" (full softmax over the catalog) | "inbatch" (in-batch contrastive,
        `blocks.in_batch_softmax_loss`), over the positions that have a target.
    tau: temperature > 0 of "inbatch".
    """

    mask_prob: float = option(0.2, "Cloze: probability that a position is replaced by [MASK] in training")
    loss: str = option("ce", "ce (full softmax) | inbatch (in-batch contrastive, temperature --tau)")
    tau: float = option(0.1, "temperature of the in-batch loss (--loss inbatch)")

    def validate(self) -> None:
        super().validate()
        if (isinstance(self.mask_prob, bool) or not isinstance(self.mask_prob, (int, float))
                or not 0.0 < self.mask_prob < 1.0):
            raise ValueError(f"mask_prob must be a float in (0, 1), got {self.mask_prob!r}")
        check_choice("loss", self.loss, ITEM_LOSSES)
        check_positive("tau", self.tau)
