"""Compiling the report's launches ahead of time (no GPU) and measuring each: registers and spills
(`ptxas -v`, cross-checked against the cubin), shared memory, tensor-core instructions, `tt.dot`
count and the occupancy these allow; `build_report` does it for every launch in parallel."""
from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from .._common import SHARED_MEMORY_LIMIT
from ..triton_launch import KernelLaunch
from .cases import ARCHS
from .launches import ReportLaunch, report_launches

__all__ = ["ROW_KEYS", "Job", "build_report", "config_warps", "cubin_registers", "derive_arch", "launch_source",
           "occupancy", "over_shared_limit", "ptxas_usage"]

# The keys of one report row, in order (the tests check exactly these).
ROW_KEYS = ("kernel", "config", "dtype", "arch", "headline", "registers", "spill_store_bytes",
            "spill_load_bytes", "shared_bytes", "tensor_cores", "dots", "occupancy")


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
_LAUNCHES: dict[int, list[ReportLaunch]] = {}


def _launches(arch: int, headline_only: bool, only: Optional[str]) -> list[ReportLaunch]:
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
