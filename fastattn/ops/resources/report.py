"""The report's output: a fixed-width table, bench/results/gpu-resources.md (headline rows per arch,
autotune candidates, spills and shared memory of every configuration, the roofline) and the
command line `python -m fastattn.ops.aot --report`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Optional

from .._common import SHARED_MEMORY_LIMIT
from .cases import ARCHS
from .measure import build_report, over_shared_limit
from .roofline import headline_rooflines

__all__ = ["format_markdown", "format_table", "is_autotune_row", "main"]


def is_autotune_row(row: dict[str, Any]) -> bool:
    """Whether a report row is an autotune candidate (`autotune_launches`), not a fixed choice."""
    return "-autotune-" in row["config"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the rows (one line each)."""
    head = ("kernel", "dtype", "arch", "regs", "spill st/ld", "shared", "TC", "dots", "occ", "config")
    lines = [(r["kernel"], r["dtype"], f"sm_{r['arch']}", str(r["registers"]),
              f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", str(r["shared_bytes"]),
              "yes" if r["tensor_cores"] else "no", str(r["dots"]), str(r["occupancy"]), r["config"])
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*line) for line in lines)])


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def format_markdown(rows: list[dict[str, Any]], elapsed_s: float, command: str) -> str:
    """bench/results/gpu-resources.md: the headline rows per arch (identical compiles of the
    two batch sizes and two lengths merged), the autotune candidates, the spills and shared memory
    of every other configuration, and the roofline table."""
    out = [
        "# Static GPU resources of the Triton kernels (issue 17 item 6)",
        "",
        f"`{command}` — {len(rows)} rows, {elapsed_s:.0f} s on this machine "
        f"({os.cpu_count()} CPU cores). Read docs/gpu-resources.md first.",
    ]
    out += _headline_section(rows) + _autotune_section(rows) + _generic_section(rows) + _roofline_section()
    return "\n".join(out) + "\n"


def _headline_section(rows: list[dict[str, Any]]) -> list[str]:
    """One table line per (kernel, dtype, config without batch size and length), a cell per arch."""
    archs = sorted({r["arch"] for r in rows})
    cells: dict[tuple[Any, ...], dict[int, str]] = {}
    for r in rows:
        if not r["headline"]:
            continue
        # Batch size and length do not enter the specialisation: merge rows by the rest.
        shape = re.sub(r"B\d+-H(\d+)-L\d+-", r"H\1-", r["config"])
        key = (r["kernel"], r["dtype"], shape)
        cell = (f"{r['registers']} / {r['spill_store_bytes']}+{r['spill_load_bytes']} / "
                f"{r['shared_bytes'] // 1024}K / {'TC' if r['tensor_cores'] else '**no TC**'} / "
                f"{r['dots']} / {r['occupancy']}")
        previous = cells.setdefault(key, {}).get(r["arch"])
        if previous is not None and previous != cell:  # a batch size or length did change the code
            key = (r["kernel"], r["dtype"], r["config"])
        cells.setdefault(key, {})[r["arch"]] = cell
    out = [
        "",
        "## Headline cases (aligned: specialised as a real launch)",
        "",
        "Each cell: registers / spill store+load bytes / shared memory / tensor cores / `tt.dot` "
        "ops / resident warps per SM. Batch size 128 vs 256 and L 50 vs 200 compile to the same "
        "code (no argument specialisation sees them) and share a row.",
        "",
        "| kernel | dtype | config | " + " | ".join(f"sm_{a}" for a in archs) + " |",
        "|---|---|---|" + "---|" * len(archs),
    ]
    for (kernel, dtype, shape), by_arch in cells.items():
        out.append(f"| {kernel} | {dtype} | {shape} | " + " | ".join(by_arch.get(a, "–") for a in archs) + " |")
    return out


def _autotune_section(rows: list[dict[str, Any]]) -> list[str]:
    tuning = [r for r in rows if is_autotune_row(r)]
    if not tuning:
        return []
    return [
        "", "## Autotune candidates at the headline shapes (aligned; FASTATTN_AUTOTUNE=1 only)", "",
        "The listed alternatives to the fixed tiles (ops/autotune.py). A spill here is for the tuner's "
        "clock to weigh; a row over its arch's shared memory is skipped there (OutOfResources).", "",
        "| kernel | dtype | config | arch | registers | spill store+load | shared | over the arch limit |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['kernel']} | {r['dtype']} | {r['config']} | sm_{r['arch']} | {r['registers']} | "
          f"{r['spill_store_bytes']}+{r['spill_load_bytes']} | {r['shared_bytes']} | "
          f"{'**yes**' if r['shared_bytes'] > SHARED_MEMORY_LIMIT[r['arch']] else 'no'} |" for r in tuning),
    ]


def _generic_section(rows: list[dict[str, Any]]) -> list[str]:
    generic = [r for r in rows if not r["headline"] and not is_autotune_row(r)]
    if not generic:
        return []
    # Most spilled first; ties by name, so the file does not depend on set (string hash) order.
    spilling = sorted({(r["kernel"], r["dtype"], r["config"], r["arch"], r["spill_store_bytes"])
                       for r in generic if r["spill_store_bytes"]}, key=lambda x: (-x[4], x))
    # sm_86/89 as compiled (their launches differ from sm_80's: compact float32 tiles).
    small = [r for r in rows if r["arch"] in (86, 89) and not is_autotune_row(r)]
    over = over_shared_limit(small)
    return [
        "", "## Every configuration the launchers can pick (generic signature)", "",
        f"{len(generic)} rows; {len(spilling)} spill. Full list: gpu-resources.json.", "",
        "| kernel | dtype | config | arch | spill stores (bytes) |", "|---|---|---|---|---|",
        *(f"| {k} | {d} | {c} | sm_{a} | {s} |" for k, d, c, a, s in spilling),
        "", f"Shared memory above the sm_86/sm_89 limit ({SHARED_MEMORY_LIMIT[86]} B per block): "
        f"{len(over)} rows.", "",
        "| kernel | dtype | config | arch | shared (bytes) |", "|---|---|---|---|---|",
        *(f"| {r['kernel']} | {r['dtype']} | {r['config']} | sm_{r['arch']} | {r['shared_bytes']} |"
          for r in over),
    ]


def _roofline_section() -> list[str]:
    out = [
        "", "## H100 SXM roofline of the headline cases", "",
        "From `fastattn.ops.resources.headline_rooflines()`: matmul at 989 TFLOP/s (bf16/fp16) or "
        "495 TFLOP/s (fp32 as tf32), ex2 at 16/clk/SM × 132 SMs × 1.83 GHz ≈ 3.87 T/s, HBM at "
        "3.35 TB/s. Times in µs; floor = the largest. `bwd-fa2`/`bwd-cce`: the ideal work count "
        "(5 GEMMs + 1 exp; 3 GEMMs + 1 exp), `bwd-current`: the kernels' work today (attention: the fused "
        "backward, 5 + 1, at every headline length; cross-entropy 4 + 2), `bwd-filtered`: cross-entropy "
        "with gradient filtering skipping every tile (2 + 2).",
        "",
        "| case | dtype | pass | GFLOP | G exp | MB | matmul µs | exp µs | memory µs | floor µs | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in headline_rooflines():
        out.append(f"| {r.case} | {r.dtype} | {r.passes} | {r.flops / 1e9:.2f} | {r.exps / 1e9:.3f} | "
                   f"{r.bytes / 1e6:.1f} | {_fmt_us(r.matmul_s)} | {_fmt_us(r.exp_s)} | "
                   f"{_fmt_us(r.memory_s)} | {_fmt_us(r.floor_s)} | {r.bound} |")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.ops.aot",
                                     description="Static GPU resource report of the Triton kernels.")
    parser.add_argument("--report", action="store_true", help="compile and report (the only action)")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="comma-separated compute capabilities (default 80,86,89,90)")
    parser.add_argument("--json", help="write the rows as a JSON list to this file")
    parser.add_argument("--md", help="write a markdown summary (with the roofline) to this file")
    parser.add_argument("--headline-only", action="store_true",
                        help="only the aligned headline cases (what the tests compile)")
    parser.add_argument("--only", default=None,
                        help='only rows whose "kernel config" matches this regular expression')
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    args = parser.parse_args(argv)
    if not args.report:
        parser.error("nothing to do: pass --report")
    archs = tuple(int(a) for a in args.arch.split(","))
    unknown = set(archs) - set(ARCHS)
    if unknown:
        parser.error(f"unknown arch {sorted(unknown)}; known: {ARCHS}")
    start = time.perf_counter()
    rows, errors = build_report(archs, args.headline_only, args.workers, args.only)
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    print(f"{len(rows)} rows, {len(errors)} errors, {elapsed:.0f} s", file=sys.stderr)
    for err in errors:
        print("ERROR", err, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    if args.md:
        command = "python -m fastattn.ops.aot --report --arch " + args.arch + (
            " --headline-only" if args.headline_only else "")
        with open(args.md, "w") as f:
            f.write(format_markdown(rows, elapsed, command))
    return 1 if errors else 0
