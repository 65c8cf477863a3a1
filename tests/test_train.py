"""The training loop and the command line: options, checkpoints, resume, evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fastattn.train as training
from fastattn.__main__ import main
from fastattn.data import SyntheticConfig, make_synthetic, split_dataset

TINY = {"hidden": 16, "layers": 1, "heads": 2, "inner": 32, "batch_size": 200, "eval_batch_size": 128,
        "max_len": 12, "progress": False}


@pytest.fixture(autouse=True)
def tiny_synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """'synthetic' resolves to a small data set so that a few epochs take seconds."""
    small = make_synthetic(SyntheticConfig(num_users=300, num_items=120, min_len=5, max_len=14, seed=3))
    real = training.load_dataset
    monkeypatch.setattr(training, "load_dataset",
                        lambda spec, fmt=None: small if spec == "synthetic" else real(spec, fmt))


def _quiet(*_: Any) -> None:
    pass


def _run(tmp: Path, model: str = "difsr", **kw: Any) -> dict[str, Any]:
    config = training.make_config(model, "small", out=str(tmp), **{**TINY, **kw})
    return training.train(config, log=_quiet)


@pytest.mark.parametrize("model", ["sasrec", "difsr", "mqsa_ted", "man", "autocdsr", "autocdsr_plus"])
def test_train_writes_metrics_and_checkpoint(tmp_path: Path, model: str) -> None:
    metrics = _run(tmp_path, model, epochs=2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20"):
        assert 0.0 <= saved["test"][key] <= 1.0 and 0.0 <= saved["valid"][key] <= 1.0
    assert saved["best_epoch"] in (1, 2) and saved["train_seconds"] > 0
    assert saved["config"]["model"] == model and saved["config"]["model_options"]["hidden"] == 16
    assert saved["test"] == pytest.approx(metrics["test"])
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "curves.png").exists()
    assert not list(tmp_path.glob("*.tmp"))
    # `evaluate` reproduces the test metrics of the best state
    again = training.evaluate_checkpoint(tmp_path / "checkpoint.pt", log=_quiet)
    assert again["test"] == pytest.approx(saved["test"])


def test_training_learns_synthetic_structure(tmp_path: Path) -> None:
    metrics = _run(tmp_path, "difsr", epochs=20, lr=1e-2, dropout=0.1, attn_dropout=0.1)
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    # the next item depends on the last one's class: reading the sequence beats ranking by
    # popularity (0.30 here; 10 random items of 120 would hit 0.08). After 20 epochs seeds 0-5
    # reached 0.56-0.65 with torch's dropout and with fastattn's; 6 epochs (0.29-0.36) were too
    # few to tell learning from a lucky seed.
    assert metrics["valid"]["HR@10"] > _popularity_hr10() + 0.1


def _popularity_hr10() -> float:
    """Validation HR@10 of ranking unseen items by training popularity."""
    splits = split_dataset(training.load_dataset("synthetic"))
    counts = np.bincount(splits.train.items, minlength=121).astype(float)
    counts[0] = -1
    hits = 0
    for i, t in enumerate(splits.valid.target):
        c = counts.copy()
        c[splits.valid.history(i)] = -1
        hits += t in np.argsort(-c, kind="stable")[:10]
    return hits / len(splits.valid.target)


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    full = _run(tmp_path / "full", "difsr", epochs=3, seed=7)
    _run(tmp_path / "cut", "difsr", epochs=2, seed=7)  # "interrupted" after epoch 2
    config = training.resume_config(tmp_path / "cut", epochs=3)
    resumed = training.train(config, resume=True, log=_quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_track_test_reports_every_shorter_budget(tmp_path: Path) -> None:
    """With track_test, epoch n's history holds the test metrics a run of n epochs would report."""
    tracked = _run(tmp_path / "tracked", "sasrec", epochs=3, seed=5, track_test=True)
    short = _run(tmp_path / "short", "sasrec", epochs=2, seed=5)
    record = tracked["history"][1]
    assert record["best_epoch_so_far"] == short["best_epoch"]
    assert record["test_at_best"] == {k: v for k, v in short["test"].items() if k != "users"}
    assert tracked["history"][2]["test_at_best"] == {k: v for k, v in tracked["test"].items() if k != "users"}


def test_resume_refuses_changed_options(tmp_path: Path) -> None:
    _run(tmp_path, "sasrec", epochs=1)
    with pytest.raises(ValueError, match="--hidden 32 differs from the checkpointed run"):
        training.resume_config(tmp_path, hidden=32)
    with pytest.raises(ValueError, match="--model 'difsr' differs"):
        training.resume_config(tmp_path, model="difsr")
    with pytest.raises(ValueError, match="no checkpoint at"):
        training.resume_config(tmp_path / "nothing")


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path, "sasrec", epochs=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def torn_save(obj: Any, f: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        training.atomic_save({"x": 1}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "gru4rec"}, "--model must be one of"),
    ({"preset": "huge"}, "--preset must be one of"),
    ({"epochs": 0}, "--epochs must be a positive integer"),
    ({"lr": -1.0}, "--lr must be a positive number"),
    ({"data": "/no/such/file.txt"}, "no such file or directory"),
    ({"format": "csv"}, "--format must be s3rec, recbole or tsv"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "--device"),
    ({"backend": "fast"}, "--backend must be"),
    ({"bucket_batches": -1}, "--bucket-batches must be an integer >= 0"),
    ({"model": "sasrec", "fusion": "sum"}, "--fusion do\\(es\\) not apply to model 'sasrec'"),
    ({"hidden": 30, "heads": 4}, "divisible"),
    ({"fusion": "mean"}, "fusion"),
    ({"model": "sasrec", "loss": "hinge"}, "loss"),
])
def test_bad_options_raise_before_work(kwargs: dict[str, Any], message: str) -> None:
    model = kwargs.pop("model", "difsr")
    preset = kwargs.pop("preset", "small")
    with pytest.raises(ValueError, match=message):
        training.make_config(model, preset, **kwargs)


def test_cli_train_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--model", "sasrec", "--epochs", "1", "--out", str(tmp_path), "--hidden", "16",
            "--layers", "1", "--max-len", "10", "--no-progress", "--sampled-eval"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NDCG@10" in printed and "test" in printed
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert "sampled_NDCG@10" in saved["test"] and "NDCG@10" in saved["test"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--json"]) == 0
    assert '"test"' in capsys.readouterr().out
    # resume with more epochs continues from epoch 1
    assert main(["train", "--resume", "--out", str(tmp_path), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs_run"] == 2


def test_per_domain_metrics_in_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Cross-domain data: every split's metrics again per target domain, counted right, and printed."""
    metrics = _run(tmp_path, "man", epochs=1)
    data = training.load_dataset("synthetic")
    assert data.num_domains == 2
    target_domains = split_dataset(data).test.target_domain
    for d in range(2):
        assert metrics["test"][f"domain{d}_users"] == float((target_domains == d).sum())
    # the overall HR@10 is the users-weighted mean of the per-domain ones
    weighted = sum(metrics["test"][f"domain{d}_HR@10"] * metrics["test"][f"domain{d}_users"] for d in range(2))
    assert weighted / metrics["test"]["users"] == pytest.approx(metrics["test"]["HR@10"])
    training.print_metrics(metrics)
    printed = capsys.readouterr().out
    assert "test domain0" in printed and "valid domain1" in printed
    assert "domain0_HR@5" not in printed  # per-domain keys are rows, not columns


def test_autocdsr_logs_the_mean_acd_per_epoch(tmp_path: Path) -> None:
    metrics = _run(tmp_path, "autocdsr", epochs=2)
    for record in metrics["history"]:
        assert 0.0 < record["acd"] < 1.0 and record["rec"] > 0 and "w_acd" in record


def test_autocdsr_needs_domains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    single = replace(make_synthetic(SyntheticConfig(num_users=50, num_items=40, seed=1)), domains=None,
                     num_domains=1)
    monkeypatch.setattr(training, "load_dataset", lambda spec, fmt=None: single)
    with pytest.raises(ValueError, match="model 'autocdsr' needs the domain of every interaction"):
        _run(tmp_path, "autocdsr", epochs=1)


def test_resume_of_a_checkpoint_older_than_an_option(tmp_path: Path) -> None:
    """A checkpoint written before an option existed resumes with that option at its default."""
    _run(tmp_path, "sasrec", epochs=1)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["bucket_batches"]
    torch.save(state, path)
    config = training.resume_config(tmp_path, epochs=2, progress=False)
    assert config.bucket_batches == training.TrainConfig.bucket_batches
    assert len(training.train(config, resume=True, log=_quiet)["history"]) == 2


def test_synthetic_spec_is_accepted() -> None:
    config = training.make_config("sasrec", "small", data="synthetic:num_users=50,seed=1")
    assert config.out.endswith("sasrec-synthetic")


def test_cli_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model", "sasrec", "--aap-weight", "3", "--out", str(tmp_path)]) == 2
    assert "--aap-weight do(es) not apply to model 'sasrec'" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_checkpoint_of_the_earlier_model_options_layout_loads(tmp_path: Path) -> None:
    """Checkpoints written before the typed model config saved only the preset's and the given
    options in model_options: they evaluate and resume (the other options take their defaults)."""
    metrics = _run(tmp_path, "difsr", epochs=1)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["model_options"] = {"hidden": 16, "layers": 1, "heads": 2, "inner": 32, "dropout": 0.5,
                                        "attn_dropout": 0.5, "attribute_dim": 16, "aap_weight": 5.0, "fusion": "sum",
                                        "max_len": 12}
    torch.save(state, path)
    assert training.evaluate_checkpoint(path, log=_quiet)["test"] == pytest.approx(metrics["test"])
    config = training.resume_config(tmp_path, epochs=2, progress=False)
    assert config.model_config.attribute_dim == 16 and config.model_config.init_std == 0.02
    assert len(training.train(config, resume=True, log=_quiet)["history"]) == 2


def test_train_config_holds_the_typed_model_config() -> None:
    from fastattn.models import SASRecConfig
    from fastattn.train_config import config_from_dict

    config = training.make_config("sasrec", "small", hidden=16, heads=4, max_len=20, backend="torch")
    assert isinstance(config.model_config, SASRecConfig)
    assert (config.model_config.hidden, config.model_config.heads, config.model_config.max_len,
            config.model_config.backend, config.model_config.num_items) == (16, 4, 20, "torch", None)
    saved = config.to_dict()
    assert "model_config" not in saved and saved["model_options"]["hidden"] == 16
    assert config_from_dict(saved) == config
    with pytest.raises(ValueError, match="--hidden \\(16\\) must be divisible by --heads \\(3\\)"):
        training.make_config("sasrec", "small", hidden=16, heads=3)
