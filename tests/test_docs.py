"""Every code block of README.md and docs/*.md runs or is checked, and every relative link resolves.

- ```python blocks are executed as written (on CPU they take the C++ kernels or the torch path);
- ```bash blocks: each `python -m fastattn train|evaluate` line goes through the command line's own
  parser and `fastattn.train.make_config` / `TrainConfig.validate` (a `--data` file outside the
  repository that is absent here is replaced by 'synthetic' for that check only); the cheapest
  training command really trains, for one epoch, into a temporary directory; `python -m fastattn
  demo` runs; bench scripts exist and answer `--help`; `python -m pytest` paths exist; install
  lines equal the README's;
- every relative link and image (and its #anchor) points at a file or heading of the repository;
- no page cites the design notes outside the repository.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(page: Path, lang: Optional[str] = None) -> list[tuple[int, str, str]]:
    """(first line number, language, text) of every fenced block of `page`, or of one language."""
    text = page.read_text(encoding="utf-8")
    found = [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return [b for b in found if lang is None or b[1] == lang]


def prose(page: Path) -> str:
    """The page without its fenced blocks (links and headings inside code are not links or headings)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def readme_install_lines() -> list[str]:
    """The two command lines of the README's first block (install + train, install + test)."""
    return blocks(README)[0][2].splitlines()


def shell_lines(text: str) -> list[str]:
    """A bash block's command lines: comments dropped, backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    assert not pending, f"a continued line ends the block: {pending!r}"
    return lines


def commands(line: str) -> list[list[str]]:
    """The commands of one line (split at &&), each as argv without leading VAR=value assignments."""
    tokens = shlex.split(line, comments=True)
    out: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            out.append([])
        else:
            out[-1].append(token)
    result = []
    for argv in out:
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            result.append(argv)
    return result


# README.md's own blocks run in tests/test_readme.py.
PYTHON_BLOCKS = [pytest.param(page, line, text, id=f"{rel(page)}:{line}")
                 for page in PAGES[1:] for line, _, text in blocks(page, "python")]
BASH_LINES = [pytest.param(page, line, id=f"{rel(page)}:{start}:{line[:60]}")
              for page in PAGES for start, _, text in blocks(page, "bash") for line in shell_lines(text)]


# ----------------------------------------------------------------------------------- python blocks
def test_pages_have_python_and_bash_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 8 and len(BASH_LINES) >= 10


@pytest.mark.parametrize("page, line, code", PYTHON_BLOCKS)
def test_python_block_runs(page: Path, line: int, code: str, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    torch.manual_seed(0)
    exec(compile(code, f"{rel(page)}, block at line {line}", "exec"), {"__name__": "__doc_block__"})


# ------------------------------------------------------------------------------------- bash blocks
class _Captured(Exception):
    """Raised by the stubs below: the command line got as far as the work, with this config."""


def _cli_argv(argv: list[str]) -> list[str]:
    """`python -m fastattn ...` as the arguments of fastattn.__main__.main, with data files
    outside the repository that are absent here replaced by 'synthetic' (the existence check is
    the only check that needs the file) and --device cuda by cpu on a machine without CUDA."""
    args = argv[3:]
    fixed = []
    for i, token in enumerate(args):
        previous = args[i - 1] if i else ""
        if previous == "--data" and not token.startswith("synthetic") and not (ROOT / token).exists():
            assert token.startswith("../shared/data/"), f"--data {token}: no such file in the repository"
            token = "synthetic"
        if previous == "--device" and token.startswith("cuda") and not torch.cuda.is_available():
            token = "cpu"
        fixed.append(token)
    return fixed


def _validate_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run the command line on `args` up to the point where it would train or evaluate; return
    the TrainConfig (train) or the checkpoint path (evaluate) it would have worked on."""
    import fastattn.__main__ as cli
    import fastattn.train as training

    seen: dict[str, Any] = {}

    def fake_train(config: Any, *_: Any, **__: Any) -> Any:
        seen["config"] = config
        raise _Captured

    def fake_evaluate(path: Any, *_: Any, **__: Any) -> Any:
        seen["checkpoint"] = path
        raise _Captured

    def fake_resume(out: Any, **given: Any) -> Any:  # validates the flags as a fresh run of that model would
        return training.make_config(given.pop("model", "difsr"), given.pop("preset", "small"), **given)

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(training, "evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(training, "resume_config", fake_resume)
    monkeypatch.chdir(ROOT)  # the pages' commands run from the repository root
    try:
        code = cli.main(args)
    except _Captured:
        return seen.get("config", seen.get("checkpoint"))
    raise AssertionError(f"python -m fastattn {' '.join(args)}: exit code {code} before any work "
                         "(the error is printed above)")


def _run(argv: list[str], timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


# pytest options that take the next argument as their value (not a path to check)
_VALUED = {"-k", "-m", "-p", "-n", "-o", "--benchmark-json", "--benchmark-min-rounds", "--bench-device", "--size"}


@pytest.mark.parametrize("page, line", BASH_LINES)
def test_bash_line(page: Path, line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if "pip install" in line:
        assert line in readme_install_lines(), f"install line differs from the README's: {line}"
    for argv in commands(line):
        if argv[0] == "python" and argv[1:3] == ["-m", "pip"]:
            continue  # the whole line was checked above
        if argv[0] == "python" and argv[1:3] == ["-m", "fastattn"]:
            if argv[3] == "demo":
                continue  # runs in test_demo_runs
            assert argv[3] in ("train", "evaluate"), f"unknown fastattn command: {argv[3]}"
            result = _validate_cli(_cli_argv(argv), monkeypatch)
            assert result is not None
        elif argv[0] == "torchrun":
            # torchrun's own options, then the fastattn command it starts in every process
            # (tests/test_data_parallel_train.py runs one for real)
            start = argv.index("-m")
            assert argv[start + 1] == "fastattn", f"torchrun starts something else: {line}"
            assert set(a for a in argv[1:start] if a.startswith("-")) <= {"--nproc-per-node", "--master-port"}, line
            result = _validate_cli(_cli_argv(["python", *argv[start:]]), monkeypatch)
            assert result is not None
        elif argv[0] == "python" and argv[1:3] == ["-m", "fastattn.bench"]:
            from fastattn import bench

            with pytest.raises(SystemExit) as exit_info:
                bench.main(["--help"])
            assert exit_info.value.code == 0
        elif argv[0] == "python" and argv[1:3] == ["-m", "pytest"]:
            paths = [a for i, a in enumerate(argv[3:], 3) if not a.startswith("-") and argv[i - 1] not in _VALUED]
            assert paths, f"no test path in {line}"
            for path in paths:
                assert (ROOT / path.split("::")[0]).exists(), f"{path} does not exist"
        elif argv[0] == "python" and argv[1].startswith("bench/"):
            assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
            _run(["python", argv[1], "--help"], timeout=180)
        elif argv[0] == "bash" and argv[1].startswith("bench/"):
            assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
        else:
            raise AssertionError(f"{rel(page)}: no check for this command, add one: {' '.join(argv)}")


def test_the_readme_training_command_trains_and_evaluates(tmp_path: Path) -> None:
    """The README's first command, cut to one epoch and written to a temporary directory, really
    trains; `evaluate` then reads the checkpoint it wrote."""
    train = next(argv for argv in commands(readme_install_lines()[0]) if argv[1:4] == ["-m", "fastattn", "train"])
    epochs = train.index("--epochs")
    train[epochs + 1] = "1"
    out = tmp_path / "run"
    _run([*train, "--out", str(out), "--no-progress"], cwd=tmp_path)
    assert (out / "metrics.json").is_file() and (out / "checkpoint.pt").is_file()
    proc = _run(["python", "-m", "fastattn", "evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--json"],
                cwd=tmp_path)
    assert '"test"' in proc.stdout


def test_demo_runs(tmp_path: Path) -> None:
    lines = [line for page in PAGES for _, _, text in blocks(page, "bash") for line in shell_lines(text)]
    # docs/training.md shows the demo command; this test runs it, so it must stay there
    assert any(argv[1:4] == ["-m", "fastattn", "demo"] for line in lines for argv in commands(line)), \
        "no page shows `python -m fastattn demo` in a bash block (docs/training.md should)"
    assert "OK" in _run(["python", "-m", "fastattn", "demo"], timeout=300, cwd=tmp_path).stdout


def test_cli_validation_is_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above catches a bad flag and an unknown model, and keeps every flag's value."""
    config = _validate_cli(["train", "--model", "sasrec", "--data", "synthetic", "--epochs", "3", "--hidden", "32"],
                           monkeypatch)
    assert (config.model, config.epochs, config.model_options["hidden"]) == ("sasrec", 3, 32)
    with pytest.raises(AssertionError, match="exit code 2"):
        _validate_cli(["train", "--model", "sasrec", "--lr", "-1"], monkeypatch)
    with pytest.raises(AssertionError, match="exit code 2"):
        _validate_cli(["train", "--model", "gru4rec"], monkeypatch)  # not a built-in model
    with pytest.raises(AssertionError, match="exit code 2"):
        _validate_cli(["train", "--model", "sasrec", "--fusion", "gate"], monkeypatch)  # a DIF-SR flag


# ------------------------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page), re.M):
        slug = _slug(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


LINKS = [pytest.param(page, target, id=f"{rel(page)}->{target}")
         for page in PAGES for target in LINK.findall(prose(page))
         if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http(s):, mailto: … are not checked


def test_pages_have_links() -> None:
    assert len(LINKS) >= 30


@pytest.mark.parametrize("page, target", LINKS)
def test_relative_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{rel(page)}: link to {target}: {path} does not exist"
    assert resolved == ROOT or ROOT in resolved.parents, f"{rel(page)}: {target} leaves the repository"
    if anchor:
        assert resolved.suffix == ".md", f"{rel(page)}: #anchor on a non-markdown target {target}"
        assert anchor in anchors(resolved), (f"{rel(page)}: link to {target}: no heading #{anchor} in "
                                             f"{rel(resolved)} (has {sorted(anchors(resolved))})")


def test_named_repository_paths_exist() -> None:
    """Files and folders a page names (fastattn/…, csrc/…, tests/…, bench/…, docs/…), in prose or in
    code, exist — or, for a prefix such as `bench/results/beauty-` or `tests/test_edge_`, something
    starting with it does. A page that names a moved file fails here."""
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"(?<![\w./-])((?:fastattn|csrc|tests|bench|docs)/[\w./-]*)", text):
            path = match.group(1).rstrip(".")
            if not list(ROOT.glob(glob_escape(path) + "*")):
                missing.append(f"{rel(page)}, line {text.count(chr(10), 0, match.start()) + 1}: {path}")
    assert not missing, "pages name paths that do not exist:\n" + "\n".join(missing)


def glob_escape(path: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", path)


def test_no_page_cites_the_outside_design_notes() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"DESIGN(\.md| ?§)|shared/DESIGN|\bDESIGN\b", text), \
            f"{rel(page)} cites the design notes outside the repository: describe it in docs/design.md"


def test_docs_have_the_sections_others_point_at() -> None:
    """Code docstrings and other pages cite these headings by name."""
    assert {"data-formats", "evaluation-protocol"} <= anchors(ROOT / "docs" / "training.md")
    assert {"the-cross-domain-attention-mass-a_cd", "autocdsrs-pareto-weighting"} <= anchors(ROOT / "docs" / "design.md")
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert re.search(r"<!-- performance: generated .*?-->", text) and "<!-- performance: end -->" in text
    assert "bench/README.md" in text
