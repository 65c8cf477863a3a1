#!/usr/bin/env python
"""Vocab-parallel cross-entropy on CPU gloo ranks: step time, memory per rank, bytes per step.

For each world size W (default 1 and 2) W processes join a gloo group on 127.0.0.1, each with
cores/W torch threads, and each holds its ItemShard of a float32 (V, D) item table (default V =
1M, D = 64) as a parameter. A step is `vocab_parallel_cross_entropy` (N = 2048 rows, label
smoothing 0.1) forward and backward; at W = 1 the plain `fastattn.full_item_cross_entropy` step
on the whole table runs too, as the baseline. Per rank:

- step time: median of --steps steps after one warm-up, between barriers;
- `torch_peak_mib`: torch's CPU allocator peak during one step above what was allocated before
  it (torch.profiler memory events, as bench/suite/_common.py);
- `rss_peak_mib`: the process's peak resident set (ru_maxrss: Python, torch, the shard, the step),
  next to `rss_setup_mib`, the same before the first step;
- bytes: each collective's payload, counted in fastattn.distributed's wrappers (count_traffic),
  and the bytes a rank sends for it with ring algorithms: all-gather (W−1)·payload, all-reduce
  2(W−1)/W·payload.

The table is a closed-form function of the item id, so every W sees the same catalog and the
loss must agree across W (printed as a check). Two shared cores run W ranks here: the times say
what the split costs and saves on one machine, not what W machines or GPUs would do.

    python bench/studies/distributed_ce.py --worlds 2,1 --out bench/results/distributed-ce-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "suite"))  # the suite's helpers (_common)
from _common import _cpu_peak_bytes, describe_machine, machine_description  # noqa: E402

import fastattn  # noqa: E402
from fastattn.distributed import ItemShard, vocab_parallel_cross_entropy  # noqa: E402
from fastattn.distributed.collectives import count_traffic  # noqa: E402

MIB = 2 ** 20


def _table_rows(start: int, stop: int, dim: int) -> torch.Tensor:
    """Rows [start, stop) of the (V, D) benchmark table: a closed form, the same for every W."""
    out = torch.empty(stop - start, dim)
    cols = torch.arange(dim, dtype=torch.float64) * 1.3
    for lo in range(start, stop, 1 << 16):  # in chunks: the set-up must not set the RSS peak
        hi = min(stop, lo + (1 << 16))
        j = torch.arange(lo, hi, dtype=torch.float64)[:, None]
        out[lo - start:hi - start] = 0.1 * torch.sin(j * 0.37 + cols)
    return out


def _timed(step: Callable[[], float], steps: int) -> tuple[list[float], float]:
    loss = step()  # warm-up
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        loss = step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times, loss


def _sent_bytes(log: list[tuple[str, int, int]]) -> dict[str, Any]:
    sent = {"all_gather": 0.0, "all_reduce": 0.0}
    payload = {"all_gather": 0, "all_reduce": 0}
    for name, size, world in log:
        payload[name] += size
        sent[name] += (world - 1) * size if name == "all_gather" else 2 * (world - 1) / world * size
    return {"payload_bytes": payload, "ring_bytes_sent": sent, "collectives": [name for name, _, _ in log]}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    shard = ItemShard(args.items, rank, world)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.dim, generator=g).requires_grad_()
    target = torch.randint(0, args.items, (args.rows,), generator=g)
    weight = torch.nn.Parameter(_table_rows(shard.start, shard.stop, args.dim))

    def step() -> float:
        loss = vocab_parallel_cross_entropy(hidden, weight, target, shard=shard, label_smoothing=0.1)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.detach().item()

    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, loss = _timed(step, args.steps)
    with count_traffic() as log:
        step()
    result = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "rows": [shard.start, shard.stop],
              "step_s": times, "step_median_s": statistics.median(times), "loss": loss,
              "torch_peak_mib": _cpu_peak_bytes(step) / MIB,
              "rss_setup_mib": rss_setup / MIB,
              "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
              "shard_mib": weight.numel() * 4 / MIB, **_sent_bytes(log)}
    if world == 1:
        def plain() -> float:
            loss = fastattn.full_item_cross_entropy(hidden, weight, target, label_smoothing=0.1)
            loss.backward()
            hidden.grad = weight.grad = None
            return loss.detach().item()
        plain_times, plain_loss = _timed(plain, args.steps)
        result["baseline"] = {"step_s": plain_times, "step_median_s": statistics.median(plain_times),
                              "loss": plain_loss}
    finish_rank(result, world, out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args: argparse.Namespace, rank_fn: Optional[Callable[..., None]] = None
              ) -> list[dict[str, Any]]:
    """Spawn `world` ranks of rank_fn(rank, world, port, args, out) (default: this study's `_rank`);
    returns the list rank 0 wrote to `out` as JSON (every rank's result)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        mp.start_processes(rank_fn or _rank, args=(world, _free_port(), args, out), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def finish_rank(result: dict[str, Any], world: int, out: str) -> None:
    """All-gather every rank's `result`, rank 0 writes the list to `out`; closes the group."""
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.destroy_process_group()


def write_outputs(out: str | None, machine: dict[str, Any], args: argparse.Namespace,
                  runs: dict[int, list[dict[str, Any]]], report: str) -> None:
    """Print the report; with --out, write OUT.json (machine, args, runs) and OUT.md."""
    print(report)
    if out:
        Path(out + ".json").write_text(json.dumps({"machine": machine, "args": vars(args),
                                                   "runs": {str(w): r for w, r in runs.items()}}, indent=1))
        Path(out + ".md").write_text(report)


def _markdown(runs: dict[int, list[dict[str, Any]]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    lines = [f"# vocab-parallel cross-entropy on CPU gloo ranks (V = {args.items:,}, D = {args.dim}, "
             f"N = {args.rows:,}, float32)", "",
             f"Machine: {describe_machine(machine)}.",
             f"Command: `python bench/studies/distributed_ce.py --items {args.items} --dim {args.dim} "
             f"--rows {args.rows} --worlds {args.worlds} --steps {args.steps}`", "",
             "A step: `vocab_parallel_cross_entropy(hidden, item_weight_shard, target, shard=..., "
             "label_smoothing=0.1)` forward + backward, median of the timed steps. The W ranks share this "
             "machine's cores (cores/W threads each): the times are one machine split W ways, not W machines.",
             "", "| W | rank | threads | rows held | step (s) | torch peak in a step (MiB) | RSS peak (MiB) | "
             "RSS before the steps (MiB) | shard (MiB) | bytes sent per step (ring) | loss |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for world, ranks in runs.items():
        for r in ranks:
            sent = sum(r["ring_bytes_sent"].values())
            lines.append(f"| {world} | {r['rank']} | {r['threads']} | [{r['rows'][0]:,}, {r['rows'][1]:,}) | "
                         f"{r['step_median_s']:.2f} | {r['torch_peak_mib']:.1f} | {r['rss_peak_mib']:.0f} | {r['rss_setup_mib']:.0f} | "
                         f"{r['shard_mib']:.0f} | {sent:,.0f} | {r['loss']:.6f} |")
    base = runs.get(1, [{}])[0].get("baseline")
    if base:
        lines += ["", f"Baseline (W = 1, plain `fastattn.full_item_cross_entropy` on the whole table): "
                      f"{base['step_median_s']:.2f} s per step, loss {base['loss']:.6f}."]
    for world, ranks in runs.items():
        r = ranks[0]
        lines += ["", f"W = {world}, rank 0's collectives per step: {', '.join(r['collectives'])}; payload "
                      f"{r['payload_bytes']}; ring bytes sent {({k: round(v) for k, v in r['ring_bytes_sent'].items()})}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="V, the catalog size")
    ap.add_argument("--dim", type=int, default=64, help="D, the hidden size")
    ap.add_argument("--rows", type=int, default=2048, help="N, rows per step")
    ap.add_argument("--worlds", default="1,2", help="comma-separated world sizes")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    machine = machine_description()
    runs = {}
    for world in (int(w) for w in args.worlds.split(",")):
        runs[world] = run_world(world, args)
        print(f"W={world}: " + ", ".join(f"rank {r['rank']} {r['step_median_s']:.2f} s, loss {r['loss']:.6f}"
                                         for r in runs[world]), flush=True)
    write_outputs(args.out, machine, args, runs, _markdown(runs, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
