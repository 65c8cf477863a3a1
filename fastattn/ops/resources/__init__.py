"""Static GPU resource report of the Triton kernels, and an H100 roofline of the headline cases.

Compiles (ahead of time, no GPU needed: see ../aot.py) every kernel configuration the launchers
can pick, plus the *aligned* variants a real launch builds at the headline shapes, and reads from
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

Modules: cases.py (the headline shapes, dtypes, archs), launches.py (what is compiled),
measure.py (compiling and measuring, `build_report`), roofline.py (the H100 roofline),
report.py (table, markdown, command line). Run it as `python -m fastattn.ops.aot --report
[--arch 80,86,89,90] [--json FILE] [--md FILE] [--headline-only]` (without TRITON_INTERPRET).
docs/gpu-resources.md explains the output.
"""
from .cases import (ARCHS, ATTENTION_KERNELS, CROSS_ENTROPY_KERNELS, DTYPES, FLOAT32_MODES, HEADLINE_ATTENTION,
                    HEADLINE_CROSS_ENTROPY, AttentionCase, CrossEntropyCase)
from .launches import autotune_launches, headline_launches, report_launches
from .measure import (ROW_KEYS, Job, build_report, config_warps, cubin_registers, derive_arch, launch_source,
                      occupancy, over_shared_limit, ptxas_usage)
from .report import format_markdown, format_table, is_autotune_row, main
from .roofline import (H100_BYTES_PER_S, H100_EXP_PER_S, H100_FP32_FMA_FLOPS, H100_MATMUL_FLOPS, Roofline,
                       attention_roofline, cross_entropy_roofline, headline_rooflines)

__all__ = ["ARCHS", "ATTENTION_KERNELS", "CROSS_ENTROPY_KERNELS", "DTYPES", "FLOAT32_MODES", "H100_BYTES_PER_S",
           "H100_EXP_PER_S", "H100_FP32_FMA_FLOPS", "H100_MATMUL_FLOPS", "HEADLINE_ATTENTION",
           "HEADLINE_CROSS_ENTROPY", "ROW_KEYS", "AttentionCase", "CrossEntropyCase", "Job", "Roofline",
           "attention_roofline", "autotune_launches", "build_report", "config_warps", "cross_entropy_roofline",
           "cubin_registers", "derive_arch", "format_markdown", "format_table", "headline_launches",
           "headline_rooflines", "is_autotune_row", "launch_source", "main", "occupancy", "over_shared_limit",
           "ptxas_usage", "report_launches"]
