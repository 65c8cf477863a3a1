#!/usr/bin/env python
"""SASRec's training epoch on Amazon Beauty against its floor on this machine (issue 21).

The epoch: `python -m fastattn train --model sasrec --data Beauty.txt --epochs E` as a user runs
it (the "small" preset, backend "auto", --loss ce: the full-catalog cross-entropy), in a child
process with --threads torch threads; its per-epoch `train_seconds` from metrics.json.

The floor: the three GEMMs a full-catalog cross-entropy cannot avoid, for that epoch's targets —
logits H·Eᵀ (N×V), dH = G·E and dE = Gᵀ·H, each 2·N·V·D flops, with N the epoch's target
positions (padding excluded), V the catalog and D the hidden size — timed with torch.mm on random
float32 data over row blocks of --block targets (so the N×V logits never exist at once), with
the same thread count, in this process after the training has finished. Median of --repeats.

    python bench/studies/beauty_epoch_floor.py --out bench/results/beauty-epoch-floor-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "suite"))
from _common import describe_machine, machine_description  # noqa: E402

from fastattn.data import load_dataset, split_dataset, train_batches  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "s3rec" / "Beauty.txt"


def _train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the training command in a child process; its metrics.json."""
    command = [sys.executable, "-m", "fastattn", "train", "--model", "sasrec", "--data", str(args.data),
               "--epochs", str(args.epochs), "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return json.loads((out / "metrics.json").read_text())


def _epoch_targets(args: argparse.Namespace, config: dict[str, Any]) -> tuple[int, int, int]:
    """(target positions, rows of the batches, num_items) of epoch 1 with the run's batching."""
    dataset = load_dataset(str(args.data))
    train = split_dataset(dataset).train
    targets = rows = 0
    for batch in train_batches(train, config["batch_size"], config["max_len"], shuffle=True, seed=config["seed"],
                               epoch=1, unit=config["batch_unit"], bucket_batches=config["bucket_batches"]):
        targets += int((batch.targets != 0).sum())
        rows += batch.targets.numel()
    return targets, rows, dataset.num_items


def _floor_seconds(n: int, v: int, d: int, block: int) -> float:
    """One pass of the three N×V×D GEMMs over row blocks of `block` targets (float32, torch.mm)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(v, d, generator=gen)
    hidden = torch.randn(block, d, generator=gen)
    grad_logits = torch.empty(block, v)
    grad_weight = torch.zeros(v, d)
    logits = torch.empty(block, v)
    tick = time.perf_counter()
    for start in range(0, n, block):
        rows = min(block, n - start)
        h = hidden[:rows]
        torch.mm(h, weight.t(), out=logits[:rows])
        g = grad_logits[:rows]
        torch.mm(g, weight)  # dH
        grad_weight.addmm_(g.t(), h)  # dE
    return time.perf_counter() - tick


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Beauty.txt (S3Rec format)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the training run (each timed)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in the training and the floor")
    ap.add_argument("--block", type=int, default=4096, help="targets per GEMM block of the floor")
    ap.add_argument("--repeats", type=int, default=3, help="floor passes (median)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        ap.error(f"--data: no such file: {args.data}")
    for name in ("epochs", "threads", "block", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    with tempfile.TemporaryDirectory() as tmp:
        metrics = _train(args, Path(tmp) / "run")
    config = metrics["config"]
    epochs = [record["train_seconds"] for record in metrics["history"]]
    targets, rows, num_items = _epoch_targets(args, config)
    dim = config["model_options"]["hidden"]
    torch.set_num_threads(args.threads)
    _floor_seconds(min(targets, args.block), num_items, dim, args.block)  # warm-up
    floors = [_floor_seconds(targets, num_items, dim, args.block) for _ in range(args.repeats)]
    floor = statistics.median(floors)
    epoch = statistics.median(epochs)
    flops = 6 * targets * num_items * dim
    machine = machine_description()
    result = {"epoch_seconds": epochs, "epoch_median": epoch, "floor_seconds": floors, "floor_median": floor,
              "ratio": epoch / floor, "targets": targets, "rows": rows, "num_items": num_items, "hidden": dim,
              "floor_gflops": flops / floor / 1e9, "threads": args.threads, "machine": machine,
              "command": "python bench/studies/beauty_epoch_floor.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    lines = [
        "# SASRec on Amazon Beauty: one training epoch against its cross-entropy GEMM floor",
        "",
        f"Machine: {describe_machine(machine)}; {args.threads} torch threads.",
        f"Command: `{result['command']}`",
        "",
        f"The epoch: `python -m fastattn train --model sasrec --data Beauty.txt` (small preset, backend auto, "
        f"CE loss), its train_seconds per epoch. The floor: the three N×V×D GEMMs of the full-catalog "
        f"cross-entropy (H·Eᵀ, G·E, Gᵀ·H) for the epoch's N = {targets:,} targets "
        f"({rows:,} rows with padding), V = {num_items:,}, D = {dim}, torch.mm in blocks of {args.block} rows.",
        "",
        "| epoch (s, median) | epochs (s) | floor (s, median) | floor GFLOP/s | epoch / floor |",
        "|---:|---|---:|---:|---:|",
        f"| {epoch:.2f} | {', '.join(f'{s:.2f}' for s in epochs)} | {floor:.2f} | {result['floor_gflops']:.0f} "
        f"| {epoch / floor:.2f}× |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
