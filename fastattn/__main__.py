"""Command line of fastattn.

- `python -m fastattn train --model NAME --data {synthetic|PATH} ...`: train and evaluate a
  recommender (full ranking, leave-one-out); writes DIR/metrics.json and DIR/checkpoint.pt. The
  models, their flags and presets come from `fastattn.models.MODELS` (`--help` lists them).
  `torchrun --nproc-per-node N -m fastattn train ...` trains data-parallel (`fastattn.data_parallel`).
- `python -m fastattn evaluate --checkpoint DIR/checkpoint.pt`: valid/test metrics of a saved run.
- `python -m fastattn demo`: the fused attention against the float64 reference. On a machine
  without CUDA the Triton kernels run in Triton's interpreter (slow, exact), so the demo shows
  the GPU code path is correct anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from dataclasses import dataclass
import types
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

from ._environment import configure_cli_process

if TYPE_CHECKING:  # torch is imported inside the commands, after the Triton interpreter switch
    import torch


def _demo(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        # Must be set before triton is imported: kernels then run in the interpreter on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import fastattn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    b, h, length, dk, da = args.batch, args.heads, args.length, args.head_dim, args.attr_dim

    def rnd(lq: int, d: int) -> torch.Tensor:
        return torch.randn(b, h, lq, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    q, k, v = rnd(length, dk), rnd(length, dk), rnd(length, dk)
    pos_q, pos_k, attr_q, attr_k = rnd(length, dk), rnd(length, dk), rnd(length, da), rnd(length, da)
    pad = torch.zeros(b, length, dtype=torch.bool, device=device)
    pad[:, : length // 4] = True  # left padding, as in recommender batches
    leaves = [q, k, v, pos_q, attr_q, pos_k, attr_k]
    print(f"decoupled attention: B={b} H={h} L={length} item/position dim {dk}, attribute dim {da}, "
          f"causal, left padding, {dtype} on {device}"
          + (" (Triton interpreter)" if device.type == "cpu" else ""))

    fused = ["triton"] if device.type == "cuda" else ["triton", "cpp"]
    ref, ref_grads, t_ref = _run(fastattn, leaves, pad, "torch", torch.float64, device)
    names = ["out", "dq", "dk", "dv", "d pos_q", "d attr_q", "d pos_k", "d attr_k"]
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    ok = True
    for backend in fused:
        out, grads, elapsed = _run(fastattn, leaves, pad, backend, dtype, device)
        worst = max((got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
                    for got, want in zip([out, *grads], [ref, *ref_grads]))
        label = backend + (" (interpreter)" if backend == "triton" and device.type == "cpu" else "")
        print(f"  {label:22s} fwd+bwd {elapsed * 1e3:8.1f} ms   max relative error vs float64 over "
              f"{', '.join(names)}: {worst:.2e}")
        ok &= worst <= tol
    print(f"  {'torch reference (fp64)':22s} fwd+bwd {t_ref * 1e3:8.1f} ms")
    if device.type == "cpu":
        print("  (the interpreter is a correctness tool; speed is measured in bench/)")
    print("OK: the fused kernels match the reference" if ok else f"FAILED: an error exceeds {tol:.0e}")
    return 0 if ok else 1


def _run(fastattn: ModuleType, leaves: list[torch.Tensor], pad: torch.Tensor, backend: str, dtype: torch.dtype,
         device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """One forward + backward on copies of `leaves` cast to `dtype`: (out, grads, seconds)."""
    import torch

    xs = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    start = time.perf_counter()
    out = fastattn.dif_attention(xs[0], xs[1], xs[2], xs[3:5], xs[5:7], causal=True,
                                 key_padding_mask=pad, backend=backend)
    out.float().square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.detach(), [x.grad for x in xs], time.perf_counter() - start


_LOOP_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("epochs", int, "maximum epochs"),
    ("batch-size", int, "training batch size, in --batch-unit"),
    ("batch-unit", str, "targets (next-item predictions, counted as RecBole counts samples) | sequences | "
                        "prefixes (every history prefix its own row, loss at its end: RecBole's samples exactly)"),
    ("bucket-batches", int, "with --batch-unit targets|prefixes: sort rows by length within pools of N batches "
                            "(less padding); 0 = batches of random users"),
    ("eval-batch-size", int, "evaluation batch size"),
    ("lr", float, "Adam learning rate"),
    ("weight-decay", float, "Adam weight decay"),
    ("max-len", int, "longest history read (most recent items)"),
    ("patience", int, "early stopping: epochs without a better validation NDCG@10"),
    ("seed", int, "random seed (data order, initialisation, dropout)"),
    ("device", str, "cpu, cuda or cuda:N"),
    ("backend", str, "kernel backend: auto | triton | cpp | torch"),
    ("out", str, "output directory (default runs/MODEL-DATA)"),
    ("item-shards", int, "under torchrun: split the item table by rows over this many processes (1 = "
                         "replicated; otherwise the number of processes; sasrec with --loss ce)"),
)


@dataclass(frozen=True)
class ModelFlag:
    """One generated --flag: a hyper-parameter field of the models in `models` (same name, type and help)."""

    field: str
    type: Callable[[str], Any]
    help: str
    models: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.field.replace("_", "-")


def _flag_type(config_cls: type, field: dataclasses.Field) -> Callable[[str], Any]:
    """The argparse type of a config field from its annotation: int, float or str (Optional[X] → X)."""
    kind = typing.get_type_hints(config_cls)[field.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if len(args) == 1 else kind
    if kind not in (int, float, str):
        raise TypeError(f"{config_cls.__name__}.{field.name}: a flag needs an int, float or str field, got {kind}")
    return kind


def model_flags() -> list[ModelFlag]:
    """The flags of every registered model's hyper-parameters (`fastattn.models.config.option`
    fields), each name once (a field several models share is one flag), in registry order."""
    from .models.config import flag_fields
    from .models.registry import MODELS

    flags: dict[str, ModelFlag] = {}
    for spec in MODELS.values():
        for f in flag_fields(spec.config_cls):
            kind, seen = _flag_type(spec.config_cls, f), flags.get(f.name)
            if seen is None:
                flags[f.name] = ModelFlag(f.name, kind, f.metadata["help"], (spec.name,))
            elif seen.type is not kind:
                raise TypeError(f"models {seen.models[0]!r} and {spec.name!r} declare {f.name} with different "
                                f"types ({seen.type.__name__}, {kind.__name__}): one flag cannot take both")
            else:
                flags[f.name] = dataclasses.replace(seen, models=seen.models + (spec.name,))
    return list(flags.values())


def _fail(message: str) -> int:
    """Print `message` as one line "error: ..." on stderr; the exit code of a bad option (2)."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def _guarded(command: Callable[[], int], backend: Optional[str]) -> int:
    """Run `command`; the failures a user can fix become one line naming the flag, exit code 2:
    ValueError (options, data, --out, checkpoints, divergence: the message names the flag), a
    backend that cannot run (--backend) and running out of memory (the size flags)."""
    from . import train as training
    from ._dispatch import BackendUnavailable

    try:
        return command()
    except ValueError as exc:
        return _fail(str(exc))
    except BackendUnavailable as exc:
        return _fail(f"--backend{' ' + backend if backend else ''}: {exc}")
    except (RuntimeError, MemoryError) as exc:
        message = training.out_of_memory_message(exc)
        if message is None:
            raise
        return _fail(message)


def _train(args: argparse.Namespace) -> int:
    from . import train as training
    from .data_parallel import group_from_env

    overrides = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in _LOOP_FLAGS}
    overrides.update({flag.field: getattr(args, flag.field) for flag in model_flags()})
    overrides.update(data=args.data, format=args.format)
    overrides["sampled_eval"] = True if args.sampled_eval else None
    overrides["progress"] = False if args.no_progress else None
    overrides["track_test"] = True if args.track_test else None
    overrides["compile"] = True if args.compile else None

    def run() -> int:
        if args.resume:
            if args.out is None:
                raise ValueError("--resume needs --out DIR (the directory of the interrupted run)")
            given = {k: v for k, v in overrides.items() if v is not None and k != "out"}
            if args.model is not None:
                given["model"] = args.model
            if args.preset is not None:
                given["preset"] = args.preset
            config = training.resume_config(args.out, **given)
        else:
            config = training.make_config(args.model or "difsr", args.preset or "small",
                                          **{k: v for k, v in overrides.items() if v is not None})
        metrics = training.train(config, resume=args.resume)
        if group_from_env().main:  # under torchrun every process has the metrics: rank 0 prints them
            training.print_metrics(metrics)
        return 0

    return _guarded(run, args.backend)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from . import train as training

    def run() -> int:
        metrics = training.evaluate_checkpoint(args.checkpoint, device=args.device,
                                               sampled=True if args.sampled_eval else None,
                                               exclude_history=not args.keep_history)
        training.print_metrics(metrics)
        if args.json:
            print(json.dumps({k: metrics[k] for k in ("valid", "test", "best_epoch")}, indent=2))
        return 0

    return _guarded(run, None)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage of some 40 flags would bury the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_train_flags(train: argparse.ArgumentParser) -> None:
    """--model, --preset, the loop's flags and every model's hyper-parameter flags (from the registry)."""
    from .data import FORMATS
    from .models.registry import MODELS, preset_names

    train.add_argument("--model", choices=list(MODELS), default=None, help="default difsr")
    train.add_argument("--data", default=None,
                       help="'synthetic' (default, no files needed) or a path: S3Rec .txt, RecBole "
                       ".inter / directory, or cross-domain .tsv(.gz)")
    train.add_argument("--format", choices=list(FORMATS), default=None,
                       help="file format (default: from the file name)")
    train.add_argument("--preset", choices=preset_names(), default=None,
                       help="small (default): the CPU recipe; paper: the published settings")
    for name, kind, text in _LOOP_FLAGS:
        train.add_argument("--" + name, type=kind, default=None, help=text)
    group = train.add_argument_group("model options (default: the preset's; [models] they apply to)")
    every = tuple(MODELS)
    for flag in model_flags():
        where = "" if flag.models == every else f" [{', '.join(flag.models)}]"
        group.add_argument("--" + flag.name, dest=flag.field, type=flag.type, default=None,
                           help=flag.help.replace("%", "%%") + where)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="python -m fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fused attention forward/backward vs the float64 reference")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--heads", type=int, default=2)
    demo.add_argument("--length", type=int, default=50)
    demo.add_argument("--head-dim", type=int, default=32)
    demo.add_argument("--attr-dim", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    train = sub.add_parser("train", help="train and evaluate a recommender",
                           description="Train a model, evaluate full ranking (HR/NDCG@5,10,20) on the "
                           "leave-one-out validation split every epoch, test the best epoch.")
    if argv[:1] == ["train"]:  # the registry imports the models (and Triton): only for this command
        _add_train_flags(train)
    train.add_argument("--sampled-eval", action="store_true",
                       help="also report the sampled protocol (100 negatives), keys prefixed sampled_")
    train.add_argument("--track-test", action="store_true",
                       help="score the test split whenever validation improves and keep it in each epoch's "
                       "history: the result of any shorter epoch budget, for comparisons")
    train.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the training step (forward + loss, optimizer step; Inductor)")
    train.set_defaults(run=_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a saved training checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="DIR/checkpoint.pt of a training run")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--sampled-eval", action="store_true")
    evaluate.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    evaluate.add_argument("--keep-history", action="store_true",
                          help="rank the user's past items too (RecBole's protocol for sequential models)")
    evaluate.set_defaults(run=_evaluate)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option, already reported on one line (2)
        return exc.code if isinstance(exc.code, int) else 0
    return args.run(args)


if __name__ == "__main__":
    configure_cli_process()  # before anything loads torch (and its OpenMP): fastattn/_environment.py
    sys.exit(main())
