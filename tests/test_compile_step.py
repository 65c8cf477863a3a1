"""A compiled training step (issue 16, item 3): `fastattn.training_step.TrainingStep(compile=True)`.

For every model (AutoCDSR and AutoCDSR+ with fixed and with Pareto weights): the forward + task
losses trace into one graph (no graph break), and one compiled step — forward, loss, backward,
optimizer step — gives the eager loss, parameter gradients and updated parameters. The fused Adam
that `train` builds is used. Most cases compile with backend="aot_eager" (the AOTAutograd trace
without Inductor's slow code generation); one model's full step runs Inductor (C++ on CPU).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch._dynamo

import fastattn.train as training
import fastattn.training_step as training_step
from fastattn.training_step import TrainingStep
from cpp_required import cpp_tests_mark

from test_compile import _batch, _close
from test_no_host_sync import BUILDERS, COMMON, PARETO
from test_train import TINY, tiny_synthetic  # noqa: F401  (the fixture: 'synthetic' is a small data set)

pytestmark = cpp_tests_mark()
MODELS = {**BUILDERS, **PARETO}


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two equal models (float32, dropout 0, backend="auto": the C++ kernels on CPU)."""
    torch.manual_seed(0)
    model = MODELS[name]({**COMMON, "backend": "auto", "dropout": 0.0, "attn_dropout": 0.0}).train()
    return model, copy.deepcopy(model)


def _adam(model: torch.nn.Module) -> torch.optim.Adam:
    """The fused Adam that fastattn.train builds, with eps=1e-3 instead of 1e-8: Adam's update
    lr·m/(√v + eps) amplifies a difference δ in a near-zero gradient by up to lr/eps, so with the
    default eps a 1e-9 rounding difference between eager and Inductor gradients (well inside their
    1e-5 tolerance) moved a bias entry by 3e-5 after one step. eps=1e-3 bounds that factor to 10,
    and the updated parameters are then held to the same 1e-5 as everything else."""
    return torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3, fused=True)


def _step_results(step: TrainingStep, batch: Any) -> tuple[list[torch.Tensor], list[Any], list[torch.Tensor]]:
    torch.manual_seed(5)  # sampled negatives: the same draws in both runs
    losses = step(batch)
    model = step.model
    return ([v.detach() for v in losses.values()], [p.grad.clone() if p.grad is not None else None
                                                    for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()])


def _check_step(name: str, backend: str) -> None:
    eager_model, compiled_model = _pair(name)
    batch = _batch(3, 6)
    torch._dynamo.reset()
    assert torch._dynamo.explain(compiled_model.loss_terms)(batch).graph_break_count == 0
    eager = TrainingStep(eager_model, _adam(eager_model))
    compiled = TrainingStep(compiled_model, _adam(compiled_model), compile=True, backend=backend)
    for _ in range(2):  # the second step also checks Adam's state (moments, step count) after one update
        want, got = _step_results(eager, batch), _step_results(compiled, batch)
        for w_list, g_list in zip(want, got):
            assert len(w_list) == len(g_list)
            for w, g in zip(w_list, g_list):
                assert (g is None) == (w is None) and (w is None or _close(g, w))
    assert [k for k in compiled_model.state_dict()] == [k for k in eager_model.state_dict()]


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_step_equals_eager(name: str) -> None:
    _check_step(name, "aot_eager")


def test_compiled_step_inductor() -> None:
    """Inductor (C++ code generation on CPU) compiles a full step of one model."""
    _check_step("autocdsr_pareto", "inductor")


def test_no_recompile_across_steps() -> None:
    """Three steps of one shape compile the forward + loss once: Pareto's step counter and
    Python-float weights stay outside the graph, so they add no guard; the (fused) optimizer step
    is not compiled."""
    model = MODELS["autocdsr_pareto"]({**COMMON, "backend": "auto", "dropout": 0.0, "attn_dropout": 0.0}).train()
    graphs: list[torch.fx.GraphModule] = []

    def count(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = TrainingStep(model, _adam(model), compile=True, backend=count)
    step(_batch(3, 6))
    first = len(graphs)
    assert first == 1  # the forward + loss graph
    for _ in range(2):
        step(_batch(3, 6))
    assert len(graphs) == first


def test_training_step_rejects_bad_compile() -> None:
    model = MODELS["sasrec_ce"](COMMON)
    with pytest.raises(ValueError, match="compile"):
        TrainingStep(model, _adam(model), compile="yes")  # type: ignore[arg-type]


def test_train_compile_gives_the_eager_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny `train --compile` run (aot_eager: the Inductor step is checked above) equals the eager
    run up to float rounding, and its checkpoint resumes without --compile."""
    monkeypatch.setattr(training_step, "COMPILE_BACKEND", "aot_eager")
    runs = []
    for compile in (False, True):
        config = training.make_config("autocdsr", "small", out=str(tmp_path / str(compile)), epochs=1,
                                      compile=compile, **{**TINY, "dropout": 0.0, "attn_dropout": 0.0})
        runs.append(training.train(config, log=lambda *_: None))
    eager, compiled = runs
    assert eager["test"].keys() == compiled["test"].keys()
    for key, value in eager["test"].items():
        assert compiled["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert compiled["history"][0]["loss"] == pytest.approx(eager["history"][0]["loss"], rel=1e-4)
    config = training.resume_config(tmp_path / "True", epochs=2, compile=False)
    resumed = training.train(config, resume=True, log=lambda *_: None)
    assert len(resumed["history"]) == 2
