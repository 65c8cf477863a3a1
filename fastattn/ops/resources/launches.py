"""The launches the resource report compiles: every headline case as the launchers describe it
on meta tensors (fixed tiles, then the autotune candidates), and every configuration of
`every_triton_launch` with the generic signature."""
from __future__ import annotations

import re
from typing import Any, Iterator, Optional

import torch

from .._common import compact_float32_tiles, dot_precision, target_arch
from ..aot import every_triton_launch
from ..triton_launch import KernelLaunch
from .cases import DTYPES, FLOAT32_MODES, HEADLINE_ATTENTION, HEADLINE_CROSS_ENTROPY, AttentionCase, dtype_name

__all__ = ["ReportLaunch", "autotune_launches", "headline_launches", "launch_tag", "report_launches"]

# (kernel, config, dtype, headline, aligned, launch): one row of the report before it is compiled.
ReportLaunch = tuple[str, str, str, bool, bool, KernelLaunch]


def _launch_dtype(launch: KernelLaunch) -> str:
    """The input dtype of a launch: its first floating-point tensor argument ("none" for a kernel
    without one, the dropout-mask kernel)."""
    for value in launch.args.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return dtype_name(value.dtype)
    return "none"


def launch_tag(launch: KernelLaunch) -> str:
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
    from ..attention.triton_bwd import bwd_launches as attention_bwd
    from ..attention.triton_fwd import fwd_launch
    from ..cross_entropy.triton_bwd import bwd_launches as ce_bwd
    from ..cross_entropy.triton_fwd import lse_launch

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
    from ..attention.triton_bwd import backward_plans, bwd_launches as attention_bwd
    from ..attention.triton_fwd import fwd_launch, tile_candidates
    from ..cross_entropy.triton_bwd import bwd_launches as ce_bwd
    from ..cross_entropy.triton_fwd import ce_tile_candidates, lse_launch

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
            yield kernel, f"{case.name}{infix}-{launch_tag(launch)}", dtype_name(dtype), launch


def headline_launches() -> Iterator[tuple[str, str, str, KernelLaunch]]:
    """(kernel, config, dtype, launch) of every headline case on meta tensors, as the launchers
    describe them (so strides, sizes and tile classes are those of a real call)."""
    return _named(_fixed_launches)


def autotune_launches() -> Iterator[tuple[str, str, str, KernelLaunch]]:
    """(kernel, config, dtype, launch) of every autotune candidate (ops/autotune.py) other than
    the fixed choice, at the headline shapes: what FASTATTN_AUTOTUNE=1 may launch there."""
    return _named(_autotune_launches)


def report_launches(headline_only: bool, only: Optional[str] = None, arch: int = 80) -> list[ReportLaunch]:
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
            config = f"generic-{rest + '-' if rest else ''}{launch_tag(launch)}"
            rows.append((kernel, config, _launch_dtype(launch), False, False, launch))
    return [row for row in rows if only is None or re.search(only, f"{row[0]} {row[1]}")]
