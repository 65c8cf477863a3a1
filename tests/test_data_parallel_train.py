"""Data-parallel training (issue 19, item 4): `torchrun --nproc-per-node 2 -m fastattn train ...`.

Two CPU processes (gloo) against one: the same per-epoch losses and metrics for the deterministic
models without dropout, a checkpoint that evaluates and resumes in one process (and a one-process
checkpoint that resumes in two), output only from rank 0; the models with per-step randomness run.
torchrun is started as `python -m torch.distributed.run` on a free port, every run with a timeout
so that a hang fails the test. The pieces of `fastattn.data_parallel` are checked in-process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fastattn.__main__ import main
from fastattn.data.batch import TrainBatch
from fastattn.data_parallel import SINGLE, Group, group_from_env, process_device, select_rows

SYN = "synthetic:num_users=300,num_items=120,min_len=5,max_len=14"
SMALL = ["--data", SYN, "--hidden", "16", "--layers", "1", "--heads", "2", "--inner", "32", "--batch-size", "200",
         "--max-len", "12", "--eval-batch-size", "128", "--no-progress"]
EXACT = ["--dropout", "0", "--attn-dropout", "0"]
TIMEOUT = 240  # seconds for one torchrun (about 10 s here): a hang fails instead of blocking the suite
TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node N -m fastattn train ARGS` (the launcher of the running interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-port", str(_free_port()), "-m", "fastattn", "train", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def one_process(*args: str) -> None:
    assert main(["train", *args]) == 0


def metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Per-epoch losses and the best epoch's valid/test metrics equal within TOL."""
    assert len(got["history"]) == len(want["history"])
    for a, b in zip(got["history"], want["history"]):
        losses = [k for k in b if k in ("loss", "ce", "aap")]
        assert losses and all(abs(a[k] - b[k]) <= TOL for k in losses), (a, b)
    assert got["best_epoch"] == want["best_epoch"]
    for split in ("valid", "test"):
        assert got[split].keys() == want[split].keys()
        assert all(abs(got[split][k] - want[split][k]) <= TOL for k in want[split]), (split, got[split], want[split])


@pytest.fixture(scope="module")
def difsr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DIF-SR, 2 epochs without dropout: in two processes ("two") and in one ("one")."""
    root = tmp_path_factory.mktemp("difsr")
    runs = {"two": root / "two", "one": root / "one"}
    done = torchrun("--model", "difsr", "--epochs", "2", *SMALL, *EXACT, "--out", str(runs["two"]))
    (root / "two.log").write_text(done.stdout)
    one_process("--model", "difsr", "--epochs", "2", *SMALL, *EXACT, "--out", str(runs["one"]))
    return runs


def test_two_processes_train_difsr_as_one(difsr: dict[str, Path]) -> None:
    two, one = metrics(difsr["two"]), metrics(difsr["one"])
    assert_same_run(two, one)
    assert two["processes"] == 2 and two["device"].startswith("2 processes") and "processes" not in one
    # rank 0 alone logs and prints: one line per epoch, one table
    log = (difsr["two"].parent / "two.log").read_text()
    assert log.count("epoch   1  loss") == 1 and log.count("epoch   2  loss") == 1
    assert log.count("best epoch ") == 1 and log.count("HR@5   NDCG@5") == 1
    assert "x 2 processes (data-parallel)" in log


def test_the_checkpoint_is_the_plain_model_and_evaluates_in_one_process(
        difsr: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    two = torch.load(difsr["two"] / "checkpoint.pt", weights_only=True)
    one = torch.load(difsr["one"] / "checkpoint.pt", weights_only=True)
    assert list(two["model"]) == list(one["model"]) and not any(k.startswith("module.") for k in two["model"])
    assert two["epoch"] == 2 and two["optimizer"]["state"].keys() == one["optimizer"]["state"].keys()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(difsr["two"] / "checkpoint.pt"), "--json"]) == 0
    printed = capsys.readouterr().out
    again = json.loads(printed[printed.index("{"):])
    want = metrics(difsr["two"])
    for split in ("valid", "test"):
        assert all(abs(again[split][k] - want[split][k]) <= TOL for k in want[split])


def test_resume_across_world_sizes(difsr: dict[str, Path], tmp_path: Path) -> None:
    """Epoch 1 in two processes, epoch 2 in one; and epoch 1 in one, epoch 2 in two: both give the
    uninterrupted run's losses and metrics."""
    cut_two, cut_one = tmp_path / "cut_two", tmp_path / "cut_one"
    torchrun("--model", "difsr", "--epochs", "1", *SMALL, *EXACT, "--out", str(cut_two))
    one_process("--resume", "--out", str(cut_two), "--epochs", "2", "--no-progress")
    one_process("--model", "difsr", "--epochs", "1", *SMALL, *EXACT, "--out", str(cut_one))
    torchrun("--resume", "--out", str(cut_one), "--epochs", "2", "--no-progress")
    want = metrics(difsr["one"])
    for cut in (cut_two, cut_one):
        assert_same_run(metrics(cut), want)


def test_sasrec_with_an_uneven_last_batch(tmp_path: Path) -> None:
    """Batches of 23 of the 300 sequences: the last one has a single row, so process 1 has no share
    of it (it runs a stand-in row with weight 0), and the shares hold different numbers of targets.
    The sampled protocol too: its negatives are drawn for whole batches, as one process draws them."""
    args = ["--model", "sasrec", "--epochs", "2", *SMALL, *EXACT, "--batch-unit", "sequences", "--batch-size", "23",
            "--sampled-eval"]
    torchrun(*args, "--out", str(tmp_path / "two"))
    one_process(*args, "--out", str(tmp_path / "one"))
    assert_same_run(metrics(tmp_path / "two"), metrics(tmp_path / "one"))


def test_item_shards_train_sasrec_as_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--item-shards 2: the item table split by rows over the two processes (sharded lookup,
    vocab-parallel loss over the gathered rows) gives one process's losses and metrics; batches of
    23 sequences, so the last has one row and process 1 pads its share with a row without targets.
    The checkpoint holds the whole table and evaluates in one process to the same metrics; a run
    cut after epoch 1 resumes with one process (whole optimizer state re-sharded and back)."""
    args = ["--model", "sasrec", "--epochs", "2", *SMALL, *EXACT, "--batch-unit", "sequences", "--batch-size", "23"]
    torchrun(*args, "--item-shards", "2", "--out", str(tmp_path / "two"))
    one_process(*args, "--out", str(tmp_path / "one"))
    assert_same_run(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert two["model"]["item_embedding.weight"].shape == one["model"]["item_embedding.weight"].shape
    moments = [k for k, v in one["optimizer"]["state"][0].items() if v.dim() == 2]
    assert moments and all(two["optimizer"]["state"][0][k].shape == one["optimizer"]["state"][0][k].shape
                           for k in moments)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "two" / "checkpoint.pt"), "--json"]) == 0
    printed = capsys.readouterr().out
    again, want = json.loads(printed[printed.index("{"):]), metrics(tmp_path / "two")
    assert all(abs(again["test"][k] - want["test"][k]) <= TOL for k in want["test"])
    # one epoch with one process, the second with the table split: the uninterrupted run
    one_process(*args[:2], "--epochs", "1", *args[4:], "--out", str(tmp_path / "cut"))
    torchrun("--resume", "--out", str(tmp_path / "cut"), "--epochs", "2", "--item-shards", "2", "--no-progress")
    assert_same_run(metrics(tmp_path / "cut"), metrics(tmp_path / "one"))


def test_item_shards_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra, message in ((["--model", "difsr"], "--item-shards 2: the item table can be split for sasrec"),
                           (["--model", "sasrec"], "--item-shards 2 must equal the number of processes"),
                           (["--model", "sasrec", "--item-shards", "0"], "--item-shards must be a positive integer")):
        flags = ["--item-shards", "2", *extra] if "--item-shards" not in extra else extra
        assert main(["train", *flags, *SMALL, "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("model, extra", [
    ("autocdsr", []),  # Pareto weights: autograd.grad between DDP's forward and backward
    ("man", ["--num-negatives", "20"]),  # sampled negatives
    ("mqsa_ted", ["--sampled-eval"]),  # the teacher; the sampled protocol split over the processes
])
def test_models_with_per_step_randomness_run(tmp_path: Path, model: str, extra: list[str]) -> None:
    torchrun("--model", model, "--epochs", "1", *SMALL, *extra, "--out", str(tmp_path))
    saved = metrics(tmp_path)
    assert saved["processes"] == 2 and 0.0 <= saved["test"]["NDCG@10"] <= 1.0
    assert all(v == v for v in saved["history"][0].values() if isinstance(v, float))  # no NaN


# ---------------------------------------------------------------- the pieces, in-process
def _batch() -> TrainBatch:
    items = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6], [0, 0, 0, 7], [0, 8, 9, 1], [0, 0, 2, 3]])
    targets = torch.tensor([[0, 0, 2, 3], [4, 5, 6, 7], [0, 0, 0, 1], [0, 9, 1, 2], [0, 0, 0, 4]])
    return TrainBatch(items=items, targets=targets, attributes=(items[..., None],), target_attributes=(),
                      domains=None, target_domains=None)


def test_shares_split_the_rows_and_weigh_the_targets() -> None:
    batch = _batch()  # targets per row 2, 4, 1, 3, 1: 11 in all
    assert SINGLE.share(batch) == (batch, None)
    first, w0 = Group(0, 2).share(batch)
    second, w1 = Group(1, 2).share(batch)
    assert torch.equal(first.items, batch.items[[0, 2, 4]]) and torch.equal(second.items, batch.items[[1, 3]])
    assert torch.equal(first.attributes[0], batch.attributes[0][[0, 2, 4]]) and first.domains is None
    assert (w0, w1) == (4 / 11, 7 / 11)
    # more processes than rows: an empty share becomes the first row with weight 0
    alone, w = Group(5, 6).share(batch)
    assert torch.equal(alone.items, batch.items[:1]) and w == 0.0
    assert select_rows(batch, torch.zeros(0, dtype=torch.int64)).items.shape == (0, 4)


def test_one_process_is_untouched() -> None:
    terms = object()
    assert SINGLE.wrap(torch.nn.Linear(1, 1), terms) is terms  # type: ignore[arg-type]
    sums = {"loss": torch.tensor(1.0)}
    assert SINGLE.reduce_sums(sums) == sums and SINGLE.gather(sums["loss"]) is sums["loss"]
    state = torch.get_rng_state()
    SINGLE.seed_epoch(1, 2)
    SINGLE.barrier()
    assert torch.equal(torch.get_rng_state(), state)


def test_the_environment_of_torchrun() -> None:
    assert group_from_env({}) is SINGLE and group_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is SINGLE
    assert group_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Group(3, 4)
    with pytest.raises(ValueError, match="RANK=4, LOCAL_RANK=0 do not fit WORLD_SIZE=4"):
        group_from_env({"WORLD_SIZE": "4", "RANK": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        group_from_env({"WORLD_SIZE": "two"})
    assert process_device("cpu", {"LOCAL_RANK": "1"}) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1: under torchrun each process uses the GPU of its local"):
        process_device("cuda:1", {"LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="--device cuda: process 64 of this node has no GPU of its own"):
        process_device("cuda", {"LOCAL_RANK": "64"})


def test_ranks_reseed_per_epoch_each_their_own() -> None:
    draws = []
    for rank in (0, 1, 0):
        Group(rank, 2).seed_epoch(7, 3)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
