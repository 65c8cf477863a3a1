"""Fixtures of the per-op tests (tests/conftest.py, which sets TRITON_INTERPRET=1, runs first)."""
import pytest

from catalog_cases import select_variant


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend of a catalog op (cross-entropy, top-k) for the variant a test is indirectly
    parametrised with (catalog_cases.select_variant: e.g. "torch-small-chunks" → "torch")."""
    return select_variant(request.param, monkeypatch)
