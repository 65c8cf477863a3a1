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
per-epoch history) and curves.png (loss and validation NDCG@10 per epoch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .data import (BATCH_UNITS, EvalSet, SequenceDataset, Splits, eval_batches, load_dataset, num_train_batches,
                   split_dataset, train_batches)
from .evaluation import DEFAULT_KS, SAMPLED_NEGATIVES, evaluate_model
from .models.base import SequentialRecommender
from .models.autocdsr import AutoCDSR, AutoCDSRConfig, AutoCDSRPlus, AutoCDSRPlusConfig
from .models.difsr import DIFSR, DIFSRConfig
from .models.man import MAN, MANConfig
from .models.mqsa_ted import MQSATED, MQSATEDConfig
from .models.sasrec import SASRec, SASRecConfig

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
SELECT_METRIC = "NDCG@10"
CHECKPOINT_FORMAT = 1
RESUME_MUTABLE = frozenset({"epochs", "device", "progress", "out", "patience", "track_test", "exclude_history"})


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
        # DESIGN §8's MQSA-TED settings (L=3, α=0.5, τ=0.1, λ_kd=0.1) on the SASRec CE backbone
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
    model_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the option for anything that cannot run (before any work)."""
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.format not in (None, "s3rec", "recbole", "tsv"):
            raise ValueError(f"--format must be s3rec, recbole or tsv, got {self.format!r}")
        if not _is_synthetic(self.data) and not Path(self.data).exists():
            raise ValueError(f"--data {self.data!r}: no such file or directory (or use 'synthetic')")
        if not isinstance(self.bucket_batches, int) or isinstance(self.bucket_batches, bool) or self.bucket_batches < 0:
            raise ValueError(f"--bucket-batches must be an integer >= 0, got {self.bucket_batches!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_len", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.batch_unit not in BATCH_UNITS:
            raise ValueError(f"--batch-unit must be one of {BATCH_UNITS}, got {self.batch_unit!r}")
        if self.backend not in ("auto", "triton", "cpp", "torch"):
            raise ValueError(f"--backend must be auto, triton, cpp or torch, got {self.backend!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"--device {self.device!r} is not a torch device: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine (use --device cpu)")
        known = {f.name for f in dataclasses.fields(MODELS[self.model].config_cls)}
        unknown = sorted(set(self.model_options) - known)
        if unknown:
            flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
            raise ValueError(f"{flags} do(es) not apply to model {self.model!r}")
        # The model's own checks (hidden % heads, dropout range, fusion, ...) now, before any data
        # is read; the catalog fields are placeholders until the data set is known.
        placeholders = {"num_items": 2, "attribute_sizes": (2,), "num_domains": 2}
        spec = MODELS[self.model].config_cls(**{k: v for k, v in placeholders.items() if k in known},
                                             **self.model_options)
        spec.validate()


def _is_synthetic(data: str) -> bool:
    """`--data synthetic` or `synthetic:key=value,...` (SyntheticConfig overrides)."""
    return data == "synthetic" or data.startswith("synthetic:")


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
    """A training checkpoint's dict; ValueError naming `flag` when missing or not ours."""
    if not path.exists():
        raise ValueError(f"{flag}: no checkpoint at {path} (no such file)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{flag}: {path} is not a fastattn training checkpoint")
    return state


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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: never a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _evaluate(model: SequentialRecommender, split: EvalSet, dataset: SequenceDataset, config: TrainConfig,
              device: torch.device, seed_offset: int) -> dict[str, float]:
    batches = eval_batches(split, dataset.features, config.eval_batch_size, config.max_len)
    return evaluate_model(model, batches, device, DEFAULT_KS, sampled=config.sampled_eval,
                          seed=config.seed + seed_offset, exclude_history=config.exclude_history)


def _load_splits(config: TrainConfig, log: Callable[[str], None]) -> tuple[SequenceDataset, Splits]:
    start = time.perf_counter()
    dataset = load_dataset(config.data, config.format)
    splits = split_dataset(dataset)
    log(f"data: {dataset.summary()} (loaded and split in {time.perf_counter() - start:.1f} s)")
    return dataset, splits


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs redirected to a file stay readable)
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=None if enabled else True,
                dynamic_ncols=True, mininterval=0.5)


def say(message: str) -> None:
    """Default log: a line on stdout, flushed (logs redirected to files stay current)."""
    print(message, flush=True)


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = say) -> dict[str, Any]:
    """Run (or continue, with `resume`) the training described by `config`; returns metrics.json's dict."""
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT
    state: Optional[dict[str, Any]] = None
    if resume:
        state = load_checkpoint(ckpt_path, "--resume")
        _check_resumable(state, config)
    config.validate()
    device = torch.device(config.device)
    dataset, splits = _load_splits(config, log)
    if config.sampled_eval and dataset.num_items <= SAMPLED_NEGATIVES + 1:
        raise ValueError(f"--sampled-eval ranks the target among {SAMPLED_NEGATIVES} sampled negatives, "
                         f"but the catalog has only {dataset.num_items} items")

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
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, train_seconds = state["history"], state["best"], state["train_seconds"]
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log(f"resumed from {ckpt_path} after epoch {start_epoch} (best epoch {best['epoch']})")
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {config.model} ({params:,} parameters) on {device}, preset {config.preset}, "
        f"options {config.model_options}")

    for epoch in range(start_epoch + 1, config.epochs + 1):
        if epoch - best["epoch"] > config.patience and best["epoch"] > 0:
            break
        model.train()
        steps = num_train_batches(splits.train, config.batch_size, unit=config.batch_unit, max_len=config.max_len,
                                  seed=config.seed, epoch=epoch, bucket_batches=config.bucket_batches)
        sums: dict[str, float] = {}
        rows, tick = 0, time.perf_counter()
        bar = _progress(train_batches(splits.train, config.batch_size, config.max_len, shuffle=True,
                                      seed=config.seed, epoch=epoch, unit=config.batch_unit,
                                      bucket_batches=config.bucket_batches),
                        steps, f"epoch {epoch}/{config.epochs}", config.progress)
        for step, batch in enumerate(bar, 1):
            batch = batch.to(device)
            losses = model.losses(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            rows += int(batch.items.shape[0])
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if step % 5 == 0 or step == steps:
                bar.set_postfix({k: f"{v / step:.4f}" for k, v in sums.items()} |
                                {"seq/s": f"{rows / (time.perf_counter() - tick):.0f}"}, refresh=False)
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - tick
        train_seconds += epoch_seconds
        tick = time.perf_counter()
        valid = _evaluate(model, splits.valid, dataset, config, device, seed_offset=1)
        eval_seconds = time.perf_counter() - tick
        record = {"epoch": epoch, **{k: v / max(1, steps) for k, v in sums.items()},
                  "train_seconds": epoch_seconds, "eval_seconds": eval_seconds,
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
        atomic_save({"format": CHECKPOINT_FORMAT, "config": asdict(config), "epoch": epoch,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
                     "history": history, "train_seconds": train_seconds, "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                     "dataset": dataset.summary()}, ckpt_path)

    metrics = _final_metrics(model, best, history, train_seconds, config, dataset, splits, device)
    atomic_write_json(metrics, out / METRICS)
    _plot(history, out / "curves.png", config, log)
    log(f"best epoch {metrics['best_epoch']}: test " +
        "  ".join(f"{k} {metrics['test'][k]:.4f}" for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20")))
    log(f"wrote {out / METRICS} and {ckpt_path}")
    return metrics


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


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _check_resumable(state: dict[str, Any], config: TrainConfig) -> None:
    """The checkpoint must come from the same run; only epochs, device, progress and output may change."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    # an option newer than the checkpoint was, for that run, at its default
    saved = {**asdict(TrainConfig()), **state["config"]}
    diffs = [k for k, v in asdict(config).items() if k not in RESUME_MUTABLE and saved.get(k) != v]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(config, k)!r}" for k in diffs)
        raise ValueError(f"--resume: options differ from the checkpointed run ({detail})")


def loss_keys(record: dict[str, Any]) -> list[str]:
    """The per-epoch mean losses of a history record (what the model's `losses` returned)."""
    return [k for k in record if k not in ("epoch", "train_seconds", "eval_seconds", "best_epoch_so_far")
            and not k.startswith(("valid_", "test_"))]


def _plot(history: list[dict[str, Any]], path: Path, config: TrainConfig, log: Callable[[str], None]) -> None:
    """Loss and validation NDCG@10 per epoch (skipped with a note if matplotlib is missing)."""
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return
    epochs = [h["epoch"] for h in history]
    losses = loss_keys(history[0])
    extra = [k for k in ("acd",) if k in losses]  # a_cd (AutoCDSR) gets its own panel: other scale
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(4.5 * (2 + len(extra)), 3.2))
    ax1, ax2 = axes[0], axes[1]
    for key in [k for k in losses if k not in extra and not k.startswith("w_")]:
        ax1.plot(epochs, [h[key] for h in history], label=key)
    for ax, key in zip(axes[2:], extra):
        ax.plot(epochs, [h[key] for h in history], label=key, color="C3")
        ax.set_xlabel("epoch")
        ax.set_title("mean cross-domain attention a_cd (train)")
    ax1.set_xlabel("epoch")
    ax1.set_title("training loss")
    ax1.legend()
    ax2.plot(epochs, [h["valid_NDCG@10"] for h in history], label="NDCG@10")
    ax2.plot(epochs, [h["valid_HR@10"] for h in history], label="HR@10")
    ax2.set_xlabel("epoch")
    ax2.set_title("validation (full ranking)")
    ax2.legend()
    fig.suptitle(f"{config.model} on {Path(config.data).name}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def evaluate_checkpoint(path: str | Path, device: Optional[str] = None, sampled: Optional[bool] = None,
                        log: Callable[[str], None] = say, exclude_history: bool = True) -> dict[str, Any]:
    """Valid and test metrics of the best state stored in a training checkpoint."""
    state = load_checkpoint(Path(path), "--checkpoint")
    raw = dict(state["config"])
    config = TrainConfig(**raw)
    if device is not None:
        config.device = device
    if sampled is not None:
        config.sampled_eval = sampled
    config.exclude_history = exclude_history
    config.validate()
    dev = torch.device(config.device)
    dataset, splits = _load_splits(config, log)
    model = build_model(config, dataset).to(dev)
    best = state["best"]
    model.load_state_dict(best["state"] if best["state"] is not None else state["model"])
    valid = _evaluate(model, splits.valid, dataset, config, dev, seed_offset=1)
    test = _evaluate(model, splits.test, dataset, config, dev, seed_offset=2)
    return {"valid": valid, "test": test, "best_epoch": best["epoch"], "config": raw}


def print_metrics(metrics: dict[str, Any], stream: Any = None) -> None:
    """A small table of the valid/test metrics for the terminal (stdout unless `stream`): full
    ranking, then the sampled protocol (labelled) and the per-domain rows of cross-domain data."""
    stream = sys.stdout if stream is None else stream
    keys = [k for k in metrics["test"] if k != "users" and not k.startswith(("sampled_", "domain"))]
    domains = sorted({k.split("_", 1)[0] for k in metrics["test"] if k.startswith("domain")},
                     key=lambda d: int(d[len("domain"):]))
    print(f"{'':20s}" + "".join(f"{k:>9s}" for k in keys), file=stream)
    prefixes = [("", "{split}"), ("sampled_", "{split} sampled (100 neg)")]
    prefixes += [(f"{d}_", f"{{split}} {d}") for d in domains]
    for prefix, label in prefixes:
        for split in ("valid", "test"):
            row = metrics.get(split) or {}
            if prefix + keys[0] not in row:
                continue
            print(f"{label.format(split=split):20s}" + "".join(f"{row[prefix + k]:9.4f}" for k in keys), file=stream)
