"""The README: its two command lines come first and CI runs the second; its Python examples run as
written (on CPU they take the C++ kernels or the torch path); it stays short. Its bash lines and
links are checked with the docs' in tests/test_docs.py."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
EXAMPLES = re.findall(r"^```python\n(.*?)^```", TEXT, re.S | re.M)
MAX_LINES = 200


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2
    assert any("fastattn.dif_attention" in e and "full_item_cross_entropy" in e for e in EXAMPLES)
    assert any("fastattn.nn.MultiheadAttention" in e for e in EXAMPLES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {"__name__": "__doc_block__"})


def test_ci_runs_the_readme_test_command() -> None:
    commands = [line for line in TEXT.splitlines() if line.startswith("python -m pip install")]
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert len(commands) >= 2 and ci == commands[1]


def test_the_two_commands_come_first() -> None:
    """Title, one paragraph, then the bash block of the two command lines: install + train, and
    install + test."""
    first = re.search(r"^```(\w*)\n(.*?)^```", TEXT, re.S | re.M)
    assert first is not None and first.group(1) == "bash"
    before = TEXT[:first.start()]
    assert before.startswith("# fastattn\n") and "\n## " not in before and before.count("\n\n") == 2
    lines = first.group(2).splitlines()
    assert len(lines) == 2 and all(line.startswith("python -m pip install ") for line in lines)
    assert "python -m fastattn train" in lines[0] and "python -m pytest" in lines[1]


def test_readme_is_short() -> None:
    lines = TEXT.count("\n") + (not TEXT.endswith("\n"))
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it within {MAX_LINES} and move detail to docs/"


def test_readme_maps_every_doc() -> None:
    docs = sorted(p.name for p in (README.parent / "docs").glob("*.md"))
    missing = [name for name in docs if f"(docs/{name})" not in TEXT]
    assert not missing, f"README's map of docs/ lacks {missing}"
