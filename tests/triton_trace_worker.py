"""Trace the public functions on the Triton operators as torch.compile's AOTAutograd does, with
Triton *compiled* (not interpreted); run by test_triton_operators.py in a subprocess because the
tests' own process has TRITON_INTERPRET=1 set.

Prints one JSON object: the registration of each Triton operator, and per case the Triton kernels
in the forward and backward graphs, any `fastattn` operator left in them, and what the kernels'
SEED argument is.

No GPU here, so two stand-ins, neither touching the code under test:
- fake CPU tensors stand for CUDA ones (autograd on fake CUDA tensors aborts in a CPU-only torch
  build), so the backend check that Triton needs CUDA tensors is lifted, and value checks take
  their CUDA form (a device-side assert) instead of reading the (fake) CPU tensor;
- Triton's driver reports an sm_90 target: torch reads the kernels' TTIR to learn which arguments
  they write (their outputs only). Without a driver torch assumes every argument is written, and
  then the backward kernels would "mutate" the forward's inputs — not what runs on a GPU.
"""
import importlib
import json
import os
import sys
from typing import Any, Callable

import torch


def _install_stand_ins() -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    import fastattn._dispatch
    import fastattn.ops.checks

    class TargetOnlyDriver:
        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(TargetOnlyDriver())
    fastattn._dispatch.triton_unavailable_reason = lambda tensors: None
    fastattn.ops.checks.eager_host_checks = lambda device: False


def _graphs(fn: Callable[..., torch.Tensor], make_inputs: Callable[[], tuple]) -> dict[str, Any]:
    """Forward and backward graphs of `fn` (a scalar loss) under FakeTensorMode, summarised."""
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    captured: dict[str, torch.fx.GraphModule] = {}

    def compiler(name: str) -> Callable:
        def keep(gm: torch.fx.GraphModule, _inputs: Any) -> torch.fx.GraphModule:
            captured[name] = gm
            return gm
        return keep

    with FakeTensorMode():
        inputs = make_inputs()
        loss = aot_function(fn, fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))(*inputs)
        loss.backward()

    summary: dict[str, Any] = {}
    for name, gm in captured.items():
        kernels, seeds, opaque = [], [], []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while not isinstance(kernel, JITFunction):  # num_warps/num_stages come as a one-config Autotuner
                    kernel = kernel.fn
                kernels.append(kernel.__name__)
                args = node.kwargs["kwargs"]
                if "SEED" in args:
                    seeds.append(type(args["SEED"]).__name__)  # "Node": a tensor in the graph
            elif "fastattn" in str(node.target):
                opaque.append(str(node.target))
        summary[name] = {"kernels": kernels, "seeds": seeds, "opaque": opaque}
    return summary


def _attention_case(dropout_p: float, with_domains: bool) -> tuple[Callable, Callable]:
    import fastattn

    def fn(q, k, v, aq, ak, pad, dom):  # type: ignore[no-untyped-def]
        res = fastattn.dif_attention(q, k, v, [aq], [ak], key_padding_mask=pad, dropout_p=dropout_p,
                                     domains=dom if with_domains else None, backend="triton")
        out, acd = res if with_domains else (res, None)
        return out.sum() + (acd.sum() if acd is not None else 0)

    def inputs() -> tuple:
        b, h, lq, d = 2, 2, 12, 16
        streams = [torch.randn(b, h, lq, d, requires_grad=True) for _ in range(5)]
        pad = torch.zeros(b, lq, dtype=torch.bool)
        return (*streams, pad, torch.randint(0, 3, (b, lq)))
    return fn, inputs


def _cross_entropy_case(soft: bool) -> tuple[Callable, Callable]:
    import fastattn

    def fn(hidden, weight, bias, target):  # type: ignore[no-untyped-def]
        if soft:  # three entries of 0.3 per row, the other 0.1 spread over the catalog
            base, indptr, indices, values = target
            target = fastattn.SoftTarget(base=base, indptr=indptr, indices=indices, values=values)
            return fastattn.full_item_cross_entropy(hidden, weight, target, backend="triton")
        return fastattn.full_item_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=0.1,
                                                backend="triton")

    def inputs() -> tuple:
        n, v, d = 10, 37, 16
        hidden = torch.randn(n, d, requires_grad=True)
        weight = torch.randn(v, d, requires_grad=True)
        bias = torch.randn(v, requires_grad=True)
        if soft:
            target = (torch.full((n,), 0.1 / v), torch.arange(0, 3 * n + 1, 3), torch.randint(0, v, (3 * n,)),
                      torch.full((3 * n,), 0.3))
        else:
            target = torch.randint(0, v, (n,))
        return hidden, weight, bias, target
    return fn, inputs


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    importlib.import_module("fastattn")  # registers the operators
    from torch._library.triton import triton_ops_to_kernels

    from fastattn.ops.triton_registration import USES_TRITON_OP

    _install_stand_ins()
    cases = {
        "attention": _attention_case(0.0, False),
        "attention_dropout_domains": _attention_case(0.1, True),
        "cross_entropy_hard": _cross_entropy_case(False),
        "cross_entropy_soft": _cross_entropy_case(True),
    }
    result: dict[str, Any] = {
        "uses_triton_op": USES_TRITON_OP,
        "triton_ops": {name: sorted(k.__name__ for k in kernels) for name, kernels in triton_ops_to_kernels.items()
                       if name.startswith("fastattn::")},
    }
    for name, (fn, inputs) in cases.items():
        result[name] = _graphs(fn, inputs)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
