"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention: state dicts, outputs, gradients, masks."""
from __future__ import annotations

import warnings
from typing import Optional

import pytest
import torch

import fastattn
from fastattn import nn as fnn

# torch's reference module warns when a bool key_padding_mask meets a float attn_mask; that is its business
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

BACKENDS = ("cpp", "torch", "triton")
E, HEADS, N = 24, 3, 3  # head dim 8: odd enough, and the Triton interpreter stays quick


def _pair(batch_first: bool = True, kdim: Optional[int] = None, vdim: Optional[int] = None, bias: bool = True,
          backend: str = "cpp", dtype: torch.dtype = torch.float32, seed: int = 0,
          ) -> tuple[torch.nn.MultiheadAttention, fnn.MultiheadAttention]:
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                      dtype=dtype)
    ours = fnn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                  dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(N, L, E) → the module's layout."""
    return x if batch_first else x.transpose(0, 1)


def _padding(n: int, length: int, where: Optional[str]) -> Optional[torch.Tensor]:
    if where is None:
        return None
    mask = torch.zeros(n, length, dtype=torch.bool)
    if where == "right":
        mask[0, length - 2:] = True
        mask[1, length - 1:] = True
    else:  # left padding: causal query rows before the first real key see nothing
        mask[0, :2] = True
        mask[1, :1] = True
    return mask


def _causal_mask(kind: str, lq: int, lk: int) -> Optional[torch.Tensor]:
    hidden = ~torch.ones(lq, lk, dtype=torch.bool).tril()
    if kind == "bool":
        return hidden
    if kind == "additive":
        return torch.zeros(lq, lk).masked_fill(hidden, float("-inf"))
    if kind == "per_head":
        return hidden.expand(N * HEADS, lq, lk).clone()
    return None


def _assert_close_where_defined(ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """torch gives NaN for a query whose keys are all masked, fastattn gives out_proj.bias: compare the rest."""
    assert torch.isfinite(ours).all()
    defined = torch.isfinite(ref)
    assert defined.any()
    torch.testing.assert_close(ours[defined], ref[defined], atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "per_head", "is_causal"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_self_attention_matches_torch(backend: str, batch_first: bool, mask: str, padding: Optional[str]) -> None:
    length = 7
    ref, ours = _pair(batch_first, backend=backend)
    x = _layout(torch.randn(N, length, E), batch_first)
    kpm = _padding(N, length, padding)
    attn_mask = _causal_mask(mask, length, length) if mask != "is_causal" else None
    if mask == "is_causal":  # torch wants the mask with its hint; ours takes the hint alone
        expected, _ = ref(x, x, x, key_padding_mask=kpm, attn_mask=_causal_mask("bool", length, length),
                          need_weights=False)
        got, weights = ours(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=False)
    else:
        expected, _ = ref(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
        got, weights = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    assert weights is None and got.shape == expected.shape
    _assert_close_where_defined(got, expected, atol=2e-6, rtol=1e-5)
    if padding == "left" and mask != "none":  # the fully masked rows: attention output 0 → out_proj.bias
        # (batch 0, position 0) in either layout: position and batch axes are both index 0
        torch.testing.assert_close(got[0, 0], ours.out_proj.bias.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,vdim,bias", [(None, None, True), (10, 14, True), (None, None, False), (10, 14, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_torch(backend: str, batch_first: bool, kdim: Optional[int], vdim: Optional[int],
                                       bias: bool, causal: bool) -> None:
    lq, lk = 5, 9
    ref, ours = _pair(batch_first, kdim=kdim, vdim=vdim, bias=bias, backend=backend)
    query = _layout(torch.randn(N, lq, E), batch_first)
    key = _layout(torch.randn(N, lk, kdim or E), batch_first)
    value = _layout(torch.randn(N, lk, vdim or E), batch_first)
    kpm = _padding(N, lk, "right")
    attn_mask = _causal_mask("bool", lq, lk) if causal else None
    expected, _ = ref(query, key, value, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    got, _ = ours(query, key, value, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    _assert_close_where_defined(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_unbatched_and_additive_padding(backend: str) -> None:
    ref, ours = _pair(True, backend=backend)
    x = torch.randn(6, E)
    kpm = torch.zeros(6)
    kpm[4:] = -10000.0  # RecBole-style finite mask values hide a key exactly like -inf
    expected, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    got, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert got.shape == (6, E)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_gradients_match_torch(backend: str, batch_first: bool) -> None:
    """Training mode (dropout 0): input and parameter gradients equal torch's, with padding and causal mask."""
    length = 7
    ref, ours = _pair(batch_first, backend=backend)
    ref.train(), ours.train()
    x = _layout(torch.randn(N, length, E), batch_first)
    kpm = _padding(N, length, "right")
    mask = _causal_mask("bool", length, length)
    grads = []
    for module in (ref, ours):
        inp = x.clone().requires_grad_(True)
        out, _ = module(inp, inp, inp, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([inp.grad] + [p.grad for p in module.parameters()])
    for g_ref, g_ours in zip(*grads):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kdim,vdim,bias", [(None, None, True), (10, 14, False)])
def test_state_dict_round_trip_both_ways(kdim: Optional[int], vdim: Optional[int], bias: bool) -> None:
    ref = torch.nn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=vdim)
    ours = fnn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=vdim)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor)
    back = torch.nn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=vdim)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    back.load_state_dict(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor)


def test_from_torch_shares_parameters_and_is_a_torch_module() -> None:
    ref = torch.nn.MultiheadAttention(E, HEADS, dropout=0.1, batch_first=True).eval()
    ours = fnn.MultiheadAttention.from_torch(ref, backend="torch")
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.in_proj_weight is ref.in_proj_weight and ours.out_proj.bias is ref.out_proj.bias
    assert (ours.dropout, ours.batch_first, ours.training) == (0.1, True, False)
    x = torch.randn(N, 5, E)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0],
                               atol=2e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="module must be a torch.nn.MultiheadAttention"):
        fnn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


def _fresh_warnings() -> None:
    fnn.checks._warned_reasons.clear()


def test_need_weights_falls_back_to_torch_and_warns_once() -> None:
    ref, ours = _pair(True)
    x = torch.randn(N, 5, E)
    _fresh_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, weights = ours(x, x, x, is_causal=True)  # need_weights defaults to True, as in torch
        ours(x, x, x, is_causal=True)
    assert len([w for w in caught if "need_weights=True" in str(w.message)]) == 1
    expected, expected_weights = ref(x, x, x, attn_mask=_causal_mask("bool", 5, 5))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_ignore_need_weights_stays_fused() -> None:
    ref, _ = _pair(True)
    ours = fnn.MultiheadAttention.from_torch(ref, ignore_need_weights=True)
    x = torch.randn(N, 5, E)
    _fresh_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got, weights = ours(x, x, x, is_causal=True)
    assert weights is None
    torch.testing.assert_close(got, ref(x, x, x, attn_mask=_causal_mask("bool", 5, 5))[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind,reason", [
    ("band", "not the causal pattern"),
    ("soft", "soft additive bias"),
])
def test_other_masks_fall_back_to_torch(mask_kind: str, reason: str) -> None:
    ref, ours = _pair(False)
    x = torch.randn(6, N, E)
    if mask_kind == "band":
        attn_mask = ~(torch.ones(6, 6).tril() - torch.ones(6, 6).tril(-3)).bool()
    else:
        attn_mask = torch.randn(6, 6)
    _fresh_warnings()
    with pytest.warns(UserWarning, match=reason):
        got, _ = ours(x, x, x, attn_mask=attn_mask, need_weights=False)
    torch.testing.assert_close(got, ref(x, x, x, attn_mask=attn_mask, need_weights=False)[0])


def test_add_bias_kv_falls_back_to_torch() -> None:
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, HEADS, add_bias_kv=True).eval()
    ours = fnn.MultiheadAttention(E, HEADS, add_bias_kv=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, N, E)
    _fresh_warnings()
    with pytest.warns(UserWarning, match="add_bias_kv"):
        got, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(got, ref(x, x, x, need_weights=False)[0])


def test_dropout_runs_in_the_kernel_and_is_seeded() -> None:
    ours = fnn.MultiheadAttention(E, HEADS, dropout=0.4, batch_first=True, backend="cpp").train()
    x = torch.randn(N, 9, E)
    torch.manual_seed(3)
    a, _ = ours(x, x, x, is_causal=True, need_weights=False)
    torch.manual_seed(3)
    b, _ = ours(x, x, x, is_causal=True, need_weights=False)
    ours.eval()
    c, _ = ours(x, x, x, is_causal=True, need_weights=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_swaps_into_transformer_encoder_layer() -> None:
    """Code that calls self_attn(...) with need_weights=False (TransformerEncoderLayer) runs fused, unchanged."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(N, 6, E, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(6)
    expected = layer(x, src_mask=mask)
    layer.self_attn = fnn.MultiheadAttention.from_torch(layer.self_attn)
    _fresh_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer(x, src_mask=mask)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"embed_dim": 10, "num_heads": 3}, ValueError, r"embed_dim \(10\) must be divisible by num_heads \(3\)"),
    ({"embed_dim": 0, "num_heads": 1}, ValueError, "embed_dim must be an int >= 1"),
    ({"embed_dim": 8, "num_heads": 2, "dropout": 1.0}, ValueError, "dropout must be a float in"),
    ({"embed_dim": 8, "num_heads": 2, "kdim": -1}, ValueError, "kdim must be an int >= 1"),
    ({"embed_dim": 8, "num_heads": 2, "backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_bad_constructor_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fnn.MultiheadAttention(**kwargs)


def test_bad_forward_arguments() -> None:
    ours = fnn.MultiheadAttention(E, HEADS, batch_first=True)
    x = torch.randn(N, 5, E)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N=3, S=5\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(N, 4, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L=5, S=5\)"):
        ours(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool), need_weights=False)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or float tensor"):
        ours(x, x, x, key_padding_mask=torch.zeros(N, 5, dtype=torch.int64), need_weights=False)
    with pytest.raises(ValueError, match=f"query must have embed_dim={E} features"):
        ours(torch.randn(N, 5, E + 1), x, x, need_weights=False)
    with pytest.raises(ValueError, match="all be batched"):
        ours(x, x[0], x[0], need_weights=False)
    with pytest.raises(ValueError, match="key and value must share"):
        ours(x, x, x[:, :4], need_weights=False)


def test_public_name() -> None:
    assert fastattn.nn.MultiheadAttention is fnn.MultiheadAttention


class _TwoBlocks(torch.nn.Module):
    """pmixer/SASRec.pytorch's layout: a ModuleList of torch MHA called with the default need_weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_layers = torch.nn.ModuleList(torch.nn.MultiheadAttention(E, HEADS) for _ in range(2))
        self.norm = torch.nn.LayerNorm(E)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:  # seqs (L, N, E)
        mask = ~torch.ones(seqs.shape[0], seqs.shape[0], dtype=torch.bool).tril()
        for layer in self.attention_layers:
            out, _ = layer(self.norm(seqs), seqs, seqs, attn_mask=mask)
            seqs = seqs + out
        return seqs


def test_replace_multihead_attention_in_a_model() -> None:
    from fastattn.integrations import replace_multihead_attention

    torch.manual_seed(0)
    model = _TwoBlocks().eval()
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, N, E)
    expected = model(x)
    assert replace_multihead_attention(model, ignore_need_weights=True) is model
    assert all(type(m) is fnn.MultiheadAttention for m in model.attention_layers)
    assert all(a is b for a, b in zip(model.parameters(), params))  # shared: an existing optimizer keeps working
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    _fresh_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # need_weights=True is ignored as asked: fused, no fallback
        torch.testing.assert_close(model(x), expected, atol=5e-6, rtol=1e-5)
    bare = replace_multihead_attention(torch.nn.MultiheadAttention(E, HEADS))
    assert type(bare) is fnn.MultiheadAttention
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_multihead_attention("model")  # type: ignore[arg-type]
