"""The models `python -m fastattn train` knows: one `ModelSpec` per model module, by name.

Adding a model: a new module in fastattn/models/ that declares ``SPEC = ModelSpec(...)``
(`fastattn.models.spec`), and its module name in `BUILTIN` below. Code outside the package calls
`register(spec)` instead; the command line (flags, --model and --preset choices) and
`fastattn.train.make_config` read `MODELS` when they run.
"""
from __future__ import annotations

import importlib

from .spec import ModelSpec

__all__ = ["BUILTIN", "MODELS", "ModelSpec", "preset_names", "register", "unregister"]

# the modules of fastattn.models that declare a SPEC, in the order --help lists them
BUILTIN = ("sasrec", "bert4rec", "difsr", "mqsa_ted", "man", "autocdsr", "autocdsr_plus")

MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Make `spec` available by its name (--model); ValueError when the name is taken, unless `replace`."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register takes a ModelSpec, got {type(spec).__name__}")
    if spec.name in MODELS and not replace:
        raise ValueError(f"a model named {spec.name!r} is already registered (pass replace=True to override)")
    MODELS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the model `name` (KeyError if there is none)."""
    del MODELS[name]


def preset_names() -> list[str]:
    """Every preset name some registered model has, "small" first."""
    names: dict[str, None] = {"small": None}
    for spec in MODELS.values():
        names.update(dict.fromkeys(spec.presets))
    return list(names)


for _module in BUILTIN:
    register(importlib.import_module(f".{_module}", __package__).SPEC)
del _module
