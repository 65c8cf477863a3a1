"""`import fastattn` leaves os.environ unchanged; only the command line sets GOMP_SPINCOUNT
(fastattn/_environment.py), and the package defers torch while `python -m fastattn` starts so that
the setting comes before torch loads OpenMP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastattn._environment import GOMP_SPINCOUNT, cli_is_starting, configure_cli_process


def _run_clean(script: str) -> dict:
    """Run script in a fresh interpreter (without GOMP_SPINCOUNT, which conftest.py sets) and
    return the JSON object it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_leaves_the_environment_unchanged() -> None:
    result = _run_clean("""
        import json, os
        import torch
        import torch._inductor  # torch's own: importing it sets TORCHINDUCTOR_CACHE_DIR
        before = dict(os.environ)
        import fastattn
        registered = hasattr(torch.ops.fastattn, "dif_attention")  # before any fastattn name is used
        fastattn.dif_attention, fastattn.nn, fastattn.full_item_cross_entropy, fastattn.SoftTarget
        after = dict(os.environ)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        print(json.dumps({"changed": changed, "registered": registered}))
    """)
    assert result == {"changed": [], "registered": True}


def test_package_defers_torch_while_the_cli_starts() -> None:
    result = _run_clean("""
        import json, sys
        sys.argv[0] = "-m"  # as while `python -m fastattn train` locates fastattn/__main__.py
        sys.orig_argv = [sys.executable, "-m", "fastattn", "train"]
        import fastattn
        deferred = "torch" not in sys.modules and "fastattn.functional" not in sys.modules
        from fastattn._environment import configure_cli_process
        configure_cli_process()
        import os, torch
        out = fastattn.dif_attention(*(torch.randn(1, 1, 3, 4) for _ in range(3)), backend="torch")
        print(json.dumps({"deferred": deferred, "spin": os.environ.get("GOMP_SPINCOUNT"),
                          "shape": list(out.shape), "registered": hasattr(torch.ops.fastattn, "dif_attention")}))
    """)
    assert result == {"deferred": True, "spin": GOMP_SPINCOUNT, "shape": [1, 1, 3, 4], "registered": True}


def test_configure_cli_process_sets_the_spin_count_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    configure_cli_process()
    assert os.environ["GOMP_SPINCOUNT"] == GOMP_SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    configure_cli_process()
    assert os.environ["GOMP_SPINCOUNT"] == "7"


@pytest.mark.parametrize("argv0,orig_argv,expected", [
    ("-m", ["python", "-m", "fastattn", "train"], True),
    ("-m", ["python", "-X", "importtime", "-m", "fastattn"], True),
    ("-m", ["python", "-m", "fastattn.ops.aot", "--report"], False),  # a submodule: the package loads eagerly
    ("-m", ["python", "-m", "pytest", "-m", "fastattn"], False),
    ("/x/fastattn/__main__.py", ["python", "-m", "fastattn"], False),  # located already: __main__ runs
    ("-c", ["python", "-c", "import fastattn"], False),
])
def test_cli_is_starting(monkeypatch: pytest.MonkeyPatch, argv0: str, orig_argv: list[str], expected: bool) -> None:
    monkeypatch.setattr(sys, "argv", [argv0, *orig_argv[3:]])
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert cli_is_starting() is expected
