"""The model registry: a model is one module with a `ModelSpec`; the command line, presets and the
training loop take everything from it. A toy model registered here trains through the normal entry
point; every built-in model's presets build; no model imports the kernel package."""
from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

import fastattn.models
import fastattn.train as training
from fastattn.__main__ import main, model_flags
from fastattn.data.batch import EvalBatch, TrainBatch
from fastattn.models import MODELS, ModelSpec, SequentialRecommender, register, unregister
from fastattn.models.blocks import flat_targets, full_softmax_loss
from fastattn.models.config import catalog_field, check_config, option

SYN = "synthetic:num_users=60,num_items=40,num_attributes=4,num_tags=6,min_len=3,max_len=8,seed=1"
BUILTIN = ["sasrec", "bert4rec", "difsr", "mqsa_ted", "man", "autocdsr", "autocdsr_plus"]


# ---------------------------------------------------------------- a toy model, declared as a model module would
@dataclass(kw_only=True)
class ToyConfig:
    num_items: Optional[int] = catalog_field()
    hidden: int = option(8, "hidden size (item embedding and transformer width)")
    toy_scale: float = option(1.0, "scale of the user vector (the toy's own option)")
    max_len: int = 50

    def __post_init__(self) -> None:
        if not self.toy_scale > 0:
            raise ValueError(f"toy_scale must be > 0, got {self.toy_scale!r}")


class Toy(SequentialRecommender):
    """Predicts the next item from the last one: user vector = toy_scale · E[last item]."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = check_config(config, ToyConfig)
        assert config.num_items is not None
        self.item_embedding = torch.nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)

    def losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        rows = self.config.toy_scale * self.item_embedding(batch.items).reshape(-1, self.config.hidden)
        loss = full_softmax_loss(rows, flat_targets(batch), self.item_embedding.weight, "torch")
        return {"loss": loss}

    def user_vectors(self, batch: EvalBatch) -> torch.Tensor:
        return self.config.toy_scale * self.item_embedding(batch.items[:, -1])

    def item_table(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.item_embedding.weight, None


SPEC = ModelSpec(name="toy", config_cls=ToyConfig, model_cls=Toy,
                 presets={"small": {"hidden": 8, "toy_scale": 1.0, "lr": 1e-2, "batch_size": 64}})


@pytest.fixture
def toy() -> Iterator[ModelSpec]:
    register(SPEC)
    try:
        yield SPEC
    finally:
        unregister("toy")


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["train", "--help"]) == 0
    return capsys.readouterr().out


def test_help_lists_the_toy_model_and_its_flag(toy: ModelSpec, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    assert "toy" in text.split("--model {")[1].split("}")[0].split(",")
    assert "--toy-scale TOY_SCALE" in text and "scale of the user vector" in text
    assert text.count("[--hidden HIDDEN]") == 1  # a field several models declare is one flag
    flags = {flag.name: flag for flag in model_flags()}
    assert flags["toy-scale"].models == ("toy",) and flags["toy-scale"].type is float
    assert "toy" in flags["hidden"].models and "sasrec" in flags["hidden"].models


def test_toy_model_trains_through_the_command_line(toy: ModelSpec, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", "toy", "--data", SYN, "--epochs", "1", "--out", str(out),
                 "--toy-scale", "2", "--no-progress"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["model"] == "toy" and saved["config"]["model_options"]["toy_scale"] == 2.0
    assert saved["epochs_run"] == 1 and 0.0 <= saved["test"]["NDCG@10"] <= 1.0
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    # its own validation names the flag; another model's flag does not apply to it
    assert main(["train", "--model", "toy", "--data", SYN, "--out", str(tmp_path / "bad"), "--toy-scale", "0"]) == 2
    assert "--toy-scale must be > 0" in capsys.readouterr().err
    assert main(["train", "--model", "toy", "--data", SYN, "--out", str(tmp_path / "bad"), "--fusion", "sum"]) == 2
    assert "--fusion do(es) not apply to model 'toy'" in capsys.readouterr().err


def test_help_lists_all_builtin_models(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    assert text.split("--model {")[1].split("}")[0].split(",") == BUILTIN
    assert "--preset {small,paper}" in text
    for flag in ("--hidden", "--layers", "--heads", "--inner", "--dropout", "--attn-dropout", "--attribute-dim",
                 "--aap-weight", "--fusion", "--loss", "--long-query-len", "--alpha", "--tau", "--kd-weight",
                 "--num-prototypes", "--num-negatives", "--proto-weight", "--acd-mode", "--acd-weight",
                 "--pareto-vectors", "--pareto-region", "--num-ib-tokens", "--domain-layers", "--shared-layers",
                 "--mask-prob", "--max-len", "--lr", "--batch-size", "--epochs", "--format {s3rec,recbole,tsv}"):
        assert flag in text, flag


def test_register_refuses_a_taken_name(toy: ModelSpec) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(SPEC)
    assert register(SPEC, replace=True) is SPEC
    with pytest.raises(ValueError, match="presets must include 'small'"):
        ModelSpec(name="nopreset", config_cls=ToyConfig, model_cls=Toy)
    with pytest.raises(TypeError, match="SequentialRecommender"):
        ModelSpec(name="notamodel", config_cls=ToyConfig, model_cls=int, presets={"small": {}})


# ---------------------------------------------------------------- the built-in models' specs
def test_builtin_registry() -> None:
    assert list(MODELS) == BUILTIN
    for name in BUILTIN:
        module = __import__(f"fastattn.models.{name}", fromlist=["SPEC"])
        assert MODELS[name] is module.SPEC and MODELS[name].name == name


@pytest.mark.parametrize("name", BUILTIN)
def test_paper_preset_differs_from_small_and_builds(name: str) -> None:
    spec = MODELS[name]
    assert set(spec.presets) == {"small", "paper"} and spec.presets["paper"] != spec.presets["small"]
    data = training.load_dataset("synthetic:num_users=30,num_items=20,min_len=3,max_len=6,seed=2")
    for preset in spec.presets:
        config = training.make_config(name, preset)
        assert config.model_config.num_items is None  # the catalog comes with the data
        torch.manual_seed(0)
        model = training.build_model(config, data)
        assert model.config.num_items == data.num_items and isinstance(config.model_config, spec.config_cls)


def test_small_presets_are_the_recorded_recipe() -> None:
    """Results depend on them: the CPU recipe every small preset starts from, and each model's extras."""
    base = {"hidden": 64, "layers": 2, "heads": 2, "inner": 256, "dropout": 0.5, "attn_dropout": 0.5,
            "max_len": 50, "lr": 1e-3, "batch_size": 256}
    extras = {"sasrec": {"loss": "ce"}, "bert4rec": {"mask_prob": 0.2, "loss": "ce"},
              "difsr": {"attribute_dim": 16, "aap_weight": 5.0, "fusion": "sum"},
              "mqsa_ted": {"long_query_len": 3, "alpha": 0.5, "tau": 0.1, "kd_weight": 0.1},
              "man": {"num_prototypes": 8, "num_negatives": 100, "proto_weight": 0.1},
              "autocdsr": {"acd_mode": "pareto"},
              "autocdsr_plus": {"acd_mode": "pareto", "num_ib_tokens": 4, "domain_layers": 2, "shared_layers": 1}}
    for name in BUILTIN:
        assert dict(MODELS[name].presets["small"]) == {**base, **extras[name]}
    assert dict(MODELS["sasrec"].presets["paper"]) == {
        "hidden": 50, "layers": 2, "heads": 1, "inner": 50, "dropout": 0.5, "attn_dropout": 0.5, "max_len": 50,
        "lr": 1e-3, "batch_size": 128, "batch_unit": "sequences", "loss": "bce", "epochs": 200}
    assert dict(MODELS["difsr"].presets["paper"]) == {
        "hidden": 256, "layers": 4, "heads": 8, "inner": 256, "dropout": 0.5, "attn_dropout": 0.3,
        "attribute_dim": 64, "aap_weight": 10.0, "fusion": "sum", "max_len": 50, "lr": 1e-4, "batch_size": 2048,
        "epochs": 200}


def test_catalog_checks_name_what_the_data_lacks() -> None:
    data = training.load_dataset("synthetic:num_users=30,num_items=20,min_len=3,max_len=6,seed=2")
    assert MODELS["difsr"].catalog(data) == {"num_items": 20,
                                            "attribute_sizes": tuple(f.num_values for f in data.features)}
    assert MODELS["man"].catalog(data) == {"num_items": 20, "num_domains": data.num_domains}
    with pytest.raises(ValueError, match="model 'difsr' needs item attributes"):
        MODELS["difsr"].catalog(dataclasses.replace(data, features=()))
    with pytest.raises(ValueError, match="model 'autocdsr_plus' needs the domain of every interaction"):
        MODELS["autocdsr_plus"].catalog(dataclasses.replace(data, domains=None, num_domains=1))


def test_models_do_not_import_the_kernel_package() -> None:
    """Layering: models use fastattn.functional and fastattn.nn, never fastattn.ops (parsed imports)."""
    package = Path(fastattn.models.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "fastattn.models".split(".")[: len("fastattn.models".split(".")) - node.level + 1]
                prefix = ".".join(base) if node.level else ""
                module = ".".join(p for p in (prefix, node.module or "") if p)
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n == "fastattn.ops" or n.startswith("fastattn.ops.")]
    assert not offenders, offenders
