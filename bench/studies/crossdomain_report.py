"""Side-by-side report of cross-domain training runs (Amazon Toy/Game): per-domain test metrics
at the same epoch budget, and AutoCDSR's mean a_cd per epoch.

Reads the `metrics.json` of `python -m fastattn train ... --track-test` runs and compares them at
N epochs (default: the shortest run): the test metrics of the state with the best validation
NDCG@10 within the first N epochs, overall and per target domain. Writes STEM.md and STEM.png
(validation NDCG@10 per epoch; training a_cd per epoch for the runs that log it).

    python bench/studies/crossdomain_report.py --run "SASRec=runs/toygame-sasrec/metrics.json" \\
        --run "AutoCDSR=runs/toygame-autocdsr/metrics.json" --out bench/results/toygame-cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

KEYS = ("HR@10", "NDCG@10")


def checkpoint_acd(path: Path, batches: int = 100) -> float:
    """Mean a_cd of a SASRec (or AutoCDSR) checkpoint's best state on its training split, eval mode:
    the state is loaded into an AutoCDSR (same module names), whose layers report a_cd from the
    fused kernel. So a plain SASRec's cross-domain attention can be set beside AutoCDSR's."""
    import torch

    from fastattn.data import load_dataset, split_dataset, train_batches
    from fastattn.train import build_model, load_checkpoint, make_config

    state = load_checkpoint(path, "--acd-checkpoint")
    config = state["config"]
    data = load_dataset(config["data"], config.get("format"))
    options = {k: v for k, v in config["model_options"].items() if k in ("hidden", "layers", "heads", "inner")}
    model = build_model(make_config("autocdsr", "small", data=config["data"], acd_mode="fixed",
                                    max_len=config["max_len"], **options), data)
    model.load_state_dict(state["best"]["state"] or state["model"], strict=False)
    model.eval()
    values = []
    with torch.no_grad():
        for i, batch in enumerate(train_batches(split_dataset(data).train, 256, config["max_len"], shuffle=False,
                                                unit="targets")):
            if i == batches:
                break
            values.append(float(model.losses(batch)["acd"]))
    return sum(values) / max(1, len(values))


def load(path: Path) -> dict[str, Any]:
    m = json.loads(path.read_text())
    if not m.get("history"):
        raise ValueError(f"{path}: no per-epoch history (not a fastattn metrics.json?)")
    return m


def test_at(m: dict[str, Any], n: int) -> Optional[dict[str, float]]:
    """Test metrics of the best validation state within the first n epochs (None if unknown)."""
    history = m["history"]
    if n <= len(history) and "test_at_best" in history[n - 1]:
        return history[n - 1]["test_at_best"]
    # A run that early-stopped before n epochs (patience) has spent its budget: its final test is its answer.
    return m["test"] if n == len(history) or stopped_early(m, n) else None


def stopped_early(m: dict[str, Any], n: int) -> bool:
    """True when the run ended before n epochs although it was asked for at least n (early stopping)."""
    return len(m["history"]) < min(n, int(m["config"].get("epochs", 0)))


def domains_of(metrics: dict[str, float]) -> list[int]:
    return sorted({int(k.split("_", 1)[0][len("domain"):]) for k in metrics if k.startswith("domain")})


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=path/to/metrics.json (repeatable)")
    ap.add_argument("--epochs", type=int, default=None, help="compare at N epochs (default: the shortest run)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes STEM.md and STEM.png")
    ap.add_argument("--acd-checkpoint", action="append", default=[],
                    help="LABEL=DIR/checkpoint.pt: also report that model's mean a_cd on its training split")
    ap.add_argument("--machine", default="AMD EPYC, 2 cores, 24 GiB, torch 2.13.0+cpu, one thread per run")
    args = ap.parse_args(argv)

    runs: dict[str, dict[str, Any]] = {}
    for spec in args.run:
        label, sep, path = spec.rpartition("=")
        if not sep:
            ap.error(f"--run must be LABEL=PATH, got {spec!r}")
        runs[label] = load(Path(path))
    n = args.epochs or min(len(m["history"]) for m in runs.values())
    first = next(iter(runs.values()))
    data = Path(first["config"]["data"]).name
    domains = domains_of(first["test"])
    head = ["run", "best epoch", *[f"test {k}" for k in KEYS]]
    head += [f"domain {d} {k}" for d in domains for k in KEYS]
    head += ["mean a_cd (epoch 1 → N)", "train s/epoch"]
    lines = [f"{data}: leave-one-out, full ranking over all items with the history masked, per target "
             f"domain too; compared at {n} epochs (test at the best validation NDCG@10 within them). "
             f"Machine: {args.machine}.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, m in runs.items():
        test = test_at(m, n)
        history = m["history"][:n]
        best = history[-1].get("best_epoch_so_far", m["best_epoch"]) if test is not None else "n/a"
        if stopped_early(m, n):
            best = f"{best} (stopped at {len(history)})"
        cells = [label, str(best)]
        cells += [f"{test[k]:.4f}" if test else "n/a" for k in KEYS]
        cells += [f"{test[f'domain{d}_{k}']:.4f}" if test else "n/a" for d in domains for k in KEYS]
        acd = [h["acd"] for h in history if "acd" in h]
        cells.append(f"{acd[0]:.4f} → {acd[-1]:.4f}" if acd else "—")
        cells.append(f"{statistics.median(h['train_seconds'] for h in history):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    for spec in args.acd_checkpoint:
        label, _, path = spec.rpartition("=")
        lines += ["", f"{label}: mean a_cd of its best state on the training split (eval mode, first 100 "
                  f"batches): {checkpoint_acd(Path(path)):.4f}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acd = [label for label, m in runs.items() if "acd" in m["history"][0]]
    fig, axes = plt.subplots(1, 2 if with_acd else 1, figsize=(10 if with_acd else 5, 3.6), squeeze=False)
    for label, m in runs.items():
        epochs = [h["epoch"] for h in m["history"]]
        axes[0][0].plot(epochs, [h["valid_NDCG@10"] for h in m["history"]], marker=".", label=label)
    axes[0][0].axvline(n, color="grey", lw=0.8, ls=":")
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("validation NDCG@10")
    axes[0][0].legend(fontsize=8)
    for label in with_acd:
        history = runs[label]["history"]
        axes[0][1].plot([h["epoch"] for h in history], [h["acd"] for h in history], marker=".", label=label)
    if with_acd:
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_ylabel("mean a_cd (training)")
        axes[0][1].set_yscale("log")
        axes[0][1].legend(fontsize=8)
    fig.suptitle(f"cross-domain models on {data}, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
