"""The README's Python examples run as written (on CPU they take the torch reference)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "import torch, fastattn" in b]


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int) -> None:
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    commands = [line for line in README.read_text().splitlines() if line.startswith("python -m pip install")]
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert len(commands) >= 2 and ci == commands[1]
