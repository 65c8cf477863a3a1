#!/usr/bin/env python
"""The input lookup of a row-sharded item table on CPU gloo ranks: "dense" vs "unique" exchange.

Each of W ranks holds its ItemShard of a float32 (V, D) table (default V = 1M, D = 64) and embeds
its OWN batch of B left-padded histories of width L (default 256 × 50) with
`fastattn.distributed.sharded_embedding`, forward and backward (a fixed cotangent). History
lengths follow a geometric law with median 6 (Amazon Beauty's median is 6; most of a width-50
row is padding) and items a Zipf(1.1) popularity over the catalog, so ids repeat as in real
logs. Per rank and lookup: median step time (--steps after one warm-up, between barriers), each
collective's payload (count_traffic) and the bytes a rank sends with ring algorithms
(all-gather (W−1)·payload, all-reduce 2(W−1)/W·payload), and the distinct ids of the step.

    python bench/studies/sharded_lookup.py --worlds 2 --out bench/results/sharded-lookup-cpu
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "suite"))
sys.path.insert(0, str(REPO / "bench" / "studies"))
from _common import describe_machine, machine_description  # noqa: E402
from distributed_ce import _sent_bytes, _table_rows, _timed, finish_rank, run_world, write_outputs  # noqa: E402

from fastattn.distributed import ItemShard, sharded_embedding  # noqa: E402
from fastattn.distributed.collectives import count_traffic  # noqa: E402

LOOKUPS = ("dense", "unique")


def _batch(rank: int, args: argparse.Namespace) -> torch.Tensor:
    """(B, L) int64 ids of rank `rank`, left padded: geometric lengths (median 6), Zipf items."""
    rng = np.random.default_rng(1000 + rank)
    lengths = np.minimum(rng.geometric(1 - 0.5 ** (1 / 6), args.batch), args.width)
    items = np.minimum(rng.zipf(1.1, (args.batch, args.width)), args.items)
    # spread the popular ids over the catalog (and the shards) with a fixed permutation
    items = (items * 2_654_435_761) % args.items + 1
    ids = np.zeros((args.batch, args.width), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, args.width - n:] = items[row, :n]
    return torch.from_numpy(ids)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    shard = ItemShard(args.items, rank, world)
    weight = torch.nn.Parameter(_table_rows(shard.start, shard.stop, args.dim))
    ids = _batch(rank, args)
    cotangent = torch.randn(*ids.shape, args.dim, generator=torch.Generator().manual_seed(rank))
    every = torch.cat([_batch(r, args) for r in range(world)])
    result: dict[str, Any] = {"rank": rank, "world": world, "threads": torch.get_num_threads(),
                              "ids": ids.numel(), "padding_ids": int((ids == 0).sum()),
                              "distinct_ids_of_step": int(torch.unique(every).numel())}
    for lookup in LOOKUPS:
        def step() -> float:
            out = sharded_embedding(ids, weight, shard=shard, lookup=lookup)
            (out * cotangent).sum().backward()
            weight.grad = None
            return 0.0

        times, _ = _timed(step, args.steps)
        with count_traffic() as log:
            step()
        result[lookup] = {"step_s": times, "step_median_s": statistics.median(times), **_sent_bytes(log)}
    finish_rank(result, world, out)


def _markdown(runs: dict[int, list[dict[str, Any]]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    lines = [f"# Sharded item-table lookup on CPU gloo ranks (V = {args.items:,}, D = {args.dim}, "
             f"B × L = {args.batch} × {args.width} per rank, float32)", "",
             f"Machine: {describe_machine(machine)}.",
             f"Command: `python bench/studies/sharded_lookup.py --items {args.items} --dim {args.dim} "
             f"--batch {args.batch} --width {args.width} --worlds {args.worlds} --steps {args.steps}`", "",
             "A step: `sharded_embedding(ids, item_weight_shard, shard=..., lookup=...)` forward + backward "
             "on the rank's own batch, median of the timed steps; the ranks share this machine's cores.", "",
             "| W | rank | ids (padding) | distinct ids of the step | lookup | step (ms) | payload (bytes) | "
             "ring bytes sent |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for world, ranks in runs.items():
        for r in ranks:
            for lookup in LOOKUPS:
                m = r[lookup]
                lines.append(f"| {world} | {r['rank']} | {r['ids']:,} ({r['padding_ids']:,}) | "
                             f"{r['distinct_ids_of_step']:,} | {lookup} | {m['step_median_s'] * 1e3:.1f} | "
                             f"{sum(m['payload_bytes'].values()):,} | {sum(m['ring_bytes_sent'].values()):,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="V, the catalog size")
    ap.add_argument("--dim", type=int, default=64, help="D, the hidden size")
    ap.add_argument("--batch", type=int, default=256, help="B, histories per rank")
    ap.add_argument("--width", type=int, default=50, help="L, the padded history width")
    ap.add_argument("--worlds", default="2", help="comma-separated world sizes (>= 1)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    machine = machine_description()
    runs = {int(w): run_world(int(w), args, _rank) for w in args.worlds.split(",")}
    write_outputs(args.out, machine, args, runs, _markdown(runs, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
