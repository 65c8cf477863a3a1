"""Side-by-side report: fastattn's SASRec / DIF-SR against RecBole 1.2.1's SASRec on Beauty.

Reads the runs' JSON files (fastattn: the `metrics.json` of `python -m fastattn train ...
--track-test`; RecBole: the output of `bench/studies/peer_recbole.py`) and compares them at the same
number of epochs N (default: as many as every run completed): test HR/NDCG@10 of the state
with the best validation NDCG@10 within the first N epochs, and training seconds per epoch.
Writes a markdown table and a plot of validation NDCG@10 per epoch.

    python bench/studies/beauty_report.py --recbole bench/results/peer-recbole-beauty-masked.json \\
        --recbole bench/results/peer-recbole-beauty.json \\
        --run "fastattn SASRec=bench/results/beauty-sasrec-cpu.json" \\
        --run "fastattn DIF-SR=bench/results/beauty-difsr-cpu.json" --out bench/results/beauty-cpu
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import textwrap
from pathlib import Path
from typing import Any, Optional


def fastattn_run(path: Path) -> dict[str, Any]:
    m = json.loads(path.read_text())
    history = m["history"]

    def test_at(n: int) -> Optional[dict[str, float]]:
        if n <= len(history) and "test_at_best" in history[n - 1]:
            t = history[n - 1]["test_at_best"]
        elif n == len(history):
            t = m["test"]
        else:
            return None  # a run without --track-test only knows its final budget
        return {"HR@10": t["HR@10"], "NDCG@10": t["NDCG@10"]}

    return {
        "epochs": len(history),
        "valid_ndcg10": [h["valid_NDCG@10"] for h in history],
        "train_seconds": [h["train_seconds"] for h in history],
        "test_at": test_at,
        "best_epoch_at": lambda n: (history[n - 1].get("best_epoch_so_far", m["best_epoch"])
                                    if n <= len(history) else None),
        "options": m["config"]["model_options"],
        "masked": m["config"].get("exclude_history", True),
        "train_loss": [h["loss"] for h in history],
    }


TEST_LINE = re.compile(r"^\[peer\] epoch (\d+) test (\{.*\})$")


def recbole_tests(log: Path) -> dict[int, dict[str, float]]:
    """The peer script's log holds a test line each time validation improved: {0-based epoch: metrics}."""
    tests: dict[int, dict[str, float]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            match = TEST_LINE.match(line.strip())
            if match:
                tests[int(match.group(1))] = ast.literal_eval(match.group(2))
    return tests


def recbole_run(path: Path) -> dict[str, Any]:
    r = json.loads(path.read_text())
    valid = r["per_epoch_valid_ndcg10"]
    # every test the peer ran (its log, beside the JSON), else only the latest one in the JSON
    tests = recbole_tests(path.with_suffix(".log"))
    if r.get("test_metrics_epoch") is not None:
        tests.setdefault(r["test_metrics_epoch"], r["test_metrics_at_best_epoch"])

    def test_at(n: int) -> Optional[dict[str, float]]:
        # the peer script tests every time validation improves: the test of the best epoch within n
        if n > len(valid):
            return None
        t = tests.get(max(range(n), key=lambda i: (valid[i], -i)))
        return {"HR@10": t["hit@10"], "NDCG@10": t["ndcg@10"]} if t else None

    batches = r.get("recbole_counts", {}).get("train_batches_per_epoch") or 1

    return {
        "epochs": len(valid),
        "valid_ndcg10": valid,
        "train_seconds": r["per_epoch_train_seconds"],
        "test_at": test_at,
        "best_epoch_at": lambda n: max(range(n), key=lambda i: (valid[i], -i)) + 1 if n <= len(valid) else None,
        "options": {"threads": r.get("torch_num_threads"), "recbole": r.get("recbole_version")},
        "masked": bool(r.get("mask_history", False)),
        # RecBole logs the sum of the batch losses; fastattn the mean
        "train_loss": [x / batches for x in r["per_epoch_train_loss"]],
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recbole", type=Path, action="append", required=True,
                    help="bench/studies/peer_recbole.py JSON (repeatable; the first is the speed reference)")
    ap.add_argument("--run", action="append", default=[], help="LABEL=path/to/metrics.json (fastattn)")
    ap.add_argument("--epochs", type=int, default=None, help="compare at N epochs (default: the shortest run)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes STEM.md and STEM.png")
    ap.add_argument("--machine", default="AMD EPYC, 2 cores, 24 GiB, torch 2.13.0+cpu")
    args = ap.parse_args(argv)

    runs = {}
    for path in args.recbole:
        run = recbole_run(path)
        runs[f"RecBole 1.2.1 SASRec{'' if run['masked'] else ' (history not masked)'}"] = run
    for spec in args.run:
        label, _, path = spec.rpartition("=")
        runs[label] = fastattn_run(Path(path))
    n = args.epochs or min(r["epochs"] for r in runs.values())
    peer = next(iter(runs.values()))
    peer_sec = statistics.median(peer["train_seconds"][:n])
    lines = [f"Amazon Beauty (S3Rec files), leave-one-out, full ranking (history masked unless the row "
             f"says otherwise: RecBole 1.2.1 masks nothing for sequential models); compared at {n} epochs "
             f"(test at the best validation NDCG@10 within them). Machine: {args.machine}.", "",
             "| run | history masked | best epoch | test HR@10 | test NDCG@10 | train s/epoch (median) | vs RecBole |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, run in runs.items():
        test = run["test_at"](n)
        sec = statistics.median(run["train_seconds"][:n])
        hr = f"{test['HR@10']:.4f}" if test else "n/a"
        nd = f"{test['NDCG@10']:.4f}" if test else "n/a"
        lines.append(f"| {label} | {'yes' if run['masked'] else 'no'} | {run['best_epoch_at'](n)} | {hr} | {nd} | {sec:.1f} | "
                     f"{peer_sec / sec:.1f}× |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 3.8))
    shown: set[tuple[float, ...]] = set()
    for label, run in runs.items():
        epochs = list(range(1, run["epochs"] + 1))
        ax1.plot(epochs, run["valid_ndcg10"], marker=".", label=label)
        key = tuple(round(x, 4) for x in run["train_loss"])
        # SASRec's losses only (the other models add auxiliary terms); the two RecBole runs
        # train identically: one curve
        if "SASRec" in label and key not in shown:
            shown.add(key)
            ax0.plot(list(range(1, len(run["train_loss"]) + 1)), run["train_loss"], marker=".", label=label)
    ax0.set_xlabel("epoch")
    ax0.set_ylabel("SASRec training loss (mean per batch)")
    ax0.legend(fontsize=7)
    ax1.axvline(n, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation NDCG@10")
    ax1.legend(fontsize=7)
    labels = list(runs)
    ax2.bar(range(len(labels)), [statistics.median(runs[k]["train_seconds"][:n]) for k in labels])
    ax2.set_xticks(range(len(labels)), [textwrap.fill(k, 16) for k in labels], fontsize=6)
    ax2.set_ylabel("training seconds per epoch (median)")
    fig.suptitle("SASRec / DIF-SR / MQSA-TED on Beauty, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
