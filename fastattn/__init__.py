"""fastattn: fused Triton (and C++ CPU) kernels for attention-based sequential recommenders.

Importing fastattn leaves os.environ alone (the command line sets what it needs:
fastattn/_environment.py). It imports the public API, and so registers every `torch.ops.fastattn`
operator, at once, with one exception: while `python -m fastattn` starts, the names resolve on
first use instead, so that fastattn/__main__.py can set the environment before torch (and its
OpenMP) is loaded.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._environment import cli_is_starting

__all__ = ["BackendUnavailable", "SoftTarget", "dif_attention", "full_item_cross_entropy", "nn",
           "ted_teacher", "topk_items"]
__version__ = "0.1.0"

# public name -> the modules that may define it, first hit wins (None: the name is that module).
_PUBLIC: dict[str, tuple[str, ...]] = {
    "BackendUnavailable": ("._dispatch",),
    "SoftTarget": (".functional",),
    "dif_attention": (".functional",),
    "full_item_cross_entropy": (".functional",),
    "nn": (),
    "ted_teacher": (".models.mqsa_ted",),
    "topk_items": (".functional",),
}


def _resolve(name: str) -> Any:
    if not _PUBLIC[name]:
        return importlib.import_module(f".{name}", __name__)
    for module_name in _PUBLIC[name]:
        module = importlib.import_module(module_name, __name__)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (not in {_PUBLIC[name]})")


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if not cli_is_starting():
    # Registers every operator, as users of torch.ops.fastattn (and torch.export.load) expect after
    # `import fastattn`. ted_teacher stays lazy: its module imports the models.
    for _name in ("nn", "BackendUnavailable", "SoftTarget", "dif_attention", "full_item_cross_entropy",
                  "topk_items"):
        __getattr__(_name)
    del _name
