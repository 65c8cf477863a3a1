#!/usr/bin/env python
"""A whole SASRec training step at a 1M-item catalog on CPU gloo ranks: one process, two
data-parallel processes with the table replicated, and two with `--item-shards 2`.

Each mode runs the pieces `python -m fastattn train` runs (fastattn.train): the same SASRec
(seeded: the same initial weights in every mode), fused Adam, `TrainingStep`, and for W = 2 the
`fastattn.data_parallel.Group` share of every global batch and its DistributedDataParallel wrapper
— with `shard_item_table` (the sharded lookup, the vocab-parallel loss over the all-gathered rows,
the gradient sum hook) in mode "sharded". Every mode trains on the same global batch of B
left-padded histories of width L (geometric lengths with median 6, Zipf(1.1) items spread over
the catalog), dropout 0, so the first step's loss over the global batch must agree across the
modes (printed; the share-weighted sum of the replicated ranks' own losses).

Per rank: the median step time (--steps after one warm-up, between barriers); torch's CPU
allocator peak during a step above what was allocated before it; the process's peak RSS and its
RSS before the first step (the model, Adam's state after the warm-up step is not in it); the bytes
of a step: fastattn.distributed's collectives counted in its wrappers (count_traffic), and DDP's
gradient all-reduce computed from the sizes of the parameters DDP manages (static graph: every
one is all-reduced once per step), each sent with ring algorithms (all-gather (W−1)·payload,
all-reduce 2(W−1)/W·payload). The W ranks share this machine's cores (cores/W threads each).

    python bench/studies/item_shards_step.py --out bench/results/item-shards-step-cpu
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "suite"))
sys.path.insert(0, str(REPO / "bench" / "studies"))
from _common import _cpu_peak_bytes, describe_machine, machine_description  # noqa: E402
from distributed_ce import MIB, _sent_bytes, _timed, finish_rank, run_world, write_outputs  # noqa: E402
from sharded_lookup import _batch as _histories  # noqa: E402

from fastattn.data.batch import TrainBatch  # noqa: E402
from fastattn.data_parallel import SINGLE, Group, _is_item_shard, shard_item_table  # noqa: E402
from fastattn.distributed.collectives import count_traffic  # noqa: E402
from fastattn.models.sasrec import SASRec, SASRecConfig  # noqa: E402
from fastattn.training_step import TrainingStep  # noqa: E402

MODES = {"single": 1, "replicated": 2, "sharded": 2}  # mode → processes


def _global_batch(args: argparse.Namespace) -> TrainBatch:
    """B histories of width L + 1 (sharded_lookup's generator): inputs the first L, targets the last L."""
    width = args.width
    args.width = width + 1
    seqs = _histories(0, args)
    args.width = width
    items, targets = seqs[:, :-1].clone(), seqs[:, 1:].clone()
    targets[items == 0] = 0  # no target after a padding slot
    return TrainBatch(items=items, targets=targets)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mode = args.mode
    # a group of one too: _timed and finish_rank use it (the model of one process never does)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    group = Group(rank, world, "cpu", item_sharded=mode == "sharded") if world > 1 else SINGLE
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=args.items, hidden=args.dim, layers=2, heads=2, inner=4 * args.dim,
                                dropout=0.0, attn_dropout=0.0, max_len=args.width))
    if group.item_sharded:
        shard_item_table(model, group, "auto")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = TrainingStep(model, optimizer, wrap=group.wrap if group.parallel else None)
    batch, share = group.share(_global_batch(args))
    scale = group.loss_scale(share)
    losses: list[float] = []

    def one_step() -> float:
        loss = float(step(batch, scale)["loss"].detach())
        losses.append(loss)
        return loss

    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, _ = _timed(one_step, args.steps)
    with count_traffic() as log:
        one_step()
    sent = _sent_bytes(log)
    ddp_params = [p for p in model.parameters() if not _is_item_shard(model, p)] if group.parallel else []
    ddp_payload = sum(p.numel() * p.element_size() for p in ddp_params)
    sent["payload_bytes"]["ddp_all_reduce"] = ddp_payload
    sent["ring_bytes_sent"]["ddp_all_reduce"] = 2 * (world - 1) / world * ddp_payload
    first = torch.tensor(losses[0] * (share if mode == "replicated" else 1.0 / world), dtype=torch.float64)
    dist.all_reduce(first)  # the global batch's loss: replicated ranks hold their own rows' means
    table = model.item_embedding.weight
    result = {"mode": mode, "rank": rank, "world": world, "threads": torch.get_num_threads(),
              "rows_of_step": int(batch.items.numel()), "targets_of_step": int((batch.targets != 0).sum()),
              "step_s": times, "step_median_s": statistics.median(times), "first_loss": float(first),
              "torch_peak_mib": _cpu_peak_bytes(one_step) / MIB, "rss_setup_mib": rss_setup / MIB,
              "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
              "table_rows_held": int(table.shape[0]), "table_mib": table.numel() * 4 / MIB, **sent}
    finish_rank(result, world, out)


def _markdown(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    lines = [f"# A SASRec training step at V = {args.items:,} on CPU gloo ranks (D = {args.dim}, global batch "
             f"{args.batch} × {args.width}, float32)", "",
             f"Machine: {describe_machine(machine)}.",
             f"Command: `python bench/studies/item_shards_step.py --items {args.items} --dim {args.dim} "
             f"--batch {args.batch} --width {args.width} --modes {args.modes} --steps {args.steps}`", "",
             "A step: `fastattn.training_step.TrainingStep` (forward, loss, backward, fused Adam) on this "
             "process's share of the global batch, as `python -m fastattn train` runs it; median of the "
             "timed steps. The ranks share this machine's two cores: the times say what a split costs on one "
             "machine, not what W machines would do.", "",
             "| mode | W | rank | rows (targets) of its share | step (s) | torch peak in a step (MiB) | "
             "RSS peak (MiB) | RSS before the steps (MiB) | table rows held (MiB) | bytes sent per step (ring) "
             "| first loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, ranks in runs.items():
        for r in ranks:
            lines.append(f"| {mode} | {r['world']} | {r['rank']} | {r['rows_of_step']:,} ({r['targets_of_step']:,}) "
                         f"| {r['step_median_s']:.2f} | {r['torch_peak_mib']:.0f} | {r['rss_peak_mib']:.0f} | "
                         f"{r['rss_setup_mib']:.0f} | {r['table_rows_held']:,} ({r['table_mib']:.0f}) | "
                         f"{sum(r['ring_bytes_sent'].values()):,.0f} | {r['first_loss']:.6f} |")
    for mode, ranks in runs.items():
        r = ranks[0]
        lines += ["", f"{mode}, rank 0's payload per step (bytes): {r['payload_bytes']}; fastattn collectives: "
                      f"{', '.join(r['collectives']) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="V, the catalog size")
    ap.add_argument("--dim", type=int, default=64, help="D, the hidden size")
    ap.add_argument("--batch", type=int, default=64, help="B, histories in the global batch")
    ap.add_argument("--width", type=int, default=50, help="L, the padded history width (max_len)")
    ap.add_argument("--modes", default="single,sharded,replicated", help=f"comma-separated, of {sorted(MODES)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"--modes: unknown {unknown}; choose from {sorted(MODES)}")
    machine = machine_description()
    runs = {}
    for mode in modes:
        args.mode = mode
        runs[mode] = run_world(MODES[mode], args, _rank)
        print(f"{mode}: " + ", ".join(f"rank {r['rank']} {r['step_median_s']:.2f} s, loss {r['first_loss']:.6f}"
                                      for r in runs[mode]), flush=True)
    del args.mode
    write_outputs(args.out, machine, args, runs, _markdown(runs, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
