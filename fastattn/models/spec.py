"""`ModelSpec`: what the training loop and the command line need to know about one model.

A model module declares one `SPEC = ModelSpec(...)`: its name, config dataclass, module class,
what it needs from the data set, its presets and an optional `prepare` hook; `fastattn.models.registry`
collects them. Nothing here imports a model (the model modules import this one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..data.dataset import SequenceDataset
from .base import SequentialRecommender
from .config import catalog_names

__all__ = ["CATALOG", "ModelSpec", "SMALL"]

# The CPU recipe every "small" preset starts from: RecBole's SASRec defaults with batch 256
# (batch sizes count next-item targets unless a preset says batch_unit "sequences").
SMALL: Mapping[str, Any] = {"hidden": 64, "layers": 2, "heads": 2, "inner": 256, "dropout": 0.5,
                            "attn_dropout": 0.5, "max_len": 50, "lr": 1e-3, "batch_size": 256}

# catalog field → its value for a data set (the fields a config declares with `catalog_field`)
CATALOG: Mapping[str, Callable[[SequenceDataset], Any]] = {
    "num_items": lambda ds: ds.num_items,
    "attribute_sizes": lambda ds: tuple(f.num_values for f in ds.features),
    "num_domains": lambda ds: ds.num_domains,
}


@dataclass(frozen=True)
class ModelSpec:
    """One model for the training loop and `python -m fastattn train`.

    name: the --model value. config_cls: its config dataclass (fields declared with
    `fastattn.models.config.option` become flags; `catalog_field`s are filled from the data).
    model_cls: a `SequentialRecommender` built as model_cls(config). needs_attributes /
    needs_domains: the data set must have item attributes / a domain per interaction (checked,
    with a message saying where they come from, before the model is built). presets: preset name
    ("small": the CPU recipe, "paper": the published setting) → option values; keys that are
    training options (lr, batch_size, batch_unit, max_len, epochs, weight_decay, ...) go to the
    loop, the others to config_cls. prepare(model, train_split): optional, run once after the
    model is built (e.g. MQSA-TED's transition teacher from the training sequences).
    """

    name: str
    config_cls: type
    model_cls: type
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needs_attributes: bool = False
    needs_domains: bool = False
    prepare: Optional[Callable[[Any, SequenceDataset], None]] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"ModelSpec.name must be an identifier such as 'sasrec', got {self.name!r}")
        if not (isinstance(self.config_cls, type) and dataclasses.is_dataclass(self.config_cls)):
            raise TypeError(f"ModelSpec {self.name!r}: config_cls must be a dataclass, got {self.config_cls!r}")
        if not (isinstance(self.model_cls, type) and issubclass(self.model_cls, SequentialRecommender)):
            raise TypeError(f"ModelSpec {self.name!r}: model_cls must subclass SequentialRecommender")
        unknown = sorted(set(catalog_names(self.config_cls)) - set(CATALOG))
        if unknown:
            raise ValueError(f"ModelSpec {self.name!r}: catalog fields {unknown} are not among {sorted(CATALOG)}")
        if "small" not in self.presets:
            raise ValueError(f"ModelSpec {self.name!r}: presets must include 'small' (the CPU recipe)")

    def catalog(self, dataset: SequenceDataset) -> dict[str, Any]:
        """The config's catalog fields for `dataset`; ValueError when the data lacks what the model needs."""
        if self.needs_attributes and not dataset.features:
            raise ValueError(f"model {self.name!r} needs item attributes, but data set {dataset.name!r} has none "
                             "(s3rec: put <name>_item2attributes.json beside the .txt; recbole: an .item file)")
        if self.needs_domains and dataset.domains is None:
            raise ValueError(f"model {self.name!r} needs the domain of every interaction, but data set "
                             f"{dataset.name!r} has none (use a cross-domain .tsv, or synthetic data)")
        return {name: CATALOG[name](dataset) for name in catalog_names(self.config_cls)}
