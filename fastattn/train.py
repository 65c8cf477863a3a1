"""Training and evaluation loop behind `python -m fastattn train` / `evaluate`.

A `TrainConfig` (`fastattn.train_config`: `make_config` from a preset, `resume_config` from a
checkpoint) describes a run. A run loads the data, splits it leave-one-out (or by the file's own
splits), builds the model of `fastattn.models.MODELS` with its catalog fields from the data
(`build_model`), trains with Adam, evaluates full ranking on validation after every epoch, keeps
the best state by validation NDCG@10 (early stopping with `patience`), and finally evaluates the
test split with the best state. Every epoch writes DIR/checkpoint.pt atomically, so an
interrupted run continues with `--resume` and loses at most the epoch in progress; a resumed run
reproduces the uninterrupted one (batches are seeded by (seed, epoch), torch's RNG state is saved
with the checkpoint).

Under torchrun (`torchrun --nproc-per-node N -m fastattn train ...`) the run is data-parallel
(`fastattn.data_parallel`): each process trains on its share of every global batch in
DistributedDataParallel and scores its share of the users; rank 0 alone logs, locks --out and
writes the checkpoint (the plain model's state, so it loads in any number of processes) and the
reports. Without torchrun nothing changes.

Outputs in DIR: checkpoint.pt (`fastattn.checkpoints`: layout, loading, the data's identity, the
lock on DIR, atomic writes), metrics.json and curves.png (`fastattn.reports`). The names other code
uses are imported here, so `fastattn.train.X` keeps working: `TrainConfig`, `make_config`,
`resume_config`, `load_checkpoint`, `MODELS`, `LOCK`, `claim_out`, `atomic_save`, `print_metrics`.

Failures the user can fix (options, data, --out, a checkpoint, a diverging loss) raise ValueError
with one line naming the flag; the command line prints it and exits with code 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .checkpoints import (CHECKPOINT, LOCK, _check_data, _load_weights, _one_line, _restore, _writing, atomic_save,
                          claim_out, data_identity, save_checkpoint)
from .data import (EvalSet, SequenceDataset, Splits, eval_batches, load_dataset, num_train_batches, split_dataset,
                   train_batches)
from .data_parallel import (SINGLE, Group, launch, shard_item_table, shard_optimizer_state,
                            whole_optimizer_state)
from .evaluation import DEFAULT_KS, SAMPLED_NEGATIVES, evaluate_model
from .models.base import SequentialRecommender
from .models.registry import MODELS
from .reports import METRICS, _progress, loss_keys, print_metrics, run_report, say, warn, write_report
from .train_config import (LOOP_OWNED, TrainConfig, build_model_config, check_device, check_resumable,
                           config_from_dict, load_checkpoint, make_config, resume_config)
from .training_step import TrainingStep

__all__ = ["HOST_READ_EVERY", "LOCK", "MODELS", "SELECT_METRIC", "TrainConfig", "atomic_save", "build_model",
           "claim_out", "evaluate_checkpoint", "load_checkpoint", "make_config", "out_of_memory_message",
           "print_metrics", "resume_config", "train"]

SELECT_METRIC = "NDCG@10"
# Steps between host reads of the running losses (progress bar, early stop on NaN): each is a
# device sync on a GPU, so not every step.
HOST_READ_EVERY = 20


def build_model(config: TrainConfig, dataset: SequenceDataset) -> SequentialRecommender:
    """The model named by `config`: its `model_config` with the catalog fields of `dataset`
    (catalog size, attribute vocabularies, number of domains) and the loop's max_len and backend
    (validated with them), built."""
    spec = MODELS[config.model]
    model_config = config.model_config
    if model_config is None:  # a TrainConfig made by hand: the model's defaults
        model_config = build_model_config(spec, {}, config)
    names = {f.name for f in dataclasses.fields(model_config)}
    loop = {key: getattr(config, key) for key in LOOP_OWNED if key in names}
    return spec.model_cls(dataclasses.replace(model_config, **loop, **spec.catalog(dataset)))


def out_of_memory_message(exc: BaseException) -> Optional[str]:
    """For an allocation failure (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError,
    which has no class of its own) one line naming the flags that size the memory; else None."""
    if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))):
        return None
    return (f"out of memory ({_one_line(exc, 160)}); lower --batch-size, --eval-batch-size, --max-len or the "
            "model size (--hidden, --inner, --layers, --num-negatives)")


def _evaluate(model: SequentialRecommender, split: EvalSet, dataset: SequenceDataset, config: TrainConfig,
              device: torch.device, seed_offset: int, group: Group = SINGLE) -> dict[str, float]:
    batches = eval_batches(split, dataset.features, config.eval_batch_size, config.max_len)
    return evaluate_model(model, batches, device, DEFAULT_KS, sampled=config.sampled_eval,
                          seed=config.seed + seed_offset, exclude_history=config.exclude_history,
                          share=group if group.parallel else None)


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


@dataclass
class _Run:
    """A run in progress: its data, model, optimizer and what the epochs so far produced (epoch =
    the last finished one; best = {"epoch", "metric", "valid", "state"[, "test"]})."""

    config: TrainConfig
    out: Path
    device: torch.device
    dataset: SequenceDataset
    splits: Splits
    identity: dict[str, Any]
    model: SequentialRecommender
    optimizer: torch.optim.Optimizer
    log: Callable[[str], None]
    group: Group = SINGLE
    epoch: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "metric": -1.0, "valid": {}, "state": None})

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def evaluate(self, split: EvalSet, seed_offset: int) -> dict[str, float]:
        """Metrics of the model as it is now on `split` (every process's share, reduced)."""
        return _evaluate(self.model, split, self.dataset, self.config, self.device, seed_offset, self.group)

    def progress(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best": self.best, "history": self.history, "train_seconds": self.train_seconds}


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = say,
          warn: Callable[[str], None] = warn) -> dict[str, Any]:
    """Run (or continue, with `resume`) the training described by `config`; returns metrics.json's dict.

    Before any work: the options (`TrainConfig.validate`), then --out (made, writable, and locked
    for the whole run: `claim_out`). A resumed run must find the same options and the same data
    (`data_identity`) as its checkpoint. An epoch whose loss or weights stop being finite ends the
    run with a ValueError naming --lr and --weight-decay; that epoch is not saved, so the
    checkpoint keeps the last good one.

    Under torchrun every process returns the same dict; only rank 0 logs, warns, holds the lock
    and writes (module docstring).
    """
    config.validate()
    out = Path(config.out)
    with launch(config.device) as (group, device):
        group = _item_sharding(config, group)
        if not group.main:
            log = warn = _silent
        with claim_out(out) if group.main else contextlib.nullcontext():
            state: Optional[dict[str, Any]] = None
            if resume:
                state = load_checkpoint(out / CHECKPOINT, "--resume")
                check_resumable(state, config)
            run = _start(config, state, out, log, warn, group, device)
            step = TrainingStep(run.model, run.optimizer, compile=config.compile,  # compiled once per run
                                wrap=group.wrap if group.parallel else None)
            for epoch in range(run.epoch + 1, config.epochs + 1):
                if epoch - run.best["epoch"] > config.patience and run.best["epoch"] > 0:
                    break
                _run_epoch(run, step, epoch)
            return _finish(run)


def _item_sharding(config: TrainConfig, group: Group) -> Group:
    """`group` marked item-sharded for --item-shards N > 1, which must be the number of processes."""
    if config.item_shards == 1:
        return group
    if config.item_shards != group.world:
        raise ValueError(f"--item-shards {config.item_shards} must equal the number of processes: start the run "
                         f"with torchrun --nproc-per-node {config.item_shards} (this run has {group.world})")
    return dataclasses.replace(group, item_sharded=True)


def _silent(message: str) -> None:
    """The log and warnings of the processes other than rank 0."""


def _start(config: TrainConfig, state: Optional[dict[str, Any]], out: Path, log: Callable[[str], None],
           warn: Callable[[str], None], group: Group, device: torch.device) -> _Run:
    """Data, model (seeded), optimizer; with a checkpoint `state`, everything it saved restored."""
    dataset, splits = _load_splits(config, log)
    identity = data_identity(config, dataset)
    if state is not None:
        _check_data(state, identity, out / CHECKPOINT, warn, refuse=True)
    torch.manual_seed(config.seed)
    model = build_model(config, dataset).to(device)
    if MODELS[config.model].prepare is not None:
        MODELS[config.model].prepare(model, splits.train)
    if group.item_sharded:  # before the optimizer: it holds this process's rows only
        shard_item_table(model, group, config.backend)
    # fused: one kernel over all parameters (CPU and CUDA), the per-step overhead of small batches
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    run = _Run(config, out, device, dataset, splits, identity, model, optimizer, log, group)
    if state is not None:
        if group.item_sharded:  # checkpoints hold the whole table's optimizer state
            state = {**state, "optimizer": shard_optimizer_state(model, state["optimizer"])}
        _restore(state, model, optimizer, device, run.checkpoint)
        run.history, run.best, run.train_seconds, run.epoch = (state["history"], state["best"],
                                                               state["train_seconds"], state["epoch"])
        if config.track_test and run.best["state"] is not None and "test" not in run.best:  # --track-test added
            run.best["test"] = _evaluate_state(run, run.best["state"])
        log(f"resumed from {run.checkpoint} after epoch {run.epoch} (best epoch {run.best['epoch']})")
    params = sum(p.numel() for p in model.parameters())
    where = f" x {group.world} processes (data-parallel)" if group.parallel else ""
    log(f"model: {config.model} ({params:,} parameters) on {device}{where}, preset {config.preset}, "
        f"options {config.model_options}")
    return run


def _run_epoch(run: _Run, step: TrainingStep, epoch: int) -> None:
    """Train one epoch, validate, keep the best state, log the epoch's line and save the checkpoint."""
    config = run.config
    means, epoch_seconds = _train_epoch(step, run.splits.train, config, run.device, epoch, run.group)
    _check_finite(means, run.model, epoch, config, run.checkpoint)
    run.train_seconds += epoch_seconds
    tick = time.perf_counter()
    valid = run.evaluate(run.splits.valid, seed_offset=1)
    eval_seconds = time.perf_counter() - tick
    record = {"epoch": epoch, **means, "train_seconds": epoch_seconds, "eval_seconds": eval_seconds,
              **{f"valid_{k}": v for k, v in valid.items() if k != "users"}}
    run.history.append(record)
    improved = valid[SELECT_METRIC] > run.best["metric"]
    if improved:
        run.best = {"epoch": epoch, "metric": valid[SELECT_METRIC], "valid": valid,
                    "state": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}}
        if config.track_test:  # what a run stopped after this epoch would report (eval only: no RNG)
            run.best["test"] = run.evaluate(run.splits.test, seed_offset=2)
    if config.track_test:
        record["test_at_best"] = {k: v for k, v in run.best["test"].items() if k != "users"}
        record["best_epoch_so_far"] = run.best["epoch"]
    parts = "  ".join(f"{k} {record[k]:.4f}" for k in loss_keys(record) if k != "loss")
    run.log(f"epoch {epoch:3d}  loss {record.get('loss', float('nan')):.4f}{'  ' + parts if parts else ''}  "
            f"valid HR@10 {valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f}{'  *' if improved else ''}  "
            f"train {epoch_seconds:.1f} s  eval {eval_seconds:.1f} s")
    run.epoch = epoch
    whole = None
    if run.group.item_sharded:  # gathering the table's rows is a collective: every process takes part
        whole = (run.model.state_dict(), whole_optimizer_state(run.model, run.optimizer))
    if run.group.main:  # the others wait below until the checkpoint is in place
        with _writing(run.out):
            save_checkpoint(run.checkpoint, config.to_dict(), run.progress(), run.model, run.optimizer, run.device,
                            run.dataset.summary(), run.identity, whole)
    run.group.barrier()


def _finish(run: _Run) -> dict[str, Any]:
    """Test metrics of the best state; metrics.json and curves.png written; returns metrics.json's dict."""
    if run.best["state"] is not None:
        run.model.load_state_dict(run.best["state"])
    test = run.evaluate(run.splits.test, seed_offset=2)
    metrics = run_report(run.best["valid"], test, run.best["epoch"], run.history, run.train_seconds, run.config,
                         run.dataset.summary(), run.device, processes=run.group.world)
    if run.group.main:
        write_report(metrics, run.out, run.config, run.log)
    run.log(f"best epoch {metrics['best_epoch']}: test " +
            "  ".join(f"{k} {metrics['test'][k]:.4f}" for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20")))
    run.log(f"wrote {run.out / METRICS} and {run.checkpoint}")
    return metrics


def _evaluate_state(run: _Run, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test metrics of `weights`, leaving the model's own weights as they were."""
    current = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run.model.load_state_dict(weights)
    try:
        return run.evaluate(run.splits.test, seed_offset=2)
    finally:
        run.model.load_state_dict(current)


def _train_epoch(train_step: TrainingStep, train_split: SequenceDataset, config: TrainConfig, device: torch.device,
                 epoch: int, group: Group = SINGLE) -> tuple[dict[str, float], float]:
    """One pass over the training split: (each loss averaged over the steps, seconds).

    The running loss sums stay on the device; the host reads them (one sync on a GPU) only every
    HOST_READ_EVERY steps, for the progress bar and to stop early once they are not finite, and
    at the end. _check_finite then refuses the epoch before anything is saved. Data-parallel
    (`group`): this process's share of each batch, its losses weighted by its share of the
    targets, the sums added over the processes when read (every process reads the same values)."""
    train_step.model.train()
    group.seed_epoch(config.seed, epoch)
    steps = num_train_batches(train_split, config.batch_size, unit=config.batch_unit, max_len=config.max_len,
                              seed=config.seed, epoch=epoch, bucket_batches=config.bucket_batches)
    sums: dict[str, torch.Tensor] = {}
    rows, tick = 0, time.perf_counter()
    bar = _progress(train_batches(train_split, config.batch_size, config.max_len, shuffle=True,
                                  seed=config.seed, epoch=epoch, unit=config.batch_unit,
                                  bucket_batches=config.bucket_batches),
                    steps, f"epoch {epoch}/{config.epochs}", config.progress and group.main)
    try:
        for step, batch in enumerate(bar, 1):
            batch, share = group.share(batch)
            batch = batch.to(device)
            losses = train_step(batch, group.loss_scale(share))
            rows += int(batch.items.shape[0])
            for key, value in losses.items():
                value = value.detach().to(torch.float64)
                if share is not None:
                    value = value * share
                sums[key] = sums[key] + value if key in sums else value
            if step % HOST_READ_EVERY == 0:
                host = _read_sums(group.reduce_sums(sums))
                if not all(math.isfinite(v) for v in host.values()):
                    break
                bar.set_postfix({k: f"{v / step:.4f}" for k, v in host.items()} |
                                {"seq/s": f"{rows / (time.perf_counter() - tick):.0f}"}, refresh=False)
    finally:
        bar.close()
    host = _read_sums(group.reduce_sums(sums))
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


def evaluate_checkpoint(path: str | Path, device: Optional[str] = None, sampled: Optional[bool] = None,
                        log: Callable[[str], None] = say, exclude_history: bool = True,
                        warn: Callable[[str], None] = warn) -> dict[str, Any]:
    """Valid and test metrics of the best state stored in a training checkpoint.

    ValueError on one line for a bad `device` (naming --device), a file that is not a readable
    checkpoint (naming --checkpoint and the file, see `load_checkpoint`) or weights that do not
    fit the data as it is now; a warning (`warn`) when the data differs from the checkpoint's.
    Checkpoints of earlier versions load (their options are converted, `config_from_dict`).
    """
    if device is not None:
        check_device(device)
    path = Path(path)
    state = load_checkpoint(path, "--checkpoint")
    raw = dict(state["config"])
    try:
        config = config_from_dict(raw)
        if device is not None:
            config.device = device
        if sampled is not None:
            config.sampled_eval = sampled
        config.exclude_history = exclude_history
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
