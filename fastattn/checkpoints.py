"""Checkpoints and the output directory of a training run (`fastattn.train` writes through them).

- Layout: a checkpoint (DIR/checkpoint.pt, `CHECKPOINT_FORMAT`) holds only tensors, numbers,
  strings and plain containers, checked key by key (`_CHECKPOINT_KEYS`, `_checkpoint_problem`)
  and read back with torch.load(weights_only=True) (`load_checkpoint`), so a foreign file cannot
  run code; `_load_weights` and `_restore` put its state back into a model and optimizer.
- Data identity: the checkpoint records its data (`data_identity`: spec, format, size, content
  fingerprint); `_check_data` refuses a resume on other data and warns for `evaluate`.
- Output directory: DIR/.lock (`LOCK`) is held with flock for the whole run (`claim_out`), so a
  second run on the same DIR stops at once.
- Atomic writes: every output goes through a uniquely named temporary file, fsync and a rename
  (`_atomic_write`, `atomic_save`, `atomic_write_json`); `_writing` turns an OSError while
  writing into a ValueError naming --out.
- Saving and resuming: `save_checkpoint` writes the loop's state after an epoch;
  `check_same_run` refuses a resume whose options differ from the checkpoint's.

Also the small value checks shared with the training modules (`_is_int`, `_is_number`,
`_is_synthetic`, `_one_line`). Nothing here imports them at run time (`TrainConfig` appears in
annotations only).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; the output directory is not locked
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # annotations only: the training modules import this one, not the other way round
    from .data import SequenceDataset
    from .models.base import SequentialRecommender
    from .train_config import TrainConfig

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_synthetic(data: str) -> bool:
    """`--data synthetic` or `synthetic:key=value,...` (SyntheticConfig overrides)."""
    return data == "synthetic" or data.startswith("synthetic:")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tensors_by_name(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def _is_best(value: object) -> bool:
    return (isinstance(value, dict) and _is_int(value.get("epoch")) and _is_number(value.get("metric"))
            and isinstance(value.get("valid"), dict) and isinstance(value.get("test", {}), dict)
            and (value.get("state") is None or _tensors_by_name(value.get("state"))))


def _is_data_identity(value: object) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("spec"), str)
            and isinstance(value.get("fingerprint"), str)
            and (value.get("bytes") is None or _is_int(value.get("bytes"))))


# A format-1 checkpoint: each key and the check of its value. Only tensors, numbers, strings,
# None and plain containers, which is what torch.load(weights_only=True) accepts: a file from
# elsewhere cannot run code when it is loaded. "data" (the data's identity) is absent from
# checkpoints written before it was recorded.
_CHECKPOINT_KEYS: dict[str, Callable[[Any], bool]] = {
    "format": lambda v: v == CHECKPOINT_FORMAT,
    "config": lambda v: isinstance(v, dict),
    "epoch": lambda v: _is_int(v) and v >= 0,
    "model": _tensors_by_name,
    "optimizer": lambda v: (isinstance(v, dict) and isinstance(v.get("state"), dict)
                            and isinstance(v.get("param_groups"), list)),
    "best": _is_best,
    "history": lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
    "train_seconds": _is_number,
    "rng": lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1,
    "cuda_rng": lambda v: v is None or (isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v)),
    "dataset": lambda v: isinstance(v, str),
    "data": _is_data_identity,
}
_OPTIONAL_KEYS = frozenset({"data"})


def _checkpoint_problem(state: object, field_types: Mapping[str, tuple[type, ...]]) -> Optional[str]:
    """None when `state` has the layout of a format-1 checkpoint, else what is wrong with it;
    its saved options must be keys of `field_types` with values of those types."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    if state.get("format") != CHECKPOINT_FORMAT:
        return f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}"
    missing = sorted(set(_CHECKPOINT_KEYS) - _OPTIONAL_KEYS - set(state))
    extra = sorted(map(str, set(state) - set(_CHECKPOINT_KEYS)))
    if missing or extra:
        return ", ".join(f"{what} keys {keys}" for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
    wrong = [k for k, check in _CHECKPOINT_KEYS.items() if k in state and not check(state[k])]
    if wrong:
        return f"malformed {', '.join(wrong)}"
    for key, value in state["config"].items():
        kinds = field_types.get(key)
        if kinds is None:
            return f"config option {key!r} is not an option of this version"
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return f"config option {key!r} = {value!r} has the wrong type"
    return None


def load_checkpoint(path: Path, flag: str, field_types: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """A training checkpoint's dict, read with torch.load(weights_only=True) (a checkpoint holds
    only tensors, numbers, strings and plain containers, so a foreign file cannot run code);
    ValueError naming `flag` and the file, on one line, when it is missing, a directory,
    unreadable, truncated or corrupt, holds other Python objects, or lacks the layout of
    `_CHECKPOINT_KEYS` (saved options: the keys and value types of `field_types`, TrainConfig's saved
    form, which `fastattn.train_config.load_checkpoint` passes). Checkpoints of earlier versions load as
    they are (they hold the same kinds of values); one without the data's identity resumes with a warning."""
    if not path.exists():
        raise ValueError(f"{flag}: no checkpoint at {path} (no such file)")
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{flag}: {path} is an empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a bad file (zip, EOF, unpickling)
        if "Unsupported global" in str(exc):
            raise ValueError(f"{flag}: {path} is not a fastattn training checkpoint: it holds Python objects "
                             "other than tensors and plain values (refused: loading them could run code)") from None
        # torch's weights_only message is a page of advice; its last part says what failed
        reason = str(exc)
        if "Weights only" in reason:
            reason = reason.rpartition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        raise ValueError(f"{flag}: {path} cannot be read as a checkpoint (truncated or corrupt?): "
                         f"{_one_line(ValueError(reason), 160)}") from None
    problem = _checkpoint_problem(state, field_types)
    if problem is not None:
        raise ValueError(f"{flag}: {path} is not a fastattn training checkpoint ({problem})")
    return state


def _load_weights(model: SequentialRecommender, weights: dict[str, torch.Tensor], path: Path, flag: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # missing or unexpected keys, shapes of another catalog
        raise ValueError(f"{flag}: the weights in {path} do not fit this model and data ({_one_line(exc)})") from None


def data_identity(config: TrainConfig, dataset: SequenceDataset) -> dict[str, Any]:
    """What a checkpoint records of its data: the `--data` spec, `--format`, the size in bytes
    (of the file, or of the files of a directory; None for synthetic data) and
    `SequenceDataset.fingerprint()`, a digest of the content that decides whether two data agree."""
    size: Optional[int] = None
    if not _is_synthetic(config.data):
        path = Path(config.data)
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()) if p.is_file())
    return {"spec": config.data, "format": config.format, "bytes": size, "fingerprint": dataset.fingerprint()}


def _check_data(state: dict[str, Any], identity: dict[str, Any], path: Path, warn: Callable[[str], None],
                refuse: bool) -> None:
    """The data loaded now against the checkpoint's: a different fingerprint is refused (`refuse`:
    a resumed run would mix two data sets) or warned about (evaluate); a checkpoint written before
    the data was recorded gets a warning that it cannot be checked."""
    saved = state.get("data")
    if saved is None:
        warn(f"{path} predates data fingerprints: cannot check that --data {identity['spec']!r} is the data "
             "it was trained on")
        return
    if saved["fingerprint"] == identity["fingerprint"]:
        return
    sizes = "" if saved.get("bytes") is None or identity["bytes"] is None else \
        f", {saved['bytes']:,} bytes then, {identity['bytes']:,} now"
    message = (f"--data {identity['spec']!r} is not the data {path} was trained on (content fingerprint "
               f"{saved['fingerprint']} then, {identity['fingerprint']} now{sizes})")
    if refuse:
        raise ValueError(message + "; resume on that data, or train on this one with another --out")
    warn(message + "; the metrics are for the data as it is now")


LOCK = ".lock"


@contextlib.contextmanager
def claim_out(out: Path) -> Iterator[None]:
    """Make `out` (--out) if needed, check that files can be created in it, and hold an exclusive
    lock on out/.lock for the block (fcntl.flock: the OS drops it when the process dies), so two
    runs never write one directory; ValueError naming --out otherwise. A directory made here is
    removed again when the block fails before anything but the lock was written into it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
        handle = open(out / LOCK, "a+")
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create or write this directory ({exc.strerror or exc})") from None
    try:
        _lock(handle, out)
        yield
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            out.rmdir()
        raise
    finally:
        handle.close()


def _lock(handle: Any, out: Path) -> None:
    if fcntl is None:  # no flock (Windows): runs sharing a directory are not detected
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise ValueError(f"--out {out}: another run is writing to this directory ({holder} holds {out / LOCK}); "
                         "wait for it to finish or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"run of pid {os.getpid()}\n")
    handle.flush()


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """`write(file)` into a uniquely named temporary file beside `path` (tempfile.mkstemp, so
    concurrent writers never share one), fsync, then rename over `path`: readers see the old or
    the new file, never a torn one. The temporary file is removed when anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: never a torn checkpoint."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: Path) -> None:
    """json.dump (indented) through a temporary file and a rename, as `atomic_save`."""
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), "w")


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OSError while writing the outputs (disk full, directory removed) as a ValueError naming --out."""
    try:
        yield
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write the run's files ({_one_line(exc, 160)})") from None


def _restore(state: dict[str, Any], model: SequentialRecommender, optimizer: torch.optim.Optimizer,
             device: torch.device, path: Path) -> None:
    """The checkpoint's weights (its best state too: it is loaded at the end), optimizer and RNG
    state; ValueError naming --resume and the file when they do not fit this model."""
    if state["best"]["state"] is not None:
        _load_weights(model, state["best"]["state"], path, "--resume")
    _load_weights(model, state["model"], path, "--resume")
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"--resume: the optimizer or RNG state in {path} does not fit this model "
                         f"({_one_line(exc)})") from None


def check_same_run(saved: Mapping[str, Any], now: Mapping[str, Any], mutable: frozenset[str]) -> None:
    """ValueError naming --resume and every option (other than `mutable` ones) whose value `now`
    differs from the checkpoint's (`saved`): a resumed run must be the run it continues."""
    diffs = [k for k, v in now.items() if k not in mutable and saved.get(k) != v]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diffs)
        raise ValueError(f"--resume: options differ from the checkpointed run ({detail})")


def save_checkpoint(path: Path, config: dict[str, Any], progress: Mapping[str, Any], model: SequentialRecommender,
                    optimizer: torch.optim.Optimizer, device: torch.device, dataset: str,
                    identity: dict[str, Any], states: Optional[tuple[dict[str, Any], dict[str, Any]]] = None
                    ) -> None:
    """Write a format-1 checkpoint atomically: the saved `config` (TrainConfig.to_dict), `progress`
    (epoch, best, history, train_seconds), the model's and optimizer's state, torch's RNG state
    (and CUDA's on a GPU), the data set's summary line and identity (`data_identity`). `states`:
    the (model, optimizer) state dicts, when they were gathered already (an item-sharded run)."""
    model_state, optimizer_state = states if states is not None else (model.state_dict(), optimizer.state_dict())
    atomic_save({"format": CHECKPOINT_FORMAT, "config": config, "epoch": progress["epoch"],
                 "model": model_state, "optimizer": optimizer_state, "best": progress["best"],
                 "history": progress["history"], "train_seconds": progress["train_seconds"],
                 "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                 "dataset": dataset, "data": identity}, path)
