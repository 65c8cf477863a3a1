"""Every tensor of one call on one device (issue 17, item 5): a tensor on another device raises a
one-line ValueError naming the argument — in the public functions on every backend, and in the
Triton launchers themselves (the operators can be called without the public functions). Here a
meta tensor among CPU ones stands for a tensor on another GPU. And a launch enters the CUDA
device of its tensors (KernelLaunch.cuda_device), none for CPU or meta tensors.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import fastattn

from attention_cases import Case, make_inputs
from catalog_cases import make_case

META = torch.device("meta")


def _raises_naming(name: str, call: Callable[[], Any]) -> None:
    # Moving q (the reference argument) names the first other argument and q; otherwise `name`.
    with pytest.raises(ValueError, match=rf"(^|\b){name} is on meta|but {name} is on meta") as info:
        call()
    assert "\n" not in str(info.value)


ATTENTION_ARGS = ["q", "k", "v", "attr_q[0]", "attr_k[0]", "key_padding_mask", "domains"]


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "auto"])
@pytest.mark.parametrize("name", ATTENTION_ARGS)
def test_dif_attention_rejects_a_tensor_on_another_device(backend: str, name: str) -> None:
    inputs = make_inputs(Case(b=2, h=2, lq=5, dk=8, attr_dims=(4,), padding="left", n_domains=2))
    args = dict(q=inputs["q"], k=inputs["k"], v=inputs["v"], attr_q=list(inputs["attr_q"]),
                attr_k=list(inputs["attr_k"]), key_padding_mask=inputs["key_padding_mask"], domains=inputs["domains"])
    if name.startswith("attr"):
        args[name[:6]][0] = args[name[:6]][0].to(META)
    else:
        args[name] = args[name].to(META)
    q, k, v, attr_q, attr_k = (args.pop(key) for key in ("q", "k", "v", "attr_q", "attr_k"))
    _raises_naming(name.replace("[", r"\[").replace("]", r"\]"),
                   lambda: fastattn.dif_attention(q, k, v, attr_q, attr_k, backend=backend, **args))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "auto"])
@pytest.mark.parametrize("name", ["hidden", "item_weight", "bias", "target"])
def test_full_item_cross_entropy_rejects_a_tensor_on_another_device(backend: str, name: str) -> None:
    case = make_case(6, 11, 8)
    args = dict(hidden=case["hidden"], item_weight=case["weight"], bias=case["bias"], target=case["target"])
    args[name] = args[name].to(META)
    _raises_naming(name, lambda: fastattn.full_item_cross_entropy(
        args["hidden"], args["item_weight"], args["target"], bias=args["bias"], backend=backend))


@pytest.mark.parametrize("backend", ["torch", "cpp", "auto"])
@pytest.mark.parametrize("name", ["hidden", "item_weight", "bias", "exclude"])
def test_topk_items_rejects_a_tensor_on_another_device(backend: str, name: str) -> None:
    case = make_case(6, 11, 8)
    args = dict(hidden=case["hidden"], item_weight=case["weight"], bias=case["bias"],
                exclude=torch.full((6, 2), -1, dtype=torch.int64))
    args[name] = args[name].to(META)
    _raises_naming(name, lambda: fastattn.topk_items(
        args["hidden"], args["item_weight"], 3, bias=args["bias"], exclude=args["exclude"], backend=backend))


def _attention_launch_args() -> dict:
    q = torch.randn(2, 1, 8, 16)
    rows = torch.zeros(2, 1, 8)
    dom = torch.zeros(2, 8, dtype=torch.int64)
    return dict(q=q, k=q.clone(), v=q.clone(), dout=q.clone(), out=q.clone(), lse=rows, acd=rows.clone(),
                grad_acd=rows.clone(),
                key_padding_mask=torch.zeros(2, 8, dtype=torch.bool), dom_q=dom, dom_k=dom.clone())


def _fwd(a: dict) -> Any:
    from fastattn.ops.attention.triton_fwd import fwd_launch

    return fwd_launch(a["q"], a["k"], a["v"], 0.25, True, 0.0, None, a["key_padding_mask"], (a["dom_q"], a["dom_k"]))


def _bwd(a: dict) -> Any:
    from fastattn.ops.attention.triton_bwd import bwd_launches

    return bwd_launches(a["q"], a["k"], a["v"], a["dout"], a["out"], a["lse"], a["acd"], a["grad_acd"], 0.25, True,
                        0.0, None, a["key_padding_mask"], (a["dom_q"], a["dom_k"]))


@pytest.mark.parametrize("launcher, names", [
    (_fwd, ["k", "v", "key_padding_mask", "domains[0]", "domains[1]"]),
    (_bwd, ["k", "v", "dout", "out", "lse", "acd", "grad_acd", "key_padding_mask", "domains[0]", "domains[1]"]),
], ids=["fwd_launch", "bwd_launches"])
def test_attention_launchers_reject_a_tensor_on_another_device(launcher: Callable, names: list[str]) -> None:
    for name in names:
        args = _attention_launch_args()
        key = {"domains[0]": "dom_q", "domains[1]": "dom_k"}.get(name, name)
        args[key] = args[key].to(META)
        with pytest.raises(ValueError, match=rf"^{re_name(name)} is on meta but q is on cpu$"):
            launcher(args)
    launch, *_ = launcher(_attention_launch_args())  # all on one device: described
    launches = launch if isinstance(launch, list) else [launch]
    assert all(one.cuda_device() is None for one in launches)  # CPU tensors: no CUDA device entered


def re_name(name: str) -> str:
    return name.replace("[", r"\[").replace("]", r"\]")


def test_cross_entropy_launchers_reject_a_tensor_on_another_device() -> None:
    from fastattn.ops.cross_entropy.triton_bwd import bwd_launches
    from fastattn.ops.cross_entropy.triton_fwd import lse_launch

    n, v, d = 6, 11, 8

    def args() -> dict:
        row = torch.zeros(n)
        return dict(hidden=torch.randn(n, d), weight=torch.randn(v, d), bias=torch.randn(v), lse=row,
                    coef_p=row.clone(), coef_base=row.clone(), target=torch.zeros(n, dtype=torch.int64),
                    coef_t=row.clone())

    for name in ["weight", "bias"]:
        a = args()
        a[name] = a[name].to(META)
        with pytest.raises(ValueError, match=rf"^{name} is on meta but hidden is on cpu$"):
            lse_launch(a["hidden"], a["weight"], a["bias"], 1.0)
    for name in ["weight", "bias", "lse", "coef_p", "coef_base", "target", "coef_t"]:
        a = args()
        a[name] = a[name].to(META)
        with pytest.raises(ValueError, match=rf"^{name} is on meta but hidden is on cpu$"):
            bwd_launches(**a, scale=1.0)
    launch, *_ = lse_launch(args()["hidden"], args()["weight"], None, 1.0)
    assert launch.cuda_device() is None


def test_launch_on_meta_tensors_enters_no_cuda_device() -> None:
    from fastattn.ops.cross_entropy.triton_fwd import lse_launch

    h = torch.empty(4, 8, device=META)
    launch, *_ = lse_launch(h, h, None, 1.0)
    assert launch.cuda_device() is None
