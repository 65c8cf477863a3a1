"""The options of a training run: `TrainConfig`, built by `make_config` (preset + overrides) or
`resume_config` (a checkpoint's), and checked before any work.

`TrainConfig` holds the loop's options and the model's typed config (`model_config`, e.g. a
`SASRecConfig`): the model's options are validated once, when that config is built (its
`__post_init__`), with field names written as the flags that set them; its catalog fields
(num_items, attribute sizes, number of domains) stay None until the data set is loaded
(`fastattn.train.build_model` fills them). Saved (checkpoint.pt, metrics.json) a config is a plain
dict, the layout checkpoints have always had: the loop's options and "model_options", the model's
options by name (`TrainConfig.to_dict` / `config_from_dict`), so checkpoints of earlier versions
load and resume.

Failures the user can fix raise ValueError with one line naming the flag.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from . import checkpoints
from ._dispatch import BACKENDS, BackendUnavailable, resolve_backend
from .checkpoints import CHECKPOINT, _is_int, _is_number, _is_synthetic
from .data import BATCH_UNITS, FORMATS
from .models.config import catalog_names
from .models.registry import MODELS
from .models.spec import ModelSpec

# model config fields the loop's options set (--max-len sizes the position table, --backend)
LOOP_OWNED = ("max_len", "backend")
# options a resumed run may change (the rest must equal the checkpoint's)
RESUME_MUTABLE = frozenset({"epochs", "device", "progress", "out", "patience", "track_test", "exclude_history",
                            "compile", "item_shards"})
# models whose item table may be split over processes (--item-shards): the table is their input
# embedding and their full-softmax output, and nothing else reads its rows
ITEM_SHARDED_MODELS = {"sasrec": ("loss", "ce")}


@dataclass
class TrainConfig:
    """One training run: the loop's options and `model_config`, the model's config dataclass
    (`MODELS[model].config_cls`; None = that class's defaults, built by `validate`)."""

    model: str = "difsr"
    data: str = "synthetic"
    format: Optional[str] = None
    preset: str = "small"
    epochs: int = 50
    batch_size: int = 256
    batch_unit: str = "targets"
    bucket_batches: int = 100
    eval_batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 50
    patience: int = 10
    seed: int = 42
    device: str = "cpu"
    backend: str = "auto"
    out: str = "runs/default"
    sampled_eval: bool = False
    track_test: bool = False
    exclude_history: bool = True
    progress: bool = True
    compile: bool = False  # torch.compile the training step (fastattn.training_step)
    item_shards: int = 1  # under torchrun: the item table split by rows over the processes
    model_config: Any = None

    @property
    def model_options(self) -> dict[str, Any]:
        """The model's options by name, as saved: every field of `model_config` but the catalog
        fields (they come from the data) and backend (a loop option); max_len is the loop's."""
        if self.model_config is None:
            return {}
        skip = set(catalog_names(type(self.model_config))) | {"backend"}
        return {f.name: self.max_len if f.name == "max_len" else getattr(self.model_config, f.name)
                for f in dataclasses.fields(self.model_config) if f.name not in skip}

    def to_dict(self) -> dict[str, Any]:
        """The saved form: the loop's options, then "model_options" (`config_from_dict` reads it back)."""
        return {**{name: getattr(self, name) for name in _SAVED_LOOP}, "model_options": self.model_options}

    def validate(self) -> None:
        """Raise ValueError naming the option for anything that cannot run (before any work); builds
        `model_config` from the model's defaults when it is None."""
        self.validate_options()
        spec = MODELS[self.model]
        if self.model_config is None:
            self.model_config = build_model_config(spec, {}, self)
        elif not isinstance(self.model_config, spec.config_cls):
            raise ValueError(f"model_config must be a {spec.config_cls.__name__} for model {self.model!r}, "
                             f"got {type(self.model_config).__name__}")
        if self.item_shards > 1:
            need = ITEM_SHARDED_MODELS.get(self.model)
            if need is None or getattr(self.model_config, need[0]) != need[1]:
                allowed = ", ".join(f"{m} with --{k} {v}" for m, (k, v) in ITEM_SHARDED_MODELS.items())
                raise ValueError(f"--item-shards {self.item_shards}: the item table can be split for {allowed} "
                                 f"only, not {self.model} {self.model_options}")
            if self.sampled_eval:
                raise ValueError("--item-shards with --sampled-eval is not supported yet (full ranking only)")

    def validate_options(self) -> None:
        """Everything but the model's own options: model and preset names, data, out, loop, device, backend."""
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.preset not in MODELS[self.model].presets:
            raise ValueError(f"--preset must be one of {sorted(MODELS[self.model].presets)}, got {self.preset!r}")
        if self.format not in (None, *FORMATS):
            raise ValueError(f"--format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {self.format!r}")
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError(f"--data must name a file, a directory or 'synthetic', got {self.data!r}")
        if not _is_synthetic(self.data) and not Path(self.data).exists():
            raise ValueError(f"--data {self.data!r}: no such file or directory (or use 'synthetic')")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"--out must name a directory, got {self.out!r}")
        self._validate_loop()
        device = check_device(self.device)
        check_backend(self.backend, device)

    def _validate_loop(self) -> None:
        """The numeric options of the loop: counts, seed, learning rate, weight decay, batch unit."""
        if not _is_int(self.bucket_batches) or self.bucket_batches < 0:
            raise ValueError(f"--bucket-batches must be an integer >= 0, got {self.bucket_batches!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_len", "patience"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        # numpy seeds (seed, epoch) must be >= 0; torch takes at most 2**64 - 1 (seed + small offsets)
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not _is_int(self.item_shards) or self.item_shards < 1:
            raise ValueError(f"--item-shards must be a positive integer, got {self.item_shards!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"--compile takes no value (True or False in a config), got {self.compile!r}")
        if self.batch_unit not in BATCH_UNITS:
            raise ValueError(f"--batch-unit must be one of {BATCH_UNITS}, got {self.batch_unit!r}")


# the saved loop options (every field but model_config) and the options a preset or override may set
_SAVED_LOOP = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "model_config")
LOOP_KEYS = frozenset(_SAVED_LOOP) - {"model", "preset"}
# TrainConfig's field annotations (strings: postponed evaluation) → the types a saved value may have
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                             "Optional[str]": (str, type(None))}
SAVED_TYPES: dict[str, tuple[type, ...]] = {
    **{f.name: _FIELD_TYPES[str(f.type)] for f in dataclasses.fields(TrainConfig) if f.name != "model_config"},
    "model_options": (dict,)}


def build_model_config(spec: ModelSpec, options: Mapping[str, Any], loop: TrainConfig) -> Any:
    """`spec.config_cls` from `options` (model keys), with max_len and backend from the loop's
    options; ValueError naming the flags for unknown or invalid options. Catalog fields stay None."""
    names = [f.name for f in dataclasses.fields(spec.config_cls)]
    settable = set(names) - set(catalog_names(spec.config_cls))
    unknown = sorted(set(options) - settable)
    if unknown:
        flags = ", ".join("--" + str(u).replace("_", "-") for u in unknown)
        raise ValueError(f"{flags} do(es) not apply to model {spec.name!r}")
    values = {**options, **{key: getattr(loop, key) for key in LOOP_OWNED if key in settable}}
    try:
        return spec.config_cls(**values)
    except (ValueError, TypeError) as exc:  # TypeError: a required field without a value
        raise ValueError(_as_flags(str(exc), settable)) from None


def _as_flags(message: str, names: Iterable[str]) -> str:
    """A model config's message with each option name written as its flag (attn_dropout → --attn-dropout)."""
    for name in names:
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w\[])", "--" + name.replace("_", "-"), message)
    return message


def check_device(name: object) -> torch.device:
    """`--device` as a torch.device the loop can run on: cpu, or cuda[:N] with CUDA present and
    N < the device count; ValueError naming the flag otherwise (meta, mps, cpu:1, ...)."""
    if not isinstance(name, str):
        raise ValueError(f"--device must be a string such as 'cpu' or 'cuda:0', got {name!r}")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cpu" and device.index in (None, 0):
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: training runs on cpu or cuda[:N] only")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine (use --device cpu)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def check_backend(backend: object, device: torch.device) -> None:
    """ValueError naming `--backend` when it is unknown or cannot run on `device` (e.g. triton on a
    CPU without the interpreter): the kernels would otherwise fail at the first step."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be auto, triton, cpp or torch, got {backend!r}")
    if backend in ("auto", "torch"):  # always run (auto falls back); no need to probe the C++ build
        return
    try:
        resolve_backend(str(backend), [torch.empty(0, device=device)])
    except BackendUnavailable as exc:
        raise ValueError(f"--backend {backend}: {exc}") from None


def make_config(model: str = "difsr", preset: str = "small", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset, with `overrides` (training or model keys; None = not given) on top.

    Keys of TrainConfig set the loop; every other key goes to the model's config dataclass.
    Raises ValueError for an unknown model, preset or option.
    """
    if model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {model!r}")
    spec = MODELS[model]
    if preset not in spec.presets:
        raise ValueError(f"--preset must be one of {sorted(spec.presets)}, got {preset!r}")
    values = {**spec.presets[preset], **{k: v for k, v in overrides.items() if v is not None}}
    loop = {k: v for k, v in values.items() if k in LOOP_KEYS}
    config = TrainConfig(model=model, preset=preset, **loop)
    if config.out == "runs/default":
        stem = "synthetic" if _is_synthetic(config.data) else Path(config.data).name.split(".")[0]
        config.out = str(Path("runs") / f"{model}-{stem}")
    config.validate_options()
    config.model_config = build_model_config(spec, {k: v for k, v in values.items() if k not in LOOP_KEYS}, config)
    return config


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of a saved config dict (`TrainConfig.to_dict`, or a checkpoint of an earlier
    version: options it predates take their defaults); ValueError naming the flags when its options
    do not apply (e.g. a model that is not registered here)."""
    values = dict(raw)
    options = dict(values.pop("model_options", None) or {})
    config = TrainConfig(**values)
    if config.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {config.model!r}")
    config.model_config = build_model_config(MODELS[config.model], options, config)
    return config


def load_checkpoint(path: Path, flag: str) -> dict[str, Any]:
    """`checkpoints.load_checkpoint` with the saved options checked against TrainConfig's saved
    form: a checkpoint's dict, or ValueError naming `flag` and the file on one line."""
    return checkpoints.load_checkpoint(path, flag, SAVED_TYPES)


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """The loop's options and the model's by name, one flat dict (max_len is in both, equal)."""
    saved = config.to_dict()
    return {**{k: v for k, v in saved.items() if k != "model_options"}, **saved["model_options"]}


def check_resumable(state: dict[str, Any], config: TrainConfig) -> None:
    """The checkpoint must come from the same run; only `RESUME_MUTABLE` options may change."""
    checkpoints.check_same_run(_comparable(config_from_dict(state["config"])), _comparable(config), RESUME_MUTABLE)


def resume_config(out: str | Path, **overrides: Any) -> TrainConfig:
    """The config saved in `out`/checkpoint.pt, with the few options a resumed run may change.

    Any other explicit override must equal the saved value (ValueError otherwise), so a resumed
    run is the run it claims to continue.
    """
    state = load_checkpoint(Path(out) / CHECKPOINT, "--resume")
    config = config_from_dict(state["config"])
    saved = _comparable(config)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in RESUME_MUTABLE:
            setattr(config, key, value)
        elif key not in saved:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to model {config.model!r}")
        elif saved[key] != value:
            raise ValueError(f"--{key.replace('_', '-')} {value!r} differs from the checkpointed run "
                             f"({saved[key]!r}); a resumed run keeps its options")
    config.out = str(out)
    config.validate()
    return config
