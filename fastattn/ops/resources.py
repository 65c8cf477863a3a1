"""Static GPU resource report of the Triton kernels, and an H100 roofline of the headline cases.

Compiles (ahead of time, no GPU needed: see aot.py) every kernel configuration the launchers can
pick, plus the *aligned* variants a real launch builds at the headline shapes, and reads from
each compile what decides how it runs on the hardware:

- registers per thread and spill stores/loads, from `ptxas -v` on the kernel's PTX, run with
  the flags Triton's own ptxas call uses (Triton's metadata carries no register counts for an
  ahead-of-time compile: the driver fills them in when a cubin is loaded). The register count
  is cross-checked against `cuobjdump --dump-resource-usage` of the cubin Triton built;
- shared memory per block (`compiled.metadata.shared`);
- whether the PTX has tensor-core instructions (`mma.sync` / `wgmma.mma_async`);
- how many `tt.dot` ops the kernel's TTIR holds (static count: a dot inside the key/query loop
  counts once, i.e. per (query block, key block) pair);
- the occupancy these imply (resident warps per SM, `occupancy`).

Run it as `python -m fastattn.ops.aot --report [--arch 80,86,89,90] [--json FILE] [--md FILE]
[--headline-only]` (without TRITON_INTERPRET). docs/gpu-resources.md explains the output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ._common import SHARED_MEMORY_LIMIT, compact_float32_tiles, dot_precision, target_arch
from .aot import every_triton_launch
from .triton_launch import KernelLaunch

ARCHS = (80, 86, 89, 90)
# The keys of one report row, in order (the tests check exactly these).
ROW_KEYS = ("kernel", "config", "dtype", "arch", "headline", "registers", "spill_store_bytes",
            "spill_load_bytes", "shared_bytes", "tensor_cores", "dots", "occupancy")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float32 dots follow torch.get_float32_matmul_precision(); the headline compiles each mode the
# launchers can turn into a distinct kernel (identical ones are compiled once).
FLOAT32_MODES = ("highest", "high")


# --------------------------------------------------------------------------------------------
# Headline cases (issue 17): the shapes recommenders train at.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionCase:
    """DIF attention on concatenated QK streams: batch, heads, sequence length (queries = keys),
    summed QK head dim, V head dim. Causal with a key padding mask, no dropout, no domains."""

    b: int
    h: int
    l: int  # noqa: E741 (the paper's name)
    dqk: int
    dv: int

    @property
    def name(self) -> str:
        return f"B{self.b}-H{self.h}-L{self.l}-dqk{self.dqk}-dv{self.dv}"


@dataclass(frozen=True)
class CrossEntropyCase:
    """Full-catalog cross-entropy: N rows (batch × positions), V items, hidden size D, no bias."""

    n: int
    v: int
    d: int

    @property
    def name(self) -> str:
        return f"N{self.n}-V{self.v}-D{self.d}"


HEADLINE_ATTENTION = tuple(AttentionCase(b, 2, l, dqk, dv) for b in (128, 256) for l in (50, 200)
                           for dqk, dv in ((32 + 8, 32), (64, 64)))
HEADLINE_CROSS_ENTROPY = tuple(CrossEntropyCase(51_200, 1_000_000, d) for d in (64, 128))
ATTENTION_KERNELS = ("fwd", "bwd")  # headline L <= FUSED_MAX_LEN: the fused backward
CROSS_ENTROPY_KERNELS = ("ce_lse", "ce_bwd_dh", "ce_bwd_de")


@dataclass(frozen=True)
class Job:
    """One (kernel configuration, arch) row to compile. `aligned`: specialise the arguments as a
    real launch does (ints divisible by 16 and 16-byte aligned pointers get tt.divisibility=16,
    ints equal to 1 become constants); otherwise the generic signature of
    `KernelLaunch.signature()` (every int and pointer unspecialised: the code any shape can run)."""

    kernel: str
    config: str
    dtype: str
    arch: int
    headline: bool
    aligned: bool
    launch_index: int


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _launch_dtype(launch: KernelLaunch) -> str:
    """The input dtype of a launch: its first floating-point tensor argument ("none" for a kernel
    without one, the dropout-mask kernel)."""
    for value in launch.args.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return _dtype_name(value.dtype)
    return "none"


def _launch_tag(launch: KernelLaunch) -> str:
    """What the config string adds to the launch name: dot precision, tile (rows × keys or items)
    — the compact float32 tiles of sm_86/89 differ there —, warps and stages."""
    prec = launch.constexprs.get("DOT_PRECISION")
    tile = "x".join(str(launch.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_V") if k in launch.constexprs)
    return (f"{'prec-' + prec + '-' if prec else ''}{'t' + tile + '-' if tile else ''}"
            f"w{launch.num_warps}s{launch.num_stages}")


def _with_precision(mode: str, describe: Any) -> Any:
    """`describe()` under torch.set_float32_matmul_precision(mode) (restored after): the
    launchers read the float32 dot precision when they describe a launch."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        return describe()
    finally:
        torch.set_float32_matmul_precision(previous)


def _headline_inputs() -> Iterator[tuple[torch.dtype, str, Any, dict[str, torch.Tensor]]]:
    """(dtype, float32 matmul precision, case, its meta input tensors) of every headline case:
    attention q (K too), v, pad; cross-entropy h, w, per-row f32 and tgt."""
    meta = torch.device("meta")
    for dtype in DTYPES:
        for mode in FLOAT32_MODES if dtype == torch.float32 else FLOAT32_MODES[:1]:
            for case in HEADLINE_ATTENTION:
                yield dtype, mode, case, dict(
                    q=torch.empty(case.b, case.h, case.l, case.dqk, dtype=dtype, device=meta),
                    v=torch.empty(case.b, case.h, case.l, case.dv, dtype=dtype, device=meta),
                    pad=torch.empty(case.b, case.l, dtype=torch.bool, device=meta))
            for ce in HEADLINE_CROSS_ENTROPY:
                yield dtype, mode, ce, dict(
                    h=torch.empty(ce.n, ce.d, dtype=dtype, device=meta),
                    w=torch.empty(ce.v, ce.d, dtype=dtype, device=meta),
                    f32=torch.empty(ce.n, dtype=torch.float32, device=meta),
                    tgt=torch.empty(ce.n, dtype=torch.int64, device=meta))


def _fixed_launches(case: Any, t: dict[str, torch.Tensor]) -> list[tuple[str, str, KernelLaunch]]:
    """(kernel, config infix, launch) the launchers choose for a headline case."""
    from .attention.triton_bwd import bwd_launches as attention_bwd
    from .attention.triton_fwd import fwd_launch
    from .cross_entropy.triton_bwd import bwd_launches as ce_bwd
    from .cross_entropy.triton_fwd import lse_launch

    if isinstance(case, AttentionCase):
        q, v, pad, scale = t["q"], t["v"], t["pad"], case.dqk ** -0.5
        fwd, out, lse, _ = fwd_launch(q, q, v, scale, True, 0.0, None, pad, None)
        (bwd,), *_ = attention_bwd(q, q, v, out, out, lse, None, None, scale, True, 0.0, None, pad, None)
        return [("fwd", "", fwd), ("bwd", "", bwd)]
    h, w, f32, tgt = t["h"], t["w"], t["f32"], t["tgt"]
    lse, _, _ = lse_launch(h, w, None, 1.0)
    (dh, de), *_ = ce_bwd(h, w, None, 1.0, f32, f32, f32, tgt, f32)
    (dh_filter, de_filter), *_ = ce_bwd(h, w, None, 1.0, f32, f32, f32, tgt, f32, 2.0**-12)
    return [("ce_lse", "", lse), ("ce_bwd_dh", "", dh), ("ce_bwd_de", "", de),
            ("ce_bwd_dh", "-filter", dh_filter), ("ce_bwd_de", "-filter", de_filter)]


def _autotune_launches(case: Any, t: dict[str, torch.Tensor]) -> list[tuple[str, str, KernelLaunch]]:
    """(kernel, config infix, launch) of a headline case's autotune candidates but the fixed one."""
    from .attention.triton_bwd import backward_plans, bwd_launches as attention_bwd
    from .attention.triton_fwd import fwd_launch, tile_candidates
    from .cross_entropy.triton_bwd import bwd_launches as ce_bwd
    from .cross_entropy.triton_fwd import ce_tile_candidates, lse_launch

    launches: list[tuple[str, str, KernelLaunch]] = []
    if isinstance(case, AttentionCase):
        q, v, pad, scale = t["q"], t["v"], t["pad"], case.dqk ** -0.5
        for tiles in tile_candidates(case.dqk, case.dv, dot_precision(q.dtype), compact_float32_tiles(q))[1:]:
            launches.append(("fwd", "-autotune", fwd_launch(q, q, v, scale, True, 0.0, None, pad, None, tiles)[0]))
        _, out, lse, _ = fwd_launch(q, q, v, scale, True, 0.0, None, pad, None)
        for plan in backward_plans(q, q, v)[1:]:
            bwd, *_ = attention_bwd(q, q, v, out, out, lse, None, None, scale, True, 0.0, None, pad, None,
                                    fused=plan.fused, tiles=plan.tiles)
            names = ("bwd",) if plan.fused else ("bwd_delta", "bwd_dkdv", "bwd_dq")
            launches += [(name, "-autotune", launch) for name, launch in zip(names, bwd)]
        return launches
    h, w, f32, tgt = t["h"], t["w"], t["f32"], t["tgt"]
    precision, compact = dot_precision(h.dtype), compact_float32_tiles(h)
    for tiles in ce_tile_candidates(case.d, precision, compact=compact)[1:]:
        launches.append(("ce_lse", "-autotune", lse_launch(h, w, None, 1.0, tiles)[0]))
    for tiles in ce_tile_candidates(case.d, precision, backward=True, compact=compact)[1:]:
        (dh, de), *_ = ce_bwd(h, w, None, 1.0, f32, f32, f32, tgt, f32, 0.0, tiles)
        launches += [("ce_bwd_dh", "-autotune", dh), ("ce_bwd_de", "-autotune", de)]
    return launches


def _named(describe: Any) -> Iterator[tuple[str, str, str, KernelLaunch]]:
    """(kernel, config, dtype, launch) of `describe(case, tensors)` for every headline case, each
    described under its float32 matmul precision."""
    for dtype, mode, case, tensors in _headline_inputs():
        for kernel, infix, launch in _with_precision(mode, lambda: describe(case, tensors)):
            yield kernel, f"{case.name}{infix}-{_launch_tag(launch)}", _dtype_name(dtype), launch


def headline_launches() -> Iterator[tuple[str, str, str, KernelLaunch]]:
    """(kernel, config, dtype, launch) of every headline case on meta tensors, as the launchers
    describe them (so strides, sizes and tile classes are those of a real call)."""
    return _named(_fixed_launches)


def autotune_launches() -> Iterator[tuple[str, str, str, KernelLaunch]]:
    """(kernel, config, dtype, launch) of every autotune candidate (ops/autotune.py) other than
    the fixed choice, at the headline shapes: what FASTATTN_AUTOTUNE=1 may launch there."""
    return _named(_autotune_launches)


def report_launches(headline_only: bool, only: Optional[str] = None, arch: int = 80
                    ) -> list[tuple[str, str, str, bool, bool, KernelLaunch]]:
    """(kernel, config, dtype, headline, aligned, launch) as the launchers choose them on sm_`arch`:
    the headline cases (aligned), then, unless `headline_only`, the autotune candidates at the
    headline shapes (aligned, config "…-autotune-…") and every configuration of
    `every_triton_launch(arch)` (generic signature); with `only`, those whose "kernel config"
    matches that regular expression."""
    with target_arch(arch):
        rows = [(kernel, config, dtype, True, True, launch) for kernel, config, dtype, launch in headline_launches()]
        if not headline_only:
            rows += [(kernel, config, dtype, False, True, launch)
                     for kernel, config, dtype, launch in autotune_launches()]
    if not headline_only:
        for name, launch in every_triton_launch(arch):
            kernel, _, rest = name.partition("-")
            config = f"generic-{rest + '-' if rest else ''}{_launch_tag(launch)}"
            rows.append((kernel, config, _launch_dtype(launch), False, False, launch))
    return [row for row in rows if only is None or re.search(only, f"{row[0]} {row[1]}")]


# --------------------------------------------------------------------------------------------
# Compiling one row.
# --------------------------------------------------------------------------------------------

def launch_source(launch: KernelLaunch, arch: int, aligned: bool) -> Any:
    """The triton ASTSource of `launch`: generic (`KernelLaunch.signature()`), or `aligned`:
    specialised by triton 3.9's own launch binder (the function `JITFunction.run` builds with
    `create_function_from_signature`) from the launch's arguments, then turned into signature,
    constexprs and attributes as `JITFunction._pack_args` does. Its "D" marks (ints divisible
    by 16, 16-byte aligned pointers: meta tensors' data_ptr is 0) become `tt.divisibility=16`
    attributes, ints equal to 1 become constants, do_not_specialize is honoured."""
    from triton.compiler import ASTSource

    fn = launch.kernel
    if not aligned:
        sig, consts = launch.signature()
        return ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=consts)
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(**launch.args, **launch.constexprs)
    sig = {name: kind for name, (kind, _) in zip(fn.arg_names, specialization)}
    consts = {name: bound[name] for name in fn.arg_names if sig[name] == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec) for i, (kind, spec) in enumerate(specialization)
             if kind != "constexpr" and isinstance(spec, str) and spec}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP_REGISTERS = re.compile(r"REG:(\d+)")
# Tensor-core instructions: mma.sync (sm_80+) and wgmma.mma_async (sm_90a warpgroup MMA).
_TENSOR_CORE_PTX = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)\b", re.MULTILINE)
# tt.dot but not tt.dot_scaled.
_TTIR_DOT = re.compile(r"\btt\.dot(?![_\w])")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the PTX's kernel for sm_`arch`, from
    the ptxas Triton itself uses for that arch, with Triton's flags (-lineinfo,
    --regAllocOptLevel=2, --gpu-name=sm_90a on sm_90)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", out],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = _PTXAS_REGISTERS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if len(regs) != 1 or len(spills) != 1:
        raise RuntimeError(f"unexpected ptxas -v output for one kernel:\n{log}")
    return int(regs[0]), int(spills[0][0]), int(spills[0][1])


def cubin_registers(cubin: bytes) -> int:
    """Registers per thread recorded in a cubin (cuobjdump --dump-resource-usage)."""
    from triton.backends.nvidia.compiler import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs = _CUOBJDUMP_REGISTERS.findall(out)
    if len(regs) != 1:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return int(regs[0])


# Per-SM limits of the CUDA occupancy calculator (CUDA C Programming Guide, "Compute
# capabilities" table): registers, max resident warps and blocks, shared memory per SM
# (each block also reserves 1 KB of shared memory for the system).
_REGISTERS_PER_SM = 65536
_MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
_MAX_BLOCKS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
_SHARED_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
_RESERVED_SHARED_PER_BLOCK = 1024


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Resident warps per SM the registers and shared memory allow (0: the block cannot launch).

    Registers are allocated per warp in units of 256 (registers per thread × 32, rounded up);
    a block needs all its warps resident. A memory- or latency-bound kernel wants ≥ 8–16 warps
    per SM to hide load latency."""
    if shared_bytes > SHARED_MEMORY_LIMIT[arch] or registers > 255:
        return 0
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = _REGISTERS_PER_SM // (per_warp * num_warps)
    by_warps = _MAX_WARPS_PER_SM[arch] // num_warps
    by_shared = (_SHARED_PER_SM[arch] // (shared_bytes + _RESERVED_SHARED_PER_BLOCK)
                 if shared_bytes else _MAX_BLOCKS_PER_SM[arch])
    return min(by_registers, by_warps, by_shared, _MAX_BLOCKS_PER_SM[arch]) * num_warps


def config_warps(config: str) -> int:
    """num_warps of a row, from the `-w{warps}s{stages}` suffix of its config string."""
    match = re.search(r"-w(\d+)s\d+$", config)
    if match is None:
        raise ValueError(f"no -wNsM suffix in config {config!r}")
    return int(match.group(1))


def derive_arch(rows: list[dict[str, Any]], arch: int = 89, source_arch: int = 86) -> list[dict[str, Any]]:
    """The rows of sm_`arch` derived from the sm_`source_arch` compiles without compiling again —
    sm_89 from sm_86: Triton lowers both through the same Ampere path (mma.sync, cp.async) and the
    launchers pick the same tiles for both (99 KB per block), so shared memory per block is the
    same (the committed full report compiles both and shows it). Registers and spills are those
    of sm_`source_arch`'s ptxas run, not re-measured; occupancy is recomputed with sm_`arch`'s limits."""
    out = []
    for row in rows:
        if row["arch"] != source_arch:
            continue
        new = {**row, "arch": arch}
        new["occupancy"] = occupancy(row["registers"], row["shared_bytes"], config_warps(row["config"]), arch)
        out.append(new)
    return out


def over_shared_limit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose shared memory exceeds their arch's per-block limit (OutOfResources at launch)."""
    return [r for r in rows if r["shared_bytes"] > SHARED_MEMORY_LIMIT[r["arch"]]]


# Per arch: the launches its jobs index (built once per process).
_LAUNCHES: dict[int, list[tuple[str, str, str, bool, bool, KernelLaunch]]] = {}


def _launches(arch: int, headline_only: bool, only: Optional[str]) -> list[tuple[str, str, str, bool, bool, KernelLaunch]]:
    if arch not in _LAUNCHES:  # a spawned worker; forked ones inherit the parent's lists
        _LAUNCHES[arch] = report_launches(headline_only, only, arch)
    return _LAUNCHES[arch]


def _compile(job_and_mode: tuple[Job, tuple[bool, Optional[str]]]) -> dict[str, Any]:
    """Compile one job (in a worker process) and read its resources; {"error": ...} on failure."""
    job, (headline_only, only) = job_and_mode
    import triton
    from triton.backends.compiler import GPUTarget

    launch = _launches(job.arch, headline_only, only)[job.launch_index][5]
    try:
        compiled = triton.compile(launch_source(launch, job.arch, job.aligned),
                                  target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
        registers, spill_store, spill_load = ptxas_usage(compiled.asm["ptx"], job.arch)
        # Our ptxas run must describe the cubin Triton built (same tool, same flags).
        built = cubin_registers(compiled.asm["cubin"])
        if built != registers:
            raise RuntimeError(f"ptxas -v says {registers} registers, the cubin {built}")
    except Exception as exc:  # reported per row; the report does not stop at one failure
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    shared = int(compiled.metadata.shared)
    return dict(
        kernel=job.kernel, config=job.config, dtype=job.dtype, arch=job.arch, headline=job.headline,
        registers=registers, spill_store_bytes=spill_store, spill_load_bytes=spill_load,
        shared_bytes=shared, tensor_cores=bool(_TENSOR_CORE_PTX.search(compiled.asm["ptx"])),
        dots=len(_TTIR_DOT.findall(compiled.asm["ttir"])),
        occupancy=occupancy(registers, shared, launch.num_warps, job.arch),
    )


def build_report(archs: tuple[int, ...] = ARCHS, headline_only: bool = False,
                 workers: Optional[int] = None, only: Optional[str] = None
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, errors): one row per (kernel configuration, arch), compiled in parallel. Jobs that
    give the same compile (e.g. headline batch sizes, which no argument specialisation sees)
    are compiled once and their result copied."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the resource report without TRITON_INTERPRET")
    _LAUNCHES.clear()
    jobs = [Job(kernel, config, dtype, arch, headline, aligned, index)
            for arch in archs
            for index, (kernel, config, dtype, headline, aligned, _) in enumerate(
                _launches(arch, headline_only, only))]
    unique: dict[tuple[Any, ...], Job] = {}
    key_of: list[tuple[Any, ...]] = []
    for job in jobs:
        launch = _LAUNCHES[job.arch][job.launch_index][5]
        key = (launch_source(launch, job.arch, job.aligned).hash(), launch.num_warps, launch.num_stages,
               job.arch, job.kernel)
        unique.setdefault(key, job)
        key_of.append(key)
    keys = list(unique)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = dict(zip(keys, pool.map(_compile, [(unique[k], (headline_only, only)) for k in keys])))
    rows, errors = [], []
    for job, key in zip(jobs, key_of):
        result = results[key]
        if "error" in result:
            errors.append(f"{job.kernel} {job.config} {job.dtype} sm_{job.arch}: {result['error']}")
            continue
        rows.append({**result, "kernel": job.kernel, "config": job.config, "dtype": job.dtype,
                     "headline": job.headline})
    return [{k: row[k] for k in ROW_KEYS} for row in rows], errors


# --------------------------------------------------------------------------------------------
# Roofline of the headline cases on an H100 SXM.
# --------------------------------------------------------------------------------------------

# H100 SXM5 peaks (NVIDIA H100 datasheet, dense): tensor-core matmul, plain FP32 FMA, HBM3.
H100_MATMUL_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}  # fp32 via tf32
H100_FP32_FMA_FLOPS = 67e12
# ex2 on the SFUs: 16 ops/clock/SM × 132 SMs × 1.83 GHz boost.
H100_EXP_PER_S = 16 * 132 * 1.83e9
H100_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Roofline:
    """Work of one pass and its H100 lower bound: `flops` of the matmuls, `exps` (ex2 on the
    SFUs), `bytes` that must cross HBM at least once (inputs read, outputs written); each time
    is that work at the peak rate, `floor_s` their max and `bound` which one it is."""

    case: str
    dtype: str
    passes: str
    flops: float
    exps: float
    bytes: float
    matmul_s: float
    exp_s: float
    memory_s: float

    @property
    def floor_s(self) -> float:
        return max(self.matmul_s, self.exp_s, self.memory_s)

    @property
    def bound(self) -> str:
        return max((self.matmul_s, "matmul"), (self.exp_s, "exp"), (self.memory_s, "memory"))[1]


def _roofline(case: str, dtype: str, passes: str, flops: float, exps: float, nbytes: float,
              tensor_cores: bool) -> Roofline:
    rate = H100_MATMUL_FLOPS[dtype] if tensor_cores else H100_FP32_FMA_FLOPS
    return Roofline(case, dtype, passes, flops, exps, nbytes, flops / rate, exps / H100_EXP_PER_S,
                    nbytes / H100_BYTES_PER_S)


def attention_roofline(case: AttentionCase, dtype: str, backward: str = "fa2",
                       tensor_cores: bool = True) -> list[Roofline]:
    """Forward and backward of a causal attention case. Causal: (L+1)/2L of the L² pairs are
    visible. Forward: QKᵀ and PV, one exp per visible pair. Backward `fa2`: the 5 GEMMs and one
    exp recompute of FlashAttention-2 (S, dP, dV, dK, dQ); `current`: this package's kernels
    at the case's length: the fused backward (L <= FUSED_MAX_LEN) has the same count, the split
    one 7 GEMMs (dK/dV pass S, dP, dV, dK; dQ pass S, dP, dQ) and 2 exp recomputes. The fused
    backward's float32 dQ partial sums (re-read per key block, L2-resident) are not counted.
    Bytes: Q, K, V, O (+ dO, dQ, dK, dV) once in `dtype`, LSE/Δ fp32, the uint8 padding mask."""
    from .attention.triton_bwd import FUSED_MAX_LEN

    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    pairs = case.b * case.h * case.l * case.l * (case.l + 1) / (2 * case.l)
    rows = case.b * case.h * case.l
    qk, v = case.dqk, case.dv
    fwd = _roofline(case.name, dtype, "fwd", 2 * pairs * (qk + v), pairs,
                    rows * (es * (2 * qk + 2 * v) + 4) + case.b * case.l, tensor_cores)
    if backward == "fa2":
        gemm_dims, exp_passes = 3 * qk + 2 * v, 1
    elif backward == "current" and case.l > FUSED_MAX_LEN:
        gemm_dims, exp_passes = 4 * qk + 3 * v, 2
    elif backward == "current":
        gemm_dims, exp_passes = 3 * qk + 2 * v, 1
    else:
        raise ValueError(f"backward is 'fa2' or 'current', got {backward!r}")
    bwd = _roofline(case.name, dtype, f"bwd-{backward}", 2 * pairs * gemm_dims, exp_passes * pairs,
                    rows * (es * (2 * qk + 2 * v + 2 * qk + v + v) + 8) + case.b * case.l, tensor_cores)
    return [fwd, bwd]


def cross_entropy_roofline(case: CrossEntropyCase, dtype: str, backward: str = "cce",
                           tensor_cores: bool = True) -> list[Roofline]:
    """Forward (LSE) and backward of full-catalog cross-entropy. Forward: the N×V×D logit GEMM
    and one exp per logit. Backward `cce`: one logit recompute feeding dH and dE (3 GEMMs, one
    exp pass; Cut Cross-Entropy without gradient filtering); `current`: the dH and dE passes
    each recompute the logits (4 GEMMs, 2 exp passes); `filtered`: the floor of `current` with
    gradient filtering, every tile skipped (2 GEMMs: the recomputes; the exps stay). Bytes: H and E read, dH and dE written
    once in `dtype`, LSE and the per-row coefficients fp32, targets int64."""
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    logits = case.n * case.v
    fwd = _roofline(case.name, dtype, "fwd", 2 * logits * case.d, logits,
                    es * (case.n + case.v) * case.d + 4 * case.n, tensor_cores)
    if backward == "cce":
        gemms, exp_passes = 3, 1
    elif backward == "current":
        gemms, exp_passes = 4, 2
    elif backward == "filtered":
        gemms, exp_passes = 2, 2
    else:
        raise ValueError(f"backward is 'cce', 'current' or 'filtered', got {backward!r}")
    bwd = _roofline(case.name, dtype, f"bwd-{backward}", 2 * gemms * logits * case.d, exp_passes * logits,
                    2 * es * (case.n + case.v) * case.d + 4 * 4 * case.n + 8 * case.n, tensor_cores)
    return [fwd, bwd]


def headline_rooflines() -> list[Roofline]:
    """Every headline case × dtype, forward and the backward variants (ideal, current; for
    cross-entropy also the floor with gradient filtering)."""
    out: list[Roofline] = []
    for dtype in map(_dtype_name, DTYPES):
        for case in HEADLINE_ATTENTION:
            out += attention_roofline(case, dtype, "fa2") + attention_roofline(case, dtype, "current")[1:]
        for ce in HEADLINE_CROSS_ENTROPY:
            out += cross_entropy_roofline(ce, dtype, "cce") + cross_entropy_roofline(ce, dtype, "current")[1:]
            out += cross_entropy_roofline(ce, dtype, "filtered")[1:]
    return out


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------

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
    two batch sizes and two lengths merged) and the roofline table."""
    archs = sorted({r["arch"] for r in rows})
    merged: dict[tuple[Any, ...], list[str]] = {}
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
            shape = r["config"]
            key = (r["kernel"], r["dtype"], shape)
        cells.setdefault(key, {})[r["arch"]] = cell
        merged.setdefault(key, [])
    out = [
        "# Static GPU resources of the Triton kernels (issue 17 item 6)",
        "",
        f"`{command}` — {len(rows)} rows, {elapsed_s:.0f} s on this machine "
        f"({os.cpu_count()} CPU cores). Read docs/gpu-resources.md first.",
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
    tuning = [r for r in rows if is_autotune_row(r)]
    if tuning:
        out += [
            "", "## Autotune candidates at the headline shapes (aligned; FASTATTN_AUTOTUNE=1 only)", "",
            "The listed alternatives to the fixed tiles (ops/autotune.py). A spill here is for the tuner's "
            "clock to weigh; a row over its arch's shared memory is skipped there (OutOfResources).", "",
            "| kernel | dtype | config | arch | registers | spill store+load | shared | over the arch limit |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {r['kernel']} | {r['dtype']} | {r['config']} | sm_{r['arch']} | {r['registers']} | "
              f"{r['spill_store_bytes']}+{r['spill_load_bytes']} | {r['shared_bytes']} | "
              f"{'**yes**' if r['shared_bytes'] > SHARED_MEMORY_LIMIT[r['arch']] else 'no'} |" for r in tuning),
        ]
    generic = [r for r in rows if not r["headline"] and not is_autotune_row(r)]
    if generic:
        spilling = sorted({(r["kernel"], r["dtype"], r["config"], r["arch"], r["spill_store_bytes"])
                           for r in generic if r["spill_store_bytes"]}, key=lambda x: -x[4])
        # sm_86/89 as compiled (their launches differ from sm_80's: compact float32 tiles).
        small = [r for r in rows if r["arch"] in (86, 89) and not is_autotune_row(r)]
        over = over_shared_limit(small)
        out += [
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
    out += [
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
    return "\n".join(out) + "\n"


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
