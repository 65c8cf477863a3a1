"""How the Triton launchers become torch operators, decided once at import.

- Compiled Triton (TRITON_INTERPRET unset, triton installed): `torch.library.triton_op`. Its body
  is traceable, so torch.compile / AOTAutograd decompose the operator into its torch ops and one
  `triton_kernel_wrapper_functional` node per launch (`KernelLaunch` calls
  `torch.library.wrap_triton`), and Inductor schedules the kernels themselves.
- Interpreted Triton (TRITON_INTERPRET=1, CPU tensors): `torch.library.custom_op` with an
  explicit fake kernel. There `wrap_triton` returns the interpreter's function unwrapped, so
  triton_op's functional decomposition (and its fake kernel, which is the body itself) would run
  the interpreter on FakeTensors and fail ("Cannot access data pointer").

Either way the operator's name, schema and autograd are the same.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Iterable

import torch

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Without triton the operators are still defined (their bodies import the launchers lazily and
# the backend dispatch never selects them); triton_op would have no kernels to show.
USES_TRITON_OP = not TRITON_INTERPRETED and importlib.util.find_spec("triton") is not None


def triton_operator(name: str, *, fake: Callable[..., Any], kernels: Callable[[], Iterable[Any]]
                    ) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: register `fn` (which launches its kernels through `KernelLaunch`, i.e.
    `wrap_triton`, and reads no tensor value on the host) as the operator `name` with no mutated
    arguments; `fake` is its fake kernel under the interpreter, `kernels()` the @triton.jit
    functions it can launch. Returns the `CustomOpDef` (register autograd on it)."""
    def register(fn: Callable[..., Any]) -> Any:
        if not USES_TRITON_OP:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        op = torch.library.triton_op(name, fn, mutates_args=())
        # triton_op finds the kernels by reading fn's source for `wrap_triton(<kernel>)`; ours are
        # launched through KernelLaunch, so name them here: AOTAutograd's cache key hashes their
        # source, and without it an edited kernel could reuse a stale cached graph.
        from torch._library import triton as library_triton

        library_triton.triton_ops_to_kernels[name] = list(kernels())
        return op
    return register
