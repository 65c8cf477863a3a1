"""Readers for the public sequential-recommendation formats (see docs/training.md, 'Data formats'),
and `load_dataset`, which picks one by spec or file.

- S3Rec text (`read_s3rec`, s3rec.py): `user item item ...` per line + optional
  `<stem>_item2attributes.json`.
- RecBole atomic files (`read_recbole`, recbole_atomic.py): tab-separated `X.inter` / `X.item`
  with `name:type` headers.
- Cross-domain TSV (`read_crossdomain_tsv`, crossdomain_tsv.py): `user \\t items \\t domains`
  (Amazon Toy/Game) or `split \\t seq_id \\t items \\t domains` (KuaiRand, with a predefined
  train/valid/test split).
- "synthetic[:key=value,...]" (synthetic_spec.py): `make_synthetic` with `SyntheticConfig` overrides.

Files ending in `.gz` (or starting with the gzip magic bytes) are decompressed transparently;
a UTF-8 byte order mark at the start of a file is skipped and CRLF line ends are accepted.
Parsing is vectorized (_parsing.py). Malformed input raises ValueError("<file>, line <n>: <what
is wrong>") with a 1-based line number; a missing file raises FileNotFoundError naming it.

Ids that index a table (item ids kept as read, attribute ids in item2attributes.json) must be
roughly dense: the largest may be at most max(2**20, 16 x the number of distinct ids), since
every id up to the largest gets an embedding row; sparser ids are refused (naming the file and
line of the first one too large) instead of allocating terabytes. Likewise the 0-padded
(items x most values per item) feature matrix may hold at most max(2**24, 16 x the values) cells.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ._parsing import INT_TOKEN, PathLike, read_lines, require_file
from .crossdomain_tsv import read_crossdomain_tsv
from .dataset import SequenceDataset
from .recbole_atomic import read_recbole
from .s3rec import read_s3rec
from .synthetic_spec import is_synthetic_spec, synthetic_from_spec

__all__ = ["FORMATS", "load_dataset", "read_crossdomain_tsv", "read_recbole", "read_s3rec"]

FORMATS = ("s3rec", "recbole", "tsv")


def _infer_format(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("*.inter")):
            return "recbole"
        raise ValueError(f"cannot infer the format of directory {path} (no .inter file); pass format=")
    require_file(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix
    by_suffix = {".txt": "s3rec", ".inter": "recbole", ".tsv": "tsv"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    lines = read_lines(path)
    first = lines[0] if lines else ""
    fields = [f.strip() for f in first.split("\t")]
    if fields in (["user", "items", "domains"], ["split", "seq_id", "items", "domains"]):
        return "tsv"
    if first and all(":" in f for f in fields):
        return "recbole"
    if first and all(INT_TOKEN.match(t) for t in first.split()):
        return "s3rec"
    raise ValueError(f"cannot infer the format of {path}; pass format= (one of {', '.join(FORMATS)})")


def load_dataset(spec: PathLike, format: Optional[str] = None) -> SequenceDataset:
    """Load a data set by spec.

    spec: "synthetic" (the default `make_synthetic()`), "synthetic:key=value,..." (SyntheticConfig
    overrides, e.g. "synthetic:num_users=500,seed=3,allow_repeats=true"; tuples as "1-3"; booleans
    as true/false, yes/no or 1/0, any case; a bad key or value raises ValueError naming it and the
    spec), or a path.
    format: "s3rec", "recbole" or "tsv"; None infers it from the suffix (.txt → s3rec, .inter or a
    directory holding one → recbole, .tsv / .tsv.gz → tsv), else from the first line.
    """
    text = os.fspath(spec)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)} (or None to infer)")
    if format is None and is_synthetic_spec(text):
        return synthetic_from_spec(text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", text)
    fmt = format or _infer_format(path)
    if fmt == "s3rec":
        return read_s3rec(path)
    if fmt == "recbole":
        return read_recbole(path)
    return read_crossdomain_tsv(path)
