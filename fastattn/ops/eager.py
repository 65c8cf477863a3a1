"""Eager calls of the fused operators without torch.library's dispatch.

A call of a `torch.library` operator goes through its autograd wrapper, a redispatch below
autograd and a dynamo guard around the implementation before the implementation runs: on this
project's CPU that is about half the host time of a small cross-entropy call (cProfile: ~500 of
~1,100 µs under the profiler). At recommender sizes on a GPU the host path, not the kernels,
sets the time (docs/gpu-results.md), so a plain eager call runs the operator's implementation
and its autograd formula (the same setup_context and backward functions the operator registers)
through a `torch.autograd.Function` instead.

Everything that traces or transforms — torch.compile (dynamo), make_fx / AOTAutograd,
FakeTensorMode or any other TorchDispatchMode, functorch transforms, tensor subclasses — keeps
the operator, which is what those systems know how to handle (`eager_call_ok`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_call_ok(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """True when a call with these tensor arguments may skip the operator: not under dynamo, no
    Python dispatch mode active, and every tensor a plain (or Parameter) tensor."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t is None or (type(t) in _PLAIN and not wrapped(t)) for t in tensors)


def eager_function(name: str, forward: Callable[..., Any],
                   setup_context: Callable[[Any, tuple[Any, ...], Any], None],
                   backward: Callable[..., tuple[Optional[torch.Tensor], ...]]) -> type[torch.autograd.Function]:
    """A `torch.autograd.Function` computing `forward(*inputs)` with an operator's autograd formula:
    `setup_context(ctx, inputs, output)` and `backward(ctx, *grad_outputs)` as registered with
    `register_autograd`. Call it as `Fn.apply(*inputs)` with the operator's positional arguments."""

    def fn_forward(ctx: Any, *inputs: Any) -> Any:
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def fn_backward(ctx: Any, *grads: Any) -> Any:
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fn_forward), "backward": staticmethod(fn_backward),
        "__doc__": f"Eager twin of an operator ({name}); see fastattn/ops/eager.py."})
