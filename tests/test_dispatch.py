"""Backend choice: "auto" falls back when the C++ kernels cannot be built; "cpp" then raises why."""
import pytest
import torch

import fastattn
from fastattn.ops import cpp_extension


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> str:
    reason = "building the C++ kernels failed (no C++ compiler found)"
    monkeypatch.setattr(cpp_extension, "cpp_unavailable_reason", lambda: reason)
    return reason


def test_explicit_cpp_raises_with_the_build_error(no_compiler: str) -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(fastattn.BackendUnavailable, match="backend='cpp' cannot run: .*no C\\+\\+ compiler"):
        fastattn.dif_attention(q, q, q, backend="cpp")
    with pytest.raises(fastattn.BackendUnavailable, match="no C\\+\\+ compiler"):
        fastattn.full_item_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 2]), backend="cpp")


def test_auto_falls_back_to_torch(no_compiler: str) -> None:
    q = torch.randn(1, 1, 4, 8)
    ref = fastattn.dif_attention(q, q, q, backend="torch")
    assert torch.equal(fastattn.dif_attention(q, q, q), ref)
    h, w, t = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 2])
    assert torch.equal(fastattn.full_item_cross_entropy(h, w, t),
                       fastattn.full_item_cross_entropy(h, w, t, backend="torch"))
    scores, _ = fastattn.topk_items(h, w, 2)
    assert torch.equal(scores, fastattn.topk_items(h, w, 2, backend="torch")[0])


def test_cpp_needs_cpu_tensors() -> None:
    q = torch.randn(1, 1, 4, 8, device="meta")
    with pytest.raises(fastattn.BackendUnavailable, match="run on CPU tensors"):
        fastattn.dif_attention(q, q, q, backend="cpp")


def test_a_prebuilt_extension_older_than_its_sources_is_not_loaded(tmp_path, monkeypatch) -> None:
    """`pip install -e .` builds fastattn._C once; after a pull that changes csrc/ it would register
    the old operators (an import error at best), so the loader builds from the sources instead."""
    import importlib.machinery
    import os

    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in (*cpp_extension.SOURCES, "ops.h"):
        (csrc / name).write_text("")
    spec = importlib.machinery.ModuleSpec("fastattn._C", None, origin=str(so))
    monkeypatch.setattr(cpp_extension.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(cpp_extension, "CSRC", csrc)
    os.utime(so, (1_000, 1_000))
    assert cpp_extension._prebuilt_is_stale()  # sources newer than the build
    os.utime(so, (4_000_000_000, 4_000_000_000))
    assert not cpp_extension._prebuilt_is_stale()
    monkeypatch.setattr(cpp_extension, "CSRC", tmp_path / "no-sources")  # an installed wheel: no csrc/
    os.utime(so, (1_000, 1_000))
    assert not cpp_extension._prebuilt_is_stale()
