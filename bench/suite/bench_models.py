"""One training step of each fastattn model, on fastattn's kernels and on the torch reference path.

Cases (`test_model_train_step`): model × provider × sequence length L. One step is
``zero_grad(set_to_none=True)``, ``model.losses(batch)["loss"].backward()``, one Adam step
(fused, as `fastattn.train` uses), then `synchronize` — forward, loss, backward and update of the
whole model, in training mode with the "small" preset's dropout (0.5). The batch is built once,
outside the timed region, and every round trains on it again.

- Models: sasrec, difsr, mqsa_ted, man, autocdsr, autocdsr_plus, each built by
  `fastattn.train.make_config(name, "small", max_len=L, backend=...)` + `build_model` (the
  training command's own registry: hidden 64, 2 layers, 2 heads, inner 256; DIF-SR fusion "sum";
  AutoCDSR(+) acd_mode "pareto"), then the registry's `prepare` hook (MQSA-TED:
  `model.set_teacher(train_split)`, the TED teacher of the training split).
- Providers: "fastattn" = backend="auto" (the fused C++ kernels on CPU, Triton on CUDA) and
  "torch" = backend="torch" (attention by the reference that materializes the L×L scores; the
  full-catalog cross-entropy by its chunked torch implementation, which materializes one chunk
  of N×V logits at a time, never all of them). The config field `backend` reaches every fastattn
  call of every model: each `DIFAttention` layer, the cross / long-query / prototype attentions
  of MQSA-TED and MAN (`dif_attention(..., backend=config.backend)`), and every
  `full_item_cross_entropy` (CE losses and MQSA-TED's TED distillation). What neither provider
  changes is plain torch in both: embeddings, Linear, LayerNorm, feed-forward and the Adam
  step; MAN's sampled softmax over its 100 negatives; DIF-SR's attribute-prediction (BCE) head;
  MQSA-TED's long-query averaging; AutoCDSR(+)'s Pareto weight solve (its two extra
  `autograd.grad` passes for the task gradients do go back through the chosen kernels).
  DIF-SR's "concat"/"gate" fusions would ignore `backend` (they always run a torch path that
  materializes the scores), but the benchmark uses the preset's "sum".
- Data: the synthetic data set (`load_dataset("synthetic:...")`, two domains, item features
  "category" and "tags", one domain id per interaction), split leave-one-out; the batch is
  the first B training sequences (unit "sequences": B counts sequences, not targets),
  left padded to L. Sequence lengths are uniform in [4, 2L + 3], so about half of the rows
  are full (cut to their last L items) and the rest padded; every position that has a next
  item is a target. V = the catalog size (num_items).

Sizes (env FASTATTN_BENCH_SIZE, see bench/suite/_common.py): full L ∈ {20, 50, 200}, B = 256,
V = 12,101 (Amazon Beauty's catalog, as bench_integrations.py), 2,000 users; quick L ∈ {20, 50},
B = 64, V = 500, 512 users; tiny L = 8, B = 8, V = 100, 64 users (every case runs, in seconds).
Users beyond the batch only feed MQSA-TED's teacher. Full is sized for a GPU or many cores: on one
CPU thread a MAN step at L=200 alone takes most of a minute (its sampled softmax gathers an
N×100×D block of negatives; three encoders and 16-head prototype attention), so the file takes
(estimated) well over half an hour there.

CPU threads (`test_model_train_step`, full and quick sizes): each case runs with 1 and with 2
torch threads (`torch.set_num_threads`, restored afterwards), since which side wins can move
with the thread count; a count above the usable cores skips with the reason, and on CUDA only
the 1-thread case runs (the host threads barely matter there). Groups "model NAME L=L threads=T"
on CPU ("model NAME L=L" on CUDA); extra_info "threads"; the op of a T > 1 case is
"train_step_NAME_Tthreads", so the plots against L keep one line per thread count.

Timing: one untimed warm-up step (Adam's state is created there, Triton compiles there), then
the peak memory of one step (extra_info peak_mem_mb: the step's working memory above what the
model, optimizer state and batch hold; bench/suite/_common.py: CUDA allocator counters, CPU profiler
allocation events), then pytest-benchmark's calibrated rounds — or 3 fixed rounds of one call
(`benchmark.pedantic`) when a step takes over a second. Group "model NAME L=L", so the two
providers of a model share a table.

Compiled vs eager (`test_model_train_step_compiled`, issue 16): the same step through
`fastattn.training_step.TrainingStep` — "eager" as above with backend="auto", "compiled" with
`compile=True` (the forward + loss one `torch.compile(fullgraph=True)` graph, Inductor: C++ code
on CPU, Triton on CUDA; the fused Adam stays eager, see training_step.py) — dropout 0.5 as in
training. The warm-up call compiles (tens of seconds per model on a 2-core CPU; not timed).
Lengths: L ∈ {50, 200} at full and quick size, L = 8 at tiny. Group "model NAME L=L compile";
the reference of the group is "eager", so its speed-up column is eager time / compiled time.

Run: python -m pytest bench/suite/bench_models.py --benchmark-only   (see bench/README.md)
     FASTATTN_BENCH_SIZE=quick python -m pytest bench/suite/bench_models.py --benchmark-only -k "threads=1"
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from _common import synchronize, sweep, time_training_step, training_step
from fastattn.data import SequenceDataset, TrainBatch, load_dataset, split_dataset, train_batches
from fastattn.train import MODELS, build_model, make_config
from fastattn.training_step import TrainingStep

MODEL_NAMES = ("sasrec", "difsr", "mqsa_ted", "man", "autocdsr", "autocdsr_plus")
PROVIDERS = {"fastattn": "auto", "torch": "torch"}  # provider label → the models' `backend`
LENGTHS = sweep(full=(20, 50, 200), quick=(20, 50), tiny=(8,))
THREADS = sweep(full=(1, 2), quick=(1, 2), tiny=(1,))  # CPU torch threads of test_model_train_step
BATCH = sweep(full=(256,), quick=(64,), tiny=(8,))[0]
ITEMS = sweep(full=(12_101,), quick=(500,), tiny=(100,))[0]
USERS = sweep(full=(2_000,), quick=(512,), tiny=(64,))[0]  # >= BATCH; the rest feed MQSA-TED's teacher
SEED = 0
COMPILE_PROVIDERS = {"eager": False, "compiled": True}  # provider label → TrainingStep(compile=...)
COMPILE_LENGTHS = sweep(full=(50, 200), quick=(50, 200), tiny=(8,))


@functools.lru_cache(maxsize=None)
def _training_data(length: int) -> tuple[SequenceDataset, SequenceDataset, TrainBatch]:
    """(data set, its leave-one-out training split, one (B, L) TrainBatch on CPU), per L.

    Lengths up to 2L + 3: after leave-one-out (-2 items) and the input/target shift (-1) a row
    exceeds L in about half the cases, so the batch is L wide with near certainty; checked.
    """
    spec = (f"synthetic:num_users={USERS},num_items={ITEMS},num_domains=2,min_len=4,"
            f"max_len={2 * length + 3},seed={SEED}")
    dataset = load_dataset(spec)
    train = split_dataset(dataset).train
    batch = next(train_batches(train, BATCH, length, shuffle=False, unit="sequences"))
    if tuple(batch.items.shape) != (BATCH, length):
        raise RuntimeError(f"the benchmark batch is {tuple(batch.items.shape)}, expected (B, L) = "
                           f"({BATCH}, {length}): no sequence among the first {BATCH} reaches L (change SEED)")
    return dataset, train, batch


def _model(name: str, backend: str, length: int, dataset: SequenceDataset, train: SequenceDataset,
           device: torch.device) -> torch.nn.Module:
    """The training command's model `name` ("small" preset, max_len = L) on `device`, ready to train."""
    config = make_config(name, "small", max_len=length, backend=backend)
    torch.manual_seed(SEED)  # the same initial weights for both providers
    model = build_model(config, dataset).to(device).train()
    prepare = MODELS[name].prepare
    if prepare is not None:  # MQSA-TED: the TED teacher of the training split
        prepare(model, train)
    return model


@contextlib.contextmanager
def torch_threads(threads: int, device: torch.device) -> Iterator[None]:
    """Run the block with `threads` torch CPU threads (skips what the machine or device cannot
    take), then restore the previous count."""
    if device.type != "cpu" and threads != 1:
        pytest.skip(f"threads={threads}: the thread sweep is a CPU one (on {device.type} only threads=1 runs)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > usable:
        pytest.skip(f"threads={threads} needs {threads} usable cores, this process has {usable}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", THREADS, ids=lambda v: f"threads={v}")
@pytest.mark.parametrize("length", LENGTHS, ids=lambda v: f"L={v}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_train_step(benchmark: BenchmarkFixture, bench_device: torch.device, name: str, provider: str,
                          length: int, threads: int) -> None:
    with torch_threads(threads, bench_device):
        dataset, train, batch = _training_data(length)
        model = _model(name, PROVIDERS[provider], length, dataset, train, bench_device)
        batch = batch.to(bench_device)
        # fused Adam, as the training command (one kernel over all parameters on CPU and CUDA)
        step = training_step(model, lambda: model.losses(batch)["loss"], bench_device,
                             fused_adam=bench_device.type in ("cpu", "cuda"))
        cpu = bench_device.type == "cpu"
        time_training_step(
            benchmark, step, bench_device, f"model {name} L={length}" + (f" threads={threads}" if cpu else ""),
            {"op": f"train_step_{name}" + (f"_{threads}threads" if threads != 1 else ""), "provider": provider,
             "L": length, "V": dataset.num_items, "B": BATCH, "threads": threads if cpu else None})


@pytest.mark.parametrize("length", COMPILE_LENGTHS, ids=lambda v: f"L={v}")
@pytest.mark.parametrize("provider", list(COMPILE_PROVIDERS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_train_step_compiled(benchmark: BenchmarkFixture, bench_device: torch.device, name: str, provider: str,
                                   length: int) -> None:
    dataset, train, batch = _training_data(length)
    model = _model(name, "auto", length, dataset, train, bench_device)
    batch = batch.to(bench_device)
    torch._dynamo.reset()  # each case compiles its own model from scratch (no cache hits across cases)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=bench_device.type in ("cpu", "cuda"))
    train_step = TrainingStep(model, optimizer, compile=COMPILE_PROVIDERS[provider])

    def step() -> None:
        train_step(batch)
        synchronize(bench_device)
    time_training_step(benchmark, step, bench_device, f"model {name} L={length} compile",
          {"op": f"train_step_{name}", "provider": provider, "L": length, "V": dataset.num_items, "B": BATCH})
