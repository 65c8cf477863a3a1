"""What a training run shows and reports: the default log and warning lines (`say`, `warn`), the
progress bar of an epoch (`_progress`), DIR/metrics.json (`METRICS`: `run_report` assembles it,
`write_report` writes it atomically with the curves) and its device line (`_describe_device`), the
per-epoch loss keys (`loss_keys`), the curves plot (DIR/curves.png: loss and validation NDCG@10 per
epoch, `_plot`, written atomically) and the terminal table of valid/test metrics (`print_metrics`).
Nothing here imports the training modules at run time (`TrainConfig` appears in annotations only).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .checkpoints import _atomic_write, _writing, atomic_write_json

if TYPE_CHECKING:  # annotations only: the training modules import this one, not the other way round
    from .train_config import TrainConfig

METRICS = "metrics.json"


def warn(message: str) -> None:
    """Default warning: a line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs redirected to a file stay readable)
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=None if enabled else True,
                dynamic_ncols=True, mininterval=0.5)


def say(message: str) -> None:
    """Default log: a line on stdout, flushed (logs redirected to files stay current)."""
    print(message, flush=True)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


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
    try:
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def run_report(valid: dict[str, float], test: dict[str, float], best_epoch: int, history: list[dict[str, Any]],
               train_seconds: float, config: TrainConfig, dataset: str, device: torch.device,
               processes: int = 1) -> dict[str, Any]:
    """metrics.json's dict: valid metrics of the best epoch, its test metrics, timings, the saved
    config (`TrainConfig.to_dict`), the data set's summary, the device and the per-epoch history;
    a data-parallel run (`processes` > 1) also "processes", and its device line says how many."""
    epochs_run = len(history)
    extra = {"processes": processes} if processes > 1 else {}
    where = _describe_device(device)
    return {
        "valid": valid,
        "test": test,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "train_seconds": train_seconds,
        "train_seconds_per_epoch": train_seconds / max(1, epochs_run),
        "config": config.to_dict(),
        "dataset": dataset,
        "device": f"{processes} processes, each on {where}" if processes > 1 else where,
        **extra,
        "history": history,
    }


def write_report(metrics: dict[str, Any], out: Path, config: TrainConfig, log: Callable[[str], None]) -> None:
    """DIR/metrics.json and DIR/curves.png, each atomically; an OSError as a ValueError naming --out."""
    with _writing(out):
        atomic_write_json(metrics, out / METRICS)
        _plot(metrics["history"], out / "curves.png", config, log)


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
