"""Training and evaluation loop behind `python -m fastattn train` / `evaluate`.

One `TrainConfig` (a dataclass) describes a run; `PRESETS` fill the hyper-parameters a user
did not give. A run loads the data, splits it leave-one-out (or by the file's own splits),
trains with Adam, evaluates full ranking on validation after every epoch, keeps the best
state by validation NDCG@10 (early stopping with `patience`), and finally evaluates the test
split with the best state. Every epoch writes DIR/checkpoint.pt atomically (temporary file,
then rename), so an interrupted run continues with `--resume` and loses at most the epoch in
progress; a resumed run reproduces the uninterrupted one (batches are seeded by (seed, epoch),
torch's RNG state is saved with the checkpoint).

Outputs in DIR: checkpoint.pt, metrics.json (valid/test metrics, best epoch, timings, config,
per-epoch history) and curves.png. `fastattn.checkpoints` holds the checkpoint's layout and
loading (weights_only=True), the data's identity (a resume on different data is refused,
`evaluate` warns), the lock on DIR (a second run on the same DIR stops at once) and the atomic
writes; `fastattn.reports` the curves, the metrics table and the log and warning lines. The names
other code uses (`LOCK`, `claim_out`, `atomic_save`, `load_checkpoint`, `print_metrics`, ...) are
imported here, so `fastattn.train.X` keeps working.

Failures the user can fix (options, data, --out, a checkpoint, a diverging loss) raise ValueError
with one line naming the flag; the command line prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import checkpoints
from ._dispatch import BACKENDS, BackendUnavailable, resolve_backend
# checkpoint layout and I/O, the --out lock and atomic writes (LOCK, claim_out, atomic_save: also
# used by fastattn.__main__ and the tests through this module)
from .checkpoints import (CHECKPOINT, CHECKPOINT_FORMAT, LOCK, _check_data, _is_int, _is_number, _is_synthetic,
                          _load_weights, _one_line, _restore, _writing, atomic_save, atomic_write_json, claim_out,
                          data_identity)
from .data import (BATCH_UNITS, EvalSet, SequenceDataset, Splits, eval_batches, load_dataset, num_train_batches,
                   split_dataset, train_batches)
from .evaluation import DEFAULT_KS, SAMPLED_NEGATIVES, evaluate_model
from .models.base import SequentialRecommender
from .training_step import TrainingStep
from .models.autocdsr import AutoCDSR, AutoCDSRConfig, AutoCDSRPlus, AutoCDSRPlusConfig
from .models.difsr import DIFSR, DIFSRConfig
from .models.man import MAN, MANConfig
from .models.mqsa_ted import MQSATED, MQSATEDConfig
from .models.sasrec import SASRec, SASRecConfig
# reports: the curves, the metrics table (print_metrics: used by fastattn.__main__), log and warning lines
from .reports import METRICS, _describe_device, _plot, _progress, loss_keys, print_metrics, say, warn

SELECT_METRIC = "NDCG@10"
# Steps between host reads of the running losses (progress bar, early stop on NaN): each is a
# device sync on a GPU, so not every step.
HOST_READ_EVERY = 20

RESUME_MUTABLE = frozenset({"epochs", "device", "progress", "out", "patience", "track_test", "exclude_history",
                            "compile"})


@dataclass(frozen=True)
class ModelSpec:
    """How the loop builds one model: its config class, module class and dataset-derived fields."""

    config_cls: type
    model_cls: type
    from_data: Callable[[SequenceDataset], dict[str, Any]]
    # Optional: after the model is built, give it what it learns from the training split
    prepare: Optional[Callable[[Any, SequenceDataset], None]] = None


def _catalog(ds: SequenceDataset) -> dict[str, Any]:
    return {"num_items": ds.num_items}


def _catalog_and_attributes(ds: SequenceDataset) -> dict[str, Any]:
    if not ds.features:
        raise ValueError(f"model 'difsr' needs item attributes, but data set {ds.name!r} has none "
                         "(s3rec: put <name>_item2attributes.json beside the .txt; recbole: an .item file)")
    return {"num_items": ds.num_items, "attribute_sizes": tuple(f.num_values for f in ds.features)}


def _catalog_and_domains(ds: SequenceDataset) -> dict[str, Any]:
    return {"num_items": ds.num_items, "num_domains": ds.num_domains}


def _catalog_and_required_domains(ds: SequenceDataset) -> dict[str, Any]:
    if ds.domains is None:
        raise ValueError(f"AutoCDSR needs the domain of every interaction, but data set {ds.name!r} has none "
                         "(use a cross-domain .tsv, or synthetic data)")
    return _catalog_and_domains(ds)


def _ted_teacher(model: MQSATED, train: SequenceDataset) -> None:
    if model.config.kd_weight > 0:  # the sparse transition teacher of the training split
        model.set_teacher(train)


MODELS: dict[str, ModelSpec] = {
    "sasrec": ModelSpec(SASRecConfig, SASRec, _catalog),
    "difsr": ModelSpec(DIFSRConfig, DIFSR, _catalog_and_attributes),
    "mqsa_ted": ModelSpec(MQSATEDConfig, MQSATED, _catalog, _ted_teacher),
    "man": ModelSpec(MANConfig, MAN, _catalog_and_domains),
    "autocdsr": ModelSpec(AutoCDSRConfig, AutoCDSR, _catalog_and_required_domains),
    "autocdsr_plus": ModelSpec(AutoCDSRPlusConfig, AutoCDSRPlus, _catalog_and_required_domains),
}

# Hyper-parameters per preset and model. Training keys belong to TrainConfig, the rest to the
# model's config dataclass. "small" is the CPU recipe (RecBole's SASRec defaults with batch 256);
# batch sizes count next-item targets (RecBole's training samples: one per prefix) unless the
# preset says "sequences" (the SASRec paper's batches of whole sequences);
# "paper" is each paper's published setting (SASRec: Kang & McAuley 2018, sparse data sets;
# DIF-SR: the official configs/Amazon_Beauty.yaml, fusion kept at "sum" so it runs on the fused
# kernel — the official file uses "gate", available with --fusion gate).
_SMALL = {"hidden": 64, "layers": 2, "heads": 2, "inner": 256, "dropout": 0.5, "attn_dropout": 0.5,
          "max_len": 50, "lr": 1e-3, "batch_size": 256}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "sasrec": {**_SMALL, "loss": "ce"},
        "difsr": {**_SMALL, "attribute_dim": 16, "aap_weight": 5.0, "fusion": "sum"},
        "mqsa_ted": {**_SMALL, "long_query_len": 3, "alpha": 0.5, "tau": 0.1, "kd_weight": 0.1},
        "man": {**_SMALL, "num_prototypes": 8, "num_negatives": 100, "proto_weight": 0.1},
        "autocdsr": {**_SMALL, "acd_mode": "pareto"},
        "autocdsr_plus": {**_SMALL, "acd_mode": "pareto", "num_ib_tokens": 4, "domain_layers": 2,
                          "shared_layers": 1},
    },
    "paper": {
        "sasrec": {"hidden": 50, "layers": 2, "heads": 1, "inner": 50, "dropout": 0.5, "attn_dropout": 0.5,
                   "max_len": 50, "lr": 1e-3, "batch_size": 128, "batch_unit": "sequences", "loss": "bce",
                   "epochs": 200},
        "difsr": {"hidden": 256, "layers": 4, "heads": 8, "inner": 256, "dropout": 0.5, "attn_dropout": 0.3,
                  "attribute_dim": 64, "aap_weight": 10.0, "fusion": "sum", "max_len": 50, "lr": 1e-4,
                  "batch_size": 2048, "epochs": 200},
        # MQSA-TED's settings as fixed when the model was added (L=3, α=0.5, τ=0.1, λ_kd=0.1) on the SASRec CE backbone
        "mqsa_ted": {**_SMALL, "long_query_len": 3, "alpha": 0.5, "tau": 0.1, "kd_weight": 0.1},
        # MAN's official code is not public in a form we could check; the small recipe is kept
        "man": {**_SMALL, "num_prototypes": 8, "num_negatives": 100, "proto_weight": 0.1},
        # the official AutoCDSR Pareto setting (preference (1, 0) on (a_cd, rec)) on the CE backbone
        "autocdsr": {**_SMALL, "acd_mode": "pareto"},
        "autocdsr_plus": {**_SMALL, "acd_mode": "pareto", "num_ib_tokens": 4, "domain_layers": 2,
                          "shared_layers": 1},
    },
}


@dataclass
class TrainConfig:
    """One training run. `model_options` go to the model's config dataclass (hidden, layers, …)."""

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
    model_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the option for anything that cannot run (before any work)."""
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.format not in (None, "s3rec", "recbole", "tsv"):
            raise ValueError(f"--format must be s3rec, recbole or tsv, got {self.format!r}")
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError(f"--data must name a file, a directory or 'synthetic', got {self.data!r}")
        if not _is_synthetic(self.data) and not Path(self.data).exists():
            raise ValueError(f"--data {self.data!r}: no such file or directory (or use 'synthetic')")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"--out must name a directory, got {self.out!r}")
        self._validate_loop()
        device = check_device(self.device)
        check_backend(self.backend, device)
        self._validate_model()

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
        if not isinstance(self.compile, bool):
            raise ValueError(f"--compile takes no value (True or False in a config), got {self.compile!r}")
        if self.batch_unit not in BATCH_UNITS:
            raise ValueError(f"--batch-unit must be one of {BATCH_UNITS}, got {self.batch_unit!r}")

    def _validate_model(self) -> None:
        """The model's own checks (hidden % heads, dropout range, fusion, ...) now, before any data
        is read, with its field names written as the flags that set them; the catalog fields are
        placeholders until the data set is known."""
        if not isinstance(self.model_options, dict):
            raise ValueError(f"model_options must be a dict, got {type(self.model_options).__name__}")
        known = {f.name for f in dataclasses.fields(MODELS[self.model].config_cls)}
        unknown = sorted(set(self.model_options) - known)
        if unknown:
            flags = ", ".join("--" + str(u).replace("_", "-") for u in unknown)
            raise ValueError(f"{flags} do(es) not apply to model {self.model!r}")
        placeholders = {"num_items": 2, "attribute_sizes": (2,), "num_domains": 2}
        try:
            spec = MODELS[self.model].config_cls(**{k: v for k, v in placeholders.items() if k in known},
                                                 **self.model_options)
            spec.validate()
        except ValueError as exc:
            raise ValueError(_as_flags(str(exc), self.model_options)) from None


def _as_flags(message: str, names: Any) -> str:
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
    """A TrainConfig from a preset, with `overrides` (training or model keys) on top.

    Keys of TrainConfig set the loop; every other key goes to the model's config dataclass.
    Raises ValueError for an unknown model, preset or option.
    """
    if model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {model!r}")
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    loop_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "preset", "model_options"}
    values = {**PRESETS[preset][model], **{k: v for k, v in overrides.items() if v is not None}}
    loop = {k: v for k, v in values.items() if k in loop_keys}
    options = {k: v for k, v in values.items() if k not in loop_keys}
    if "max_len" in {f.name for f in dataclasses.fields(MODELS[model].config_cls)}:
        options["max_len"] = loop.get("max_len", TrainConfig.max_len)  # sizes the position table
    config = TrainConfig(model=model, preset=preset, model_options=options, **loop)
    if config.out == "runs/default":
        stem = "synthetic" if _is_synthetic(config.data) else Path(config.data).name.split(".")[0]
        config.out = str(Path("runs") / f"{model}-{stem}")
    config.validate()
    return config


def load_checkpoint(path: Path, flag: str) -> dict[str, Any]:
    """`checkpoints.load_checkpoint` with the saved options checked against `TrainConfig`: a
    checkpoint's dict, or ValueError naming `flag` and the file on one line."""
    return checkpoints.load_checkpoint(path, flag, TrainConfig)


def resume_config(out: str | Path, **overrides: Any) -> TrainConfig:
    """The config saved in `out`/checkpoint.pt, with the few options a resumed run may change.

    Any other explicit override must equal the saved value (ValueError otherwise), so a resumed
    run is the run it claims to continue.
    """
    state = load_checkpoint(Path(out) / CHECKPOINT, "--resume")
    config = TrainConfig(**state["config"])
    for key, value in overrides.items():
        if value is None:
            continue
        if key in RESUME_MUTABLE:
            setattr(config, key, value)
        elif key in config.model_options:
            if config.model_options[key] != value:
                raise ValueError(f"--{key.replace('_', '-')} {value!r} differs from the checkpointed run "
                                 f"({config.model_options[key]!r}); a resumed run keeps its options")
        elif hasattr(config, key) and getattr(config, key) != value:
            raise ValueError(f"--{key.replace('_', '-')} {value!r} differs from the checkpointed run "
                             f"({getattr(config, key)!r}); a resumed run keeps its options")
        elif not hasattr(config, key):
            raise ValueError(f"--{key.replace('_', '-')} does not apply to model {config.model!r}")
    config.out = str(out)
    config.validate()
    return config


def build_model(config: TrainConfig, dataset: SequenceDataset) -> SequentialRecommender:
    """The model named by `config`, sized from `dataset` (catalog, attribute vocabularies)."""
    spec = MODELS[config.model]
    fields_ = {f.name for f in dataclasses.fields(spec.config_cls)}
    kwargs = {**spec.from_data(dataset), **config.model_options}
    if "backend" in fields_:
        kwargs["backend"] = config.backend
    return spec.model_cls(spec.config_cls(**kwargs))


def out_of_memory_message(exc: BaseException) -> Optional[str]:
    """For an allocation failure (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError,
    which has no class of its own) one line naming the flags that size the memory; else None."""
    if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))):
        return None
    return (f"out of memory ({_one_line(exc, 160)}); lower --batch-size, --eval-batch-size, --max-len or the "
            "model size (--hidden, --inner, --layers, --num-negatives)")


def _evaluate(model: SequentialRecommender, split: EvalSet, dataset: SequenceDataset, config: TrainConfig,
              device: torch.device, seed_offset: int) -> dict[str, float]:
    batches = eval_batches(split, dataset.features, config.eval_batch_size, config.max_len)
    return evaluate_model(model, batches, device, DEFAULT_KS, sampled=config.sampled_eval,
                          seed=config.seed + seed_offset, exclude_history=config.exclude_history)


def _load_splits(config: TrainConfig, log: Callable[[str], None]) -> tuple[SequenceDataset, Splits]:
    """The data set and its splits; a reader's error (ValueError, OSError) as a ValueError naming --data."""
    start = time.perf_counter()
    try:
        dataset = load_dataset(config.data, config.format)
        splits = split_dataset(dataset)
    except (ValueError, OSError) as exc:
        message = _one_line(exc)
        raise ValueError(message if "--data" in message else f"--data {config.data!r}: {message}") from None
    if config.sampled_eval and dataset.num_items <= SAMPLED_NEGATIVES + 1:
        raise ValueError(f"--sampled-eval ranks the target among {SAMPLED_NEGATIVES} sampled negatives, "
                         f"but the catalog has only {dataset.num_items} items")
    log(f"data: {dataset.summary()} (loaded and split in {time.perf_counter() - start:.1f} s)")
    return dataset, splits


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = say,
          warn: Callable[[str], None] = warn) -> dict[str, Any]:
    """Run (or continue, with `resume`) the training described by `config`; returns metrics.json's dict.

    Before any work: the options (`TrainConfig.validate`), then --out (made, writable, and locked
    for the whole run: `claim_out`). A resumed run must find the same options and the same data
    (`data_identity`) as its checkpoint. An epoch whose loss or weights stop being finite ends the
    run with a ValueError naming --lr and --weight-decay; that epoch is not saved, so the
    checkpoint keeps the last good one.
    """
    config.validate()
    out = Path(config.out)
    with claim_out(out):
        state: Optional[dict[str, Any]] = None
        if resume:
            state = load_checkpoint(out / CHECKPOINT, "--resume")
            _check_resumable(state, config)
        return _run(config, state, out, log, warn)


def _run(config: TrainConfig, state: Optional[dict[str, Any]], out: Path, log: Callable[[str], None],
         warn: Callable[[str], None]) -> dict[str, Any]:
    ckpt_path = out / CHECKPOINT
    device = torch.device(config.device)
    dataset, splits = _load_splits(config, log)
    identity = data_identity(config, dataset)
    if state is not None:
        _check_data(state, identity, ckpt_path, warn, refuse=True)
    torch.manual_seed(config.seed)
    model = build_model(config, dataset).to(device)
    if MODELS[config.model].prepare is not None:
        MODELS[config.model].prepare(model, splits.train)
    # fused: one kernel over all parameters (CPU and CUDA), the per-step overhead of small batches
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "metric": -1.0, "valid": {}, "state": None}
    train_seconds, start_epoch = 0.0, 0
    if state is not None:
        _restore(state, model, optimizer, device, ckpt_path)
        history, best, train_seconds, start_epoch = state["history"], state["best"], state["train_seconds"], \
            state["epoch"]
        if config.track_test and best["state"] is not None and "test" not in best:  # --track-test added now
            best["test"] = _evaluate_state(model, best["state"], splits.test, dataset, config, device)
        log(f"resumed from {ckpt_path} after epoch {start_epoch} (best epoch {best['epoch']})")
    # compiled once per run (the module is not wrapped: state_dict keys and checkpoints unchanged)
    train_step = TrainingStep(model, optimizer, compile=config.compile)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {config.model} ({params:,} parameters) on {device}, preset {config.preset}, "
        f"options {config.model_options}")

    for epoch in range(start_epoch + 1, config.epochs + 1):
        if epoch - best["epoch"] > config.patience and best["epoch"] > 0:
            break
        means, epoch_seconds = _train_epoch(train_step, splits.train, config, device, epoch)
        _check_finite(means, model, epoch, config, ckpt_path)
        train_seconds += epoch_seconds
        tick = time.perf_counter()
        valid = _evaluate(model, splits.valid, dataset, config, device, seed_offset=1)
        eval_seconds = time.perf_counter() - tick
        record = {"epoch": epoch, **means, "train_seconds": epoch_seconds, "eval_seconds": eval_seconds,
                  **{f"valid_{k}": v for k, v in valid.items() if k != "users"}}
        history.append(record)
        improved = valid[SELECT_METRIC] > best["metric"]
        if improved:
            best = {"epoch": epoch, "metric": valid[SELECT_METRIC], "valid": valid,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if config.track_test:  # what a run stopped after this epoch would report (eval only: no RNG)
                best["test"] = _evaluate(model, splits.test, dataset, config, device, seed_offset=2)
        if config.track_test:
            record["test_at_best"] = {k: v for k, v in best["test"].items() if k != "users"}
            record["best_epoch_so_far"] = best["epoch"]
        parts = "  ".join(f"{k} {record[k]:.4f}" for k in loss_keys(record) if k != "loss")
        log(f"epoch {epoch:3d}  loss {record.get('loss', float('nan')):.4f}{'  ' + parts if parts else ''}  "
            f"valid HR@10 {valid['HR@10']:.4f} "
            f"NDCG@10 {valid['NDCG@10']:.4f}{'  *' if improved else ''}  "
            f"train {epoch_seconds:.1f} s  eval {eval_seconds:.1f} s")
        with _writing(out):
            atomic_save({"format": CHECKPOINT_FORMAT, "config": asdict(config), "epoch": epoch,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
                         "history": history, "train_seconds": train_seconds, "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                         "dataset": dataset.summary(), "data": identity}, ckpt_path)

    metrics = _final_metrics(model, best, history, train_seconds, config, dataset, splits, device)
    with _writing(out):
        atomic_write_json(metrics, out / METRICS)
        _plot(history, out / "curves.png", config, log)
    log(f"best epoch {metrics['best_epoch']}: test " +
        "  ".join(f"{k} {metrics['test'][k]:.4f}" for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20")))
    log(f"wrote {out / METRICS} and {ckpt_path}")
    return metrics


def _evaluate_state(model: SequentialRecommender, weights: dict[str, torch.Tensor], split: EvalSet,
                    dataset: SequenceDataset, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Test metrics of `weights`, leaving the model's own weights as they were."""
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        return _evaluate(model, split, dataset, config, device, seed_offset=2)
    finally:
        model.load_state_dict(current)


def _train_epoch(train_step: TrainingStep, train_split: SequenceDataset, config: TrainConfig, device: torch.device,
                 epoch: int) -> tuple[dict[str, float], float]:
    """One pass over the training split: (each loss averaged over the steps, seconds).

    The running loss sums stay on the device; the host reads them (one sync on a GPU) only every
    HOST_READ_EVERY steps, for the progress bar and to stop early once they are not finite, and
    at the end. _check_finite then refuses the epoch before anything is saved."""
    train_step.model.train()
    steps = num_train_batches(train_split, config.batch_size, unit=config.batch_unit, max_len=config.max_len,
                              seed=config.seed, epoch=epoch, bucket_batches=config.bucket_batches)
    sums: dict[str, torch.Tensor] = {}
    rows, tick = 0, time.perf_counter()
    bar = _progress(train_batches(train_split, config.batch_size, config.max_len, shuffle=True,
                                  seed=config.seed, epoch=epoch, unit=config.batch_unit,
                                  bucket_batches=config.bucket_batches),
                    steps, f"epoch {epoch}/{config.epochs}", config.progress)
    try:
        for step, batch in enumerate(bar, 1):
            batch = batch.to(device)
            losses = train_step(batch)
            rows += int(batch.items.shape[0])
            for key, value in losses.items():
                value = value.detach().to(torch.float64)
                sums[key] = sums[key] + value if key in sums else value
            if step % HOST_READ_EVERY == 0:
                host = _read_sums(sums)
                if not all(math.isfinite(v) for v in host.values()):
                    break
                bar.set_postfix({k: f"{v / step:.4f}" for k, v in host.items()} |
                                {"seq/s": f"{rows / (time.perf_counter() - tick):.0f}"}, refresh=False)
    finally:
        bar.close()
    host = _read_sums(sums)
    return {k: v / max(1, steps) for k, v in host.items()}, time.perf_counter() - tick


def _read_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The running sums on the host: one transfer for all of them."""
    if not sums:
        return {}
    return dict(zip(sums, torch.stack(list(sums.values())).tolist()))


def _check_finite(means: dict[str, float], model: SequentialRecommender, epoch: int, config: TrainConfig,
                  ckpt_path: Path) -> None:
    """ValueError naming the epoch and --lr / --weight-decay when a loss of the epoch or a weight
    after it is NaN or inf (one host sync per epoch for the weights), before anything is saved."""
    bad = [f"{k} {v}" for k, v in means.items() if not math.isfinite(v)]
    if not bad and bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()):
        return
    what = f"the loss became non-finite ({', '.join(bad)})" if bad else "the weights became non-finite"
    kept = f"{ckpt_path} keeps epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
    raise ValueError(f"epoch {epoch}: training diverged, {what}; stopped without saving it ({kept}); "
                     f"lower --lr (now {config.lr:g}) or --weight-decay (now {config.weight_decay:g})")


def _final_metrics(model: SequentialRecommender, best: dict[str, Any], history: list[dict[str, Any]],
                   train_seconds: float, config: TrainConfig, dataset: SequenceDataset, splits: Splits,
                   device: torch.device) -> dict[str, Any]:
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test = _evaluate(model, splits.test, dataset, config, device, seed_offset=2)
    epochs_run = len(history)
    return {
        "valid": best["valid"],
        "test": test,
        "best_epoch": best["epoch"],
        "epochs_run": epochs_run,
        "train_seconds": train_seconds,
        "train_seconds_per_epoch": train_seconds / max(1, epochs_run),
        "config": asdict(config),
        "dataset": dataset.summary(),
        "device": _describe_device(device),
        "history": history,
    }


def _check_resumable(state: dict[str, Any], config: TrainConfig) -> None:
    """The checkpoint must come from the same run; only epochs, device, progress and output may change."""
    # an option newer than the checkpoint was, for that run, at its default
    saved = {**asdict(TrainConfig()), **state["config"]}
    diffs = [k for k, v in asdict(config).items() if k not in RESUME_MUTABLE and saved.get(k) != v]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(config, k)!r}" for k in diffs)
        raise ValueError(f"--resume: options differ from the checkpointed run ({detail})")


def evaluate_checkpoint(path: str | Path, device: Optional[str] = None, sampled: Optional[bool] = None,
                        log: Callable[[str], None] = say, exclude_history: bool = True,
                        warn: Callable[[str], None] = warn) -> dict[str, Any]:
    """Valid and test metrics of the best state stored in a training checkpoint.

    ValueError on one line for a bad `device` (naming --device), a file that is not a readable
    checkpoint (naming --checkpoint and the file, see `load_checkpoint`) or weights that do not
    fit the data as it is now; a warning (`warn`) when the data differs from the checkpoint's.
    """
    if device is not None:
        check_device(device)
    path = Path(path)
    state = load_checkpoint(path, "--checkpoint")
    raw = dict(state["config"])
    config = TrainConfig(**raw)
    if device is not None:
        config.device = device
    if sampled is not None:
        config.sampled_eval = sampled
    config.exclude_history = exclude_history
    try:
        config.validate()
    except ValueError as exc:
        raise ValueError(f"--checkpoint {path}: the run's options do not apply here: {exc}") from None
    dev = torch.device(config.device)
    dataset, splits = _load_splits(config, log)
    _check_data(state, data_identity(config, dataset), path, warn, refuse=False)
    model = build_model(config, dataset).to(dev)
    best = state["best"]
    _load_weights(model, best["state"] if best["state"] is not None else state["model"], path, "--checkpoint")
    valid = _evaluate(model, splits.valid, dataset, config, dev, seed_offset=1)
    test = _evaluate(model, splits.test, dataset, config, dev, seed_offset=2)
    return {"valid": valid, "test": test, "best_epoch": best["epoch"], "config": raw}

