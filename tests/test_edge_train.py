"""Issue 15, training command: bad options, --out, concurrent runs, corrupt checkpoints, changed
data on --resume, diverging losses. Everything runs in-process through `fastattn.__main__.main`
on tiny synthetic data (a second process only where it is the point)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import fastattn.train as training
from fastattn.__main__ import _LOOP_FLAGS, main, model_flags
from fastattn.evaluation import metrics_from_ranks, sampled_ranks

SYN = "synthetic:num_users=60,num_items=40,num_attributes=4,num_tags=6,min_len=3,max_len=8,seed=1"
TINY = ["--hidden", "8", "--layers", "1", "--heads", "1", "--inner", "8", "--max-len", "8", "--epochs", "1",
        "--batch-size", "512", "--no-progress"]


def _train(out: Path, *extra: str, model: str = "sasrec", data: str = SYN) -> int:
    return main(["train", "--model", model, "--data", data, "--out", str(out), *TINY, *extra])


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, which must be exactly one line starting with "error:"."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch sasrec run (read-only for the tests: copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert _train(out) == 0
    return out


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / training.LOCK).unlink(missing_ok=True)
    return run


# ---------------------------------------------------------------- every flag: one line, exit 2, nothing written
# (flag, value, model): a bad value for every flag of `train` (wrong type, 0, negative, NaN, inf, out of range)
_BAD_TRAIN = [
    ("hidden", "0", "sasrec"), ("hidden", "-4", "sasrec"), ("hidden", "nan", "sasrec"), ("hidden", "8.5", "sasrec"),
    ("layers", "0", "sasrec"), ("heads", "0", "sasrec"), ("heads", "3", "sasrec"), ("inner", "-1", "sasrec"),
    ("dropout", "1", "sasrec"), ("dropout", "nan", "sasrec"), ("attn-dropout", "-0.1", "sasrec"),
    ("attribute-dim", "0", "difsr"), ("attribute-dim", "1.5", "difsr"), ("aap-weight", "inf", "difsr"),
    ("aap-weight", "-1", "difsr"), ("fusion", "mean", "difsr"), ("loss", "hinge", "sasrec"),
    ("loss", "bce", "bert4rec"), ("mask-prob", "0", "bert4rec"), ("mask-prob", "1", "bert4rec"),
    ("tau", "0", "sasrec"), ("item-shards", "0", "sasrec"), ("item-shards", "2", "difsr"),
    ("long-query-len", "0", "mqsa_ted"), ("alpha", "1.5", "mqsa_ted"), ("alpha", "nan", "mqsa_ted"),
    ("tau", "0", "mqsa_ted"), ("tau", "nan", "mqsa_ted"), ("kd-weight", "-1", "mqsa_ted"),
    ("num-prototypes", "0", "man"), ("num-negatives", "-1", "man"), ("proto-weight", "nan", "man"),
    ("acd-mode", "sometimes", "autocdsr"), ("acd-weight", "inf", "autocdsr"), ("pareto-vectors", "0", "autocdsr"),
    ("pareto-region", "9", "autocdsr"), ("pareto-normalization", "max", "autocdsr"),
    ("pareto-scale", "acd", "autocdsr"), ("pareto-init-steps", "-1", "autocdsr"), ("layer-norm-eps", "0", "sasrec"),
    ("init-std", "-0.1", "sasrec"), ("init-std", "nan", "man"), ("num-ib-tokens", "0", "autocdsr_plus"),
    ("domain-layers", "0", "autocdsr_plus"), ("shared-layers", "-1", "autocdsr_plus"),
    ("backbone", "sideways", "autocdsr"), ("backbone", "bidirectional", "sasrec"), ("loss", "bce", "autocdsr_plus"),
    ("mask-prob", "1", "autocdsr"),
    ("epochs", "0", "sasrec"), ("epochs", "x", "sasrec"), ("batch-size", "-5", "sasrec"),
    ("batch-unit", "users", "sasrec"), ("bucket-batches", "-1", "sasrec"), ("eval-batch-size", "0", "sasrec"),
    ("lr", "0", "sasrec"), ("lr", "nan", "sasrec"), ("lr", "inf", "sasrec"), ("weight-decay", "-1", "sasrec"),
    ("weight-decay", "inf", "sasrec"), ("weight-decay", "nan", "sasrec"), ("max-len", "0", "sasrec"),
    ("patience", "0", "sasrec"), ("seed", "-1", "sasrec"), ("seed", str(2 ** 70), "sasrec"), ("seed", "1.5", "sasrec"),
    ("device", "meta", "sasrec"), ("device", "cpu:1", "sasrec"), ("device", "mps", "sasrec"),
    ("device", "cuda:99", "sasrec"), ("device", "gpu", "sasrec"), ("backend", "fast", "sasrec"),
    ("out", "", "sasrec"), ("data", "", "sasrec"), ("data", "/no/such/file.txt", "sasrec"),
    ("data", "synthetic:num_users=-3", "sasrec"), ("format", "csv", "sasrec"), ("preset", "huge", "sasrec"),
    ("model", "gru4rec", "sasrec"), ("sampled-eval", "", "sasrec"), ("no-progress=1", None, "sasrec"),
    ("track-test=yes", None, "sasrec"), ("resume=1", None, "sasrec"), ("compile=1", None, "sasrec"),
]


def test_every_train_flag_has_a_bad_value_case() -> None:
    covered = {flag.split("=")[0] for flag, _, _ in _BAD_TRAIN}
    every = ({flag.name for flag in model_flags()} | {name for name, _, _ in _LOOP_FLAGS}
             | {"data", "format", "preset", "model", "sampled-eval", "track-test", "resume", "no-progress", "compile"})
    assert every <= covered, sorted(every - covered)


@pytest.mark.parametrize("flag, value, model", _BAD_TRAIN, ids=[f"{f}={v}" for f, v, _ in _BAD_TRAIN])
def test_bad_train_option_is_one_line_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      flag: str, value: str | None, model: str) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", model, "--data", SYN, "--out", str(out), *TINY]
    if flag == "sampled-eval":  # valid alone; the 40-item catalog is too small for 100 negatives
        args.append("--sampled-eval")
    else:
        args += [f"--{flag}"] + ([] if value is None else [value])
    assert main(args) == 2
    assert f"--{flag.split('=')[0]}" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("args, flag", [
    (["--device", "meta"], "--device"), (["--device", "cuda:99"], "--device"), (["--device", "nowhere"], "--device"),
    (["--json=1"], "--json"), (["--keep-history=no"], "--keep-history"), (["--sampled-eval"], "--sampled-eval"),
    (["--bogus"], "--bogus"),
])
def test_bad_evaluate_option_is_one_line_naming_the_flag(trained: Path, capsys: pytest.CaptureFixture[str],
                                                         args: list[str], flag: str) -> None:
    assert main(["evaluate", "--checkpoint", str(trained / "checkpoint.pt"), *args]) == 2
    assert flag in _one_error_line(capsys)


def test_evaluate_needs_the_checkpoint_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate"]) == 2
    assert "--checkpoint" in _one_error_line(capsys)


# ---------------------------------------------------------------- --out, backend and memory before any work
def _no_data_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(training, "load_dataset", refuse)


@pytest.mark.parametrize("where", ["file", "under a file", "in /proc"])
def test_unusable_out_stops_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], where: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = {"file": afile, "under a file": afile / "run", "in /proc": Path("/proc/fastattn-edge-test/run")}[where]
    _no_data_loading(monkeypatch)
    assert _train(out) == 2
    assert f"--out {out}" in _one_error_line(capsys)
    assert afile.read_text() == "keep me" and (out == afile or not out.exists())


def test_unavailable_backend_stops_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("triton runs here: no unavailable backend to request")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine outside the test suite
    _no_data_loading(monkeypatch)
    assert _train(tmp_path / "run", "--backend", "triton") == 2
    assert "--backend triton" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_out_of_memory_is_one_line_naming_the_size_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def huge(*_: Any) -> None:  # what torch's CPU allocator raises for --hidden 1000000000
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 244000000000 bytes.")

    monkeypatch.setattr(training, "build_model", huge)
    assert _train(tmp_path / "run") == 2
    line = _one_error_line(capsys)
    assert "out of memory" in line and "--hidden" in line and "--batch-size" in line
    assert not (tmp_path / "run").exists()  # the directory this run made is removed again


# ---------------------------------------------------------------- one run per --out; unique temporary names
def test_a_second_run_on_the_same_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with training.claim_out(out):  # another run holds the directory
        assert _train(out) == 2
        line = _one_error_line(capsys)
        assert f"--out {out}" in line and "another run" in line
        assert not (out / "checkpoint.pt").exists()
    assert _train(out) == 0  # released


def test_the_lock_of_a_dead_process_is_released(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid of the holder'); f.flush(); print('locked', flush=True); "
         "time.sleep(120)", str(out / training.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert _train(out) == 2
        assert "another run" in _one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert _train(out) == 0


def test_every_output_goes_through_a_unique_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real = tempfile.mkstemp

    def spy(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    out = tmp_path / "run"
    assert _train(out) == 0
    targets = {Path(name).name.split(".tmp")[0].rsplit(".", 1)[0] for name in made}
    assert {"checkpoint.pt", "metrics.json", "curves.png"} <= targets
    assert len(set(made)) == len(made) and not any(Path(n).exists() for n in made)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "curves.png", "metrics.json"]


# ---------------------------------------------------------------- corrupt or foreign checkpoints
def _edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """A corruption that rewrites the checkpoint after `change` modified its dict in place."""
    def write(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return write


class _Foreign:
    """A Python object: weights_only loading must refuse it (unpickling it could run code)."""


_CORRUPT: dict[str, Callable[[Path], None]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "directory": lambda p: (p.unlink(), p.mkdir()),
    "not a dict": lambda p: torch.save([1, 2, 3], p),
    "python object": _edit(lambda s: s.update(config=_Foreign())),
    "missing key": _edit(lambda s: s.pop("optimizer")),
    "extra key": _edit(lambda s: s.update(extra=1)),
    "wrong format": _edit(lambda s: s.update(format=99)),
    "epoch a string": _edit(lambda s: s.update(epoch="3")),
    "unknown option": _edit(lambda s: s["config"].update(colour="red")),
    "option of the wrong type": _edit(lambda s: s["config"].update(epochs="x")),
    "extra weight": _edit(lambda s: [d.update(extra=torch.zeros(1)) for d in (s["model"], s["best"]["state"])]),
    "missing weight": _edit(lambda s: [d.popitem() for d in (s["model"], s["best"]["state"])]),
    "wrong shape": _edit(lambda s: [d.update({k: torch.zeros(3, 3) for k in list(d)[:1]})
                                    for d in (s["model"], s["best"]["state"])]),
    "rng not bytes": _edit(lambda s: s.update(rng=torch.zeros(3))),
    "optimizer of another model": _edit(lambda s: s["optimizer"]["param_groups"][0].update(params=[0])),
}


@pytest.mark.parametrize("command", ["evaluate", "resume"])
@pytest.mark.parametrize("variant", list(_CORRUPT))
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          command: str, variant: str) -> None:
    run = _copy_run(trained, tmp_path)
    path = run / "checkpoint.pt"
    _CORRUPT[variant](path)
    metrics = (run / "metrics.json").read_bytes()
    if command == "evaluate":
        code = main(["evaluate", "--checkpoint", str(path)])
    else:
        code = main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"])
    if variant == "optimizer of another model" and command == "evaluate":
        assert code == 0  # evaluate reads the weights only
        return
    assert code == 2
    line = _one_error_line(capsys)
    assert str(path) in line and ("--checkpoint" if command == "evaluate" else "--resume") in line
    assert (run / "metrics.json").read_bytes() == metrics


def test_checkpoints_hold_only_what_weights_only_loads(trained: Path) -> None:
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert state["data"]["spec"] == SYN and state["data"]["bytes"] is None
    assert state["data"]["fingerprint"] == training.load_dataset(SYN).fingerprint()


# ---------------------------------------------------------------- --resume and evaluate on changed data
def _write_s3rec(path: Path, rows: list[list[int]]) -> None:
    path.write_text("".join(f"{u + 1} {' '.join(map(str, r))}\n" for u, r in enumerate(rows)))


def _rows(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    rows = [list(rng.choice(np.arange(1, 31), size=6, replace=False)) for _ in range(40)]
    rows[0][:3] = [1, 2, 3]
    rows[1][:1] = [30]  # every id up to 30 is used: the catalog is 30 items
    return rows


@pytest.mark.parametrize("change", ["same catalog", "larger catalog"])
def test_resume_refuses_changed_data_and_evaluate_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        change: str) -> None:
    data = tmp_path / "seq.txt"
    rows = _rows()
    _write_s3rec(data, rows)
    out = tmp_path / "run"
    assert _train(out, data=str(data)) == 0
    data.write_text(data.read_text().replace(" ", "  "))  # other bytes, the same interactions: resumes
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    before = (out / "checkpoint.pt").read_bytes()
    rows[0][:3] = [3, 2, 1]
    if change == "larger catalog":
        rows.append(list(range(25, 33)))
    _write_s3rec(data, rows)
    assert main(["train", "--resume", "--out", str(out), "--epochs", "3", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "--data" in line and str(data) in line and "fingerprint" in line
    assert (out / "checkpoint.pt").read_bytes() == before
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")])
    err = capsys.readouterr().err
    assert "warning: --data" in err and "is not the data" in err
    if change == "same catalog":
        assert code == 0
    else:  # the weights no longer fit the catalog: a message, not a size-mismatch traceback
        assert code == 2 and "do not fit" in err.strip().splitlines()[-1]


def test_a_checkpoint_without_fingerprint_resumes_and_evaluates_with_a_warning(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(trained, tmp_path)
    path = run / "checkpoint.pt"
    _edit(lambda s: s.pop("data"))(path)  # as written before this change
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(path)]) == 0
    assert "cannot check" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert "cannot check" in capsys.readouterr().err
    assert "data" in torch.load(path, weights_only=True)  # the resumed run records it


# ---------------------------------------------------------------- diverging losses
def test_a_diverging_run_stops_naming_the_epoch_and_lr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(out, "--lr", "1e6", "--batch-size", "16") == 2
    line = _one_error_line(capsys)
    assert "epoch 1" in line and "--lr" in line and "--weight-decay" in line
    assert not out.exists()  # nothing was worth keeping


def _poison(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """From now on every training step of SASRec makes the weights NaN: through a NaN loss
    ("loss") or, with a finite loss, through NaN gradients ("grads")."""
    from fastattn.models.sasrec import SASRec

    real = SASRec.losses

    def losses(self: SASRec, batch: Any) -> dict[str, torch.Tensor]:
        out = real(self, batch)
        if how == "loss":
            return {k: v * float("nan") for k, v in out.items()}
        out["loss"].register_hook(lambda g: g * float("nan"))
        return out

    monkeypatch.setattr(SASRec, "losses", losses)


@pytest.mark.parametrize("how", ["loss", "grads"])
def test_the_last_good_checkpoint_survives_a_diverging_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], how: str) -> None:
    out = tmp_path / "run"
    assert _train(out) == 0
    before = (out / "checkpoint.pt").read_bytes()
    _poison(monkeypatch, how)
    # one step per epoch (--batch-size 512 > the targets): with "grads" every loss read stays finite
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "epoch 2" in line and "--lr" in line and f"{out / 'checkpoint.pt'} keeps epoch 1" in line
    assert (out / "checkpoint.pt").read_bytes() == before
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(bool(t.isfinite().all()) for t in state["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------- smaller edges of the loop and the metrics
def test_resume_with_track_test_added(trained: Path, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--patience", "1", "--track-test",
                 "--no-progress"]) == 0
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert all("test_at_best" in h for h in history[1:])


def test_sampled_rank_of_a_nan_target_is_a_miss() -> None:
    items = torch.randn(150, 4, generator=torch.Generator().manual_seed(0))
    users = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    items[5] = float("nan")  # the target of user 0
    ranks = sampled_ranks(users, items, torch.tensor([5, 6, 7]), None, torch.Generator().manual_seed(2))
    assert ranks[0] == 100 and bool((ranks[1:] <= 100).all())
    assert metrics_from_ranks(ranks[:1])["HR@20"] == 0.0


def test_negative_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="ranks"):
        metrics_from_ranks(torch.tensor([0, -1]))
    assert math.isclose(metrics_from_ranks(torch.tensor([0, 1]))["NDCG@5"], (1 + 1 / math.log2(3)) / 2)
