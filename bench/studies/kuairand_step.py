#!/usr/bin/env python
"""Large catalog: one training step with the full-catalog softmax over KuaiRand's 944k items.

Loads `../shared/data/crossdomain/kuairand_cdsr.tsv.gz` (3,101 training sequences of up to 800
items, 944k distinct items, 7 event-type domains), builds a model with the `small` preset (and
max_len 800), takes one batch of the longest training sequences, and times a few full training
steps (forward, full-catalog cross-entropy over every item, backward, Adam) after one warm-up.
Peak memory is measured two ways:

- `torch_peak_mib`: the peak of torch's CPU allocator during one step above what was allocated
  before it (torch.profiler memory events, as in bench/suite/_common.py): the step's working memory,
  gradients and optimizer state updates included;
- `rss_peak_mib`: the process's peak resident set (everything: Python, the tables, the step).

Next to them: what the naive loss (`hidden @ item_weight.T` then `F.cross_entropy`) would need
just for its N×V float32 logits and their gradient, for the same N rows.

    python bench/studies/kuairand_step.py --model autocdsr --out bench/results/kuairand-step-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "suite"))  # the suite's helpers (_common)
from _common import _cpu_peak_bytes, describe_machine, machine_description  # noqa: E402

from fastattn.data import load_dataset, split_dataset, train_batches  # noqa: E402
from fastattn.models.blocks import valid_positions  # noqa: E402
from fastattn.train import build_model, make_config  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "crossdomain" / "kuairand_cdsr.tsv.gz"
MIB = 2 ** 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="autocdsr")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--sequences", type=int, default=8, help="sequences per batch (the longest ones)")
    ap.add_argument("--max-len", type=int, default=800)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    dataset = load_dataset(args.data)
    splits = split_dataset(dataset)
    load_seconds = time.perf_counter() - start
    config = make_config(args.model, "small", data=args.data, max_len=args.max_len,
                         batch_size=args.sequences, batch_unit="sequences")
    torch.manual_seed(0)
    model = build_model(config, dataset)
    if hasattr(model, "set_teacher") and getattr(model.config, "kd_weight", 0) > 0:
        model.set_teacher(splits.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    # the batch of the longest training sequences: the largest step the data set asks for
    longest = np.argsort(-splits.train.lengths(), kind="stable")[: args.sequences]
    batch = next(iter(train_batches(splits.train.select(longest), args.sequences, args.max_len, shuffle=False)))
    rows = int(valid_positions(batch).sum())
    items = dataset.num_items

    def step() -> dict[str, float]:
        losses = model.losses(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    model.train()
    first = step()  # warm-up: allocates the gradients and Adam's state
    seconds = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        last = step()
        seconds.append(time.perf_counter() - tick)
    torch_peak = _cpu_peak_bytes(step) / MIB
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    naive_logits = rows * items * 4 / MIB
    report: dict[str, Any] = {
        "benchmark": "one training step, full-catalog softmax over every KuaiRand item (CPU)",
        "command": " ".join(["python", "bench/studies/kuairand_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "model_options": config.model_options,
        "data": os.path.relpath(args.data, REPO),
        "dataset": dataset.summary(),
        "load_seconds": load_seconds,
        "batch": {"sequences": int(batch.items.shape[0]), "length": int(batch.items.shape[1]),
                  "target_rows": rows, "catalog": items},
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": seconds,
        "median_step_seconds": statistics.median(seconds),
        "losses_first_step": first,
        "losses_last_step": last,
        "torch_peak_mib": torch_peak,
        "rss_peak_mib": rss_peak,
        "naive_logits_mib": naive_logits,
        "naive_logits_and_grad_mib": 2 * naive_logits,
        "item_table_mib": (items + 1) * model.config.hidden * 4 / MIB,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_description(),
    }
    text = _markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0


def _markdown(r: dict[str, Any]) -> str:
    b = r["batch"]
    return "\n".join([
        f"# {r['benchmark']}",
        "",
        f"Machine: {describe_machine()}, torch threads {r['torch_threads']}.",
        f"Command: `{r['command']}`",
        "",
        f"Model `{r['model']}` ({r['parameters']:,} parameters; item table {r['item_table_mib']:.0f} MiB), "
        f"batch of the {b['sequences']} longest training sequences (length {b['length']}): "
        f"{b['target_rows']:,} target rows scored against all {b['catalog']:,} items.",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| step time, median of {len(r['step_seconds'])} (fwd + full-catalog CE + bwd + Adam) | "
        f"{r['median_step_seconds']:.2f} s |",
        f"| torch allocator peak during a step (above the resident model and optimizer) | {r['torch_peak_mib']:,.0f} MiB |",
        f"| process peak RSS (everything) | {r['rss_peak_mib']:,.0f} MiB |",
        f"| naive loss: the N×V fp32 logits alone | {r['naive_logits_mib']:,.0f} MiB |",
        f"| naive loss: logits + their gradient | {r['naive_logits_and_grad_mib']:,.0f} MiB |",
        "",
        f"Losses: first step {_fmt(r['losses_first_step'])}; last step {_fmt(r['losses_last_step'])}.",
        "",
    ])


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())


if __name__ == "__main__":
    sys.exit(main())
