"""The Triton kernels are `torch.library.triton_op`s when Triton is compiled, so torch.compile's
AOTAutograd sees each kernel launch (issue 16, item 1); under the interpreter they are
`custom_op`s (ops/triton_registration.py says why), which tests/test_operators.py opchecks.

The compiled case runs in a subprocess without TRITON_INTERPRET (tests/triton_trace_worker.py):
it traces forward and backward of the public functions on backend="triton" with aot_function
under FakeTensorMode. No GPU is needed: nothing is launched, the graphs are only inspected.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

WORKER = Path(__file__).with_name("triton_trace_worker.py")

ATTENTION_FORWARD = ["_dif_attn_fwd_kernel"]
# Registered with the backward operator: both schedules (ops/attention/triton_bwd.py); the traced
# cases are short, so their graphs launch the fused one only.
ATTENTION_BACKWARD_KERNELS = ["_delta_kernel", "_dif_attn_bwd_dkdv_kernel", "_dif_attn_bwd_dq_kernel",
                              "_dif_attn_bwd_fused_kernel"]
ATTENTION_BACKWARD = ["_dif_attn_bwd_fused_kernel"]
CE_FORWARD = ["_ce_lse_kernel"]
CE_BACKWARD = ["_ce_bwd_dh_kernel", "_ce_bwd_de_kernel"]


@pytest.fixture(scope="module")
def traced() -> dict[str, Any]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compiled_triton_kernels_are_triton_ops(traced: dict[str, Any]) -> None:
    assert traced["uses_triton_op"]
    assert traced["triton_ops"] == {
        "fastattn::dif_attention_triton": sorted(ATTENTION_FORWARD),
        "fastattn::dif_attention_triton_backward": sorted(ATTENTION_BACKWARD_KERNELS),
        "fastattn::full_item_cross_entropy_triton": sorted(CE_FORWARD),
        "fastattn::full_item_cross_entropy_triton_backward": sorted(CE_BACKWARD),
    }


@pytest.mark.parametrize("case,forward,backward", [
    ("attention", ATTENTION_FORWARD, ATTENTION_BACKWARD),
    ("attention_dropout_domains", ATTENTION_FORWARD, ATTENTION_BACKWARD),
    ("cross_entropy_hard", CE_FORWARD, CE_BACKWARD),
    ("cross_entropy_soft", CE_FORWARD, CE_BACKWARD),
])
def test_traced_graphs_launch_the_kernels(traced: dict[str, Any], case: str, forward: list[str],
                                          backward: list[str]) -> None:
    """Each graph holds one `triton_kernel_wrapper_functional` per launch, and no opaque
    fastattn operator (the triton_ops decompose into their torch ops and kernels)."""
    graphs = traced[case]
    assert sorted(graphs["forward"]["kernels"]) == sorted(forward)
    assert sorted(graphs["backward"]["kernels"]) == sorted(backward)
    assert graphs["forward"]["opaque"] == [] and graphs["backward"]["opaque"] == []


def test_dropout_seed_is_a_graph_tensor(traced: dict[str, Any]) -> None:
    """With dropout every attention kernel reads SEED from a tensor of the graph (drawn by
    torch.randint in the forward graph, saved for the backward), never a host constant."""
    graphs = traced["attention_dropout_domains"]
    assert graphs["forward"]["seeds"] == ["Node"]
    assert graphs["backward"]["seeds"] == ["Node"]  # the fused backward: one launch
    assert traced["attention"]["forward"]["seeds"] == []  # no dropout: no seed argument at all


def test_interpreted_triton_kernels_are_custom_ops() -> None:
    """This process runs Triton in its interpreter (conftest.py): the same operators, as
    custom_ops with fake kernels, and no kernels declared to torch.compile."""
    from torch._library.triton import triton_ops_to_kernels

    from fastattn.ops.triton_registration import USES_TRITON_OP

    assert not USES_TRITON_OP
    assert not [name for name in triton_ops_to_kernels if name.startswith("fastattn::")]
    for name in ("dif_attention_triton", "dif_attention_triton_backward", "full_item_cross_entropy_triton",
                 "full_item_cross_entropy_triton_backward"):
        opdef = torch._library.custom_ops.OPDEFS[f"fastattn::{name}"]
        assert opdef._abstract_fn is not None and opdef._abstract_fn.__name__.endswith("_fake"), name


def _attention_loss(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aq: torch.Tensor, ak: torch.Tensor,
                    dom: torch.Tensor) -> torch.Tensor:
    import fastattn
    out, acd = fastattn.dif_attention(q, k, v, [aq], [ak], dropout_p=0.2, domains=dom, backend="triton")
    return (out * out).sum() + acd.sum()


def _cross_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
    import fastattn
    return fastattn.full_item_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=0.1, backend="triton")


def _attention_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [*(torch.randn(2, 2, 6, 8, generator=g) for _ in range(5)), torch.randint(0, 2, (2, 6), generator=g)]


def _cross_entropy_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g), torch.randn(13, generator=g),
            torch.tensor([0, 3, -100, 12, 7])]


@pytest.mark.parametrize("fn,make_inputs", [(_attention_loss, _attention_inputs),
                                            (_cross_entropy_loss, _cross_entropy_inputs)], ids=["attention", "ce"])
def test_interpreted_operators_compile_without_graph_break(fn: Any, make_inputs: Any) -> None:
    """In interpreter mode the Triton operators are opaque custom_ops: torch.compile(fullgraph=True,
    backend="aot_eager") traces the public function (dropout included: the seed is a traced
    torch.randint) and gives eager's loss and gradients for the same torch.manual_seed."""
    import torch._dynamo

    torch._dynamo.reset()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xs = [x.clone().requires_grad_(x.is_floating_point()) for x in make_inputs()]
        torch.manual_seed(5)
        loss = f(*xs)
        loss.backward()
        results.append([loss.detach(), *(x.grad for x in xs if x.requires_grad)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
