"""One training step (forward, loss, backward, optimizer step), eager or compiled (issue 16, item 3).

Compiled, `model.loss_terms(batch)` — the forward and the task losses — is one
`torch.compile(fullgraph=True)` graph; AOTAutograd compiles its backward, which the eager
`loss.backward()` runs (a backward call is not traced by design). The optimizer step stays eager:
the fused Adam that `fastattn.train` builds is already one multi-tensor kernel over all
parameters, and torch marks it `torch.compiler.disable` ("don't trace into fused optimizer"), so
compiling it would only add a graph break. `model.combine_loss_terms` runs eagerly after the
graph: a no-op for most models; AutoCDSR's Pareto weights there call `torch.autograd.grad`
through the compiled backward twice (retain_graph), which is why the step runs without donated
buffers (a donated buffer is freed after the first backward). The module itself is not wrapped, so
`model.state_dict()` keys (checkpoints) do not change.

In a data-parallel run (`fastattn.data_parallel`) the (compiled) `model.loss_terms` runs inside
a DistributedDataParallel wrapper (`wrap`; compiled inside the wrapper, since Dynamo cannot trace
DDP's own forward in one graph), and each step's loss is scaled by the process's share of the
batch (`scale`) before the backward.
"""
from __future__ import annotations

import contextlib

from typing import Any, Callable, Optional, Union

import torch
import torch._functorch.config

from .data.batch import TrainBatch
from .models.base import SequentialRecommender


Terms = Callable[[TrainBatch], dict[str, torch.Tensor]]  # a model's loss_terms, compiled or not
# the torch.compile backend of `train --compile`: Inductor (C++ on CPU, Triton on CUDA)
COMPILE_BACKEND = "inductor"


class TrainingStep:
    """step(batch) → the model's losses dict (tensors; "loss" detached after the update).

    model: a SequentialRecommender in training mode; optimizer: over its parameters;
    compile: compile the forward + loss (`torch.compile`, fullgraph=True; module docstring);
    backend: the torch.compile backend (a name or a callable; default COMPILE_BACKEND; "aot_eager"
    skips code generation, for tests).
    wrap: wrap(model, terms) → what the step calls instead of terms, the (compiled)
    `model.loss_terms` (the DistributedDataParallel wrapper of a data-parallel run,
    `fastattn.data_parallel.Group.wrap`).
    Batch size and sequence length may vary: Dynamo marks them dynamic after the first change,
    so at most two compiles.
    """

    def __init__(self, model: SequentialRecommender, optimizer: torch.optim.Optimizer, compile: bool = False,
                 backend: Optional[Union[str, Callable[..., Any]]] = None,
                 wrap: Optional[Callable[[SequentialRecommender, Terms], Terms]] = None) -> None:
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.model, self.optimizer, self.compiled = model, optimizer, compile
        self._terms: Terms = model.loss_terms
        if compile:
            backend = COMPILE_BACKEND if backend is None else backend
            self._terms = torch.compile(model.loss_terms, fullgraph=True, backend=backend)
        if wrap is not None:
            self._terms = wrap(model, self._terms)

    def forward_terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The (compiled) forward + task losses, with their autograd graph."""
        with self._compile_config():
            return self._terms(batch)

    def __call__(self, batch: TrainBatch, scale: Optional[float] = None) -> dict[str, torch.Tensor]:
        """One step on `batch`; `scale` multiplies the loss that is differentiated (not the
        returned one): a data-parallel process's W·n_r/N (`fastattn.data_parallel`)."""
        # the config covers the backward too: with dynamic shapes AOTAutograd compiles the backward
        # lazily, at its first call
        with self._compile_config():
            losses = self.model.combine_loss_terms(self._terms(batch))
            self.optimizer.zero_grad(set_to_none=True)
            (losses["loss"] if scale is None else losses["loss"] * scale).backward()
            self.optimizer.step()
        return losses

    def _compile_config(self) -> contextlib.AbstractContextManager[Any]:
        if not self.compiled:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(donated_buffer=False)
