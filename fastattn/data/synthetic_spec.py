"""The synthetic data spec of `load_dataset` / `--data`: "synthetic" or
"synthetic:key=value,..." overriding fields of `SyntheticConfig`."""
from __future__ import annotations

from dataclasses import fields as dataclass_fields
from dataclasses import replace

import numpy as np

from ._parsing import INT_TOKEN
from .dataset import SequenceDataset
from .synthetic import SyntheticConfig, make_synthetic

__all__ = ["is_synthetic_spec", "synthetic_from_spec"]

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def is_synthetic_spec(text: str) -> bool:
    """Whether a `load_dataset` spec names synthetic data rather than a path."""
    return text == "synthetic" or text.startswith("synthetic:")


def _spec_value(spec: str, key: str, value: str, default: object) -> object:
    """`value` parsed as the type of `default` (bool, int, float or a '-'-joined tuple of those);
    ValueError naming the option and the spec."""
    text = value.strip()
    if isinstance(default, tuple):
        parts = text.split("-")
        if len(parts) != len(default):
            raise ValueError(f"--data {spec!r}: {key} takes {len(default)} values joined by '-' "
                             f"(e.g. {'-'.join(map(str, default))}), got {value!r}")
        return tuple(_spec_value(spec, key, part, d) for part, d in zip(parts, default))
    if isinstance(default, bool):
        if text.lower() not in _BOOLS:
            raise ValueError(f"--data {spec!r}: {key} must be true or false (or yes/no, 1/0), got {value!r}")
        return _BOOLS[text.lower()]
    if isinstance(default, int):
        if not INT_TOKEN.match(text):
            raise ValueError(f"--data {spec!r}: {key} must be an integer, got {value!r}")
        return int(text)
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise ValueError(f"--data {spec!r}: {key} must be a finite number, got {value!r}")
    return number


def synthetic_from_spec(spec: str) -> SequenceDataset:
    """The data set of a "synthetic[:key=value,...]" spec; ValueError naming a bad key or value."""
    config = SyntheticConfig()
    _, _, options = spec.partition(":")
    changes: dict[str, object] = {}
    known = [f.name for f in dataclass_fields(SyntheticConfig)]
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in known:
            what = f"unknown synthetic option {key!r}" if sep else f"synthetic option {option!r} is not key=value"
            raise ValueError(f"--data {spec!r}: {what}; the keys are {', '.join(known)}")
        if key in changes:
            raise ValueError(f"--data {spec!r}: synthetic option {key} is given twice")
        changes[key] = _spec_value(spec, key, value, getattr(config, key))
    try:
        config = replace(config, **changes)
    except ValueError as exc:
        raise ValueError(f"--data {spec!r}: {exc}") from None
    return make_synthetic(config)
