"""Text parsing shared by the readers (fastattn/data/readers.py describes the formats).

Errors name the file and a 1-based line: ValueError("<file>, line <n>: <what is wrong>").
Parsing is vectorized: a file is split into fields once and every integer column is converted by
one numpy call over the joined text; the per-line Python work is a `str.split` per line.

The id-density limits that the readers' docstring (readers.py) states are ID_SLACK, ID_RATIO and
CELL_SLACK: they keep a table of one row per id up to the largest from being allocated for ids
that are too sparse.
"""
from __future__ import annotations

import gzip
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
INT_TOKEN = re.compile(r"[+-]?\d+\Z")
INT64_LIMITS = (np.iinfo(np.int64).min, np.iinfo(np.int64).max)
# Id tables (embeddings, feature rows) have one row per id up to the largest: refuse ids sparser than
# this (see the module docstring) rather than allocate for them.
ID_SLACK = 1 << 20
ID_RATIO = 16
CELL_SLACK = 1 << 24


def error_at(path: PathLike, lineno: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {message}")


def require_file(path: Path) -> None:
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path} is not a regular file")
        raise FileNotFoundError(2, "No such file or directory", str(path))


def read_text(path: Path) -> str:
    """The decoded (UTF-8) text of `path`, gunzipped when compressed."""
    require_file(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    try:
        return data.decode("utf-8-sig")  # -sig: skip a byte order mark some editors write
    except UnicodeDecodeError as exc:
        raise error_at(path, data[:exc.start].count(b"\n") + 1, "not valid UTF-8 text") from None


def read_lines(path: Path) -> list[str]:
    """All lines of `path` without line terminators (lines[i] is line i + 1)."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _fast_ints(text: str) -> Optional[np.ndarray]:
    """Whitespace-separated integers in `text` as int64 in one C call, or None if that failed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = np.fromstring(text, dtype=np.int64, sep=" ")  # text mode: not deprecated
    except (ValueError, DeprecationWarning, AttributeError, TypeError):
        return None
    if values.size and (values.min() == INT64_LIMITS[0] or values.max() == INT64_LIMITS[1]):
        return None  # possibly clamped overflow: let the exact path decide
    return values


def parse_int_fields(fields: Sequence[str], linenos: Sequence[int], path: PathLike,
                     what: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse whitespace-separated integer lists.

    fields[i] (from line linenos[i]) holds counts[i] integers. Returns (values (sum(counts),) int64,
    counts (len(fields),) int64). A token that is not an integer raises ValueError naming its line.
    """
    counts = np.fromiter((len(f.split()) for f in fields), dtype=np.int64, count=len(fields))
    values = _fast_ints(" ".join(fields))
    if values is not None and len(values) == int(counts.sum()):
        return values, counts
    # Slow path: find the offending token (or convert exactly when the fast path was unsure).
    for field, lineno in zip(fields, linenos):
        for token in field.split():
            if not INT_TOKEN.match(token):
                raise error_at(path, lineno, f"{what} {token!r} is not an integer")
    out = []
    for field, lineno in zip(fields, linenos):
        for token in field.split():
            value = int(token)
            if not INT64_LIMITS[0] <= value <= INT64_LIMITS[1]:
                raise error_at(path, lineno, f"{what} {token!r} does not fit in 64 bits")
            out.append(value)
    return np.array(out, dtype=np.int64), counts


def float_or_nan(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return float("nan")


def line_of(flat_index: int, counts: np.ndarray, linenos: Sequence[int]) -> int:
    """The line number holding flat position `flat_index` of values parsed with `counts`."""
    row = int(np.searchsorted(np.cumsum(counts), flat_index, side="right"))
    return linenos[row]


def check_dense_ids(ids: np.ndarray, path: PathLike, line_at: Callable[[int], int], what: str) -> None:
    """Refuse int64 ids (>= 1) whose largest is far beyond the number of distinct ids (see
    `ID_SLACK`): ValueError naming `path` and the line (`line_at(flat index)`) of the first too large."""
    if ids.size == 0 or ids.max() <= ID_SLACK:
        return
    distinct = len(np.unique(ids))
    bound = max(ID_SLACK, ID_RATIO * distinct)
    if ids.max() <= bound:
        return
    first = int(np.flatnonzero(ids > bound)[0])
    raise error_at(path, line_at(first), f"{what} {ids[first]} is far larger than the {distinct:,} distinct "
                   f"{what}s (at most {bound:,} allowed: every id up to the largest gets a table row); "
                   f"renumber the {what}s densely from 1")


def remap_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques): codes[i] = rank of values[i] among the sorted distinct values.

    Uses a dense lookup table when the value range is small (O(n), much faster than a sort),
    np.unique otherwise.
    """
    if values.size == 0:
        return values.copy(), values.copy()
    lo, hi = int(values.min()), int(values.max())
    if hi - lo <= 4 * values.size + (1 << 20):
        shifted = values - lo
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[shifted] = True
        lookup = np.cumsum(present, dtype=np.int64) - 1
        return lookup[shifted], np.flatnonzero(present).astype(np.int64) + lo
    uniques, codes = np.unique(values, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), uniques


def remap_first_appearance(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques): codes[i] = index of tokens[i] among the distinct tokens in order of
    first appearance; uniques lists them in that order."""
    if tokens.size == 0:
        return np.zeros(0, dtype=np.int64), tokens.copy()
    uniques, first, inverse = np.unique(tokens, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[order] = np.arange(len(uniques), dtype=np.int64)
    return rank[inverse.reshape(-1)], uniques[order]


def dataset_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".tsv", ".txt", ".inter"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def padded_rows(row: np.ndarray, values: np.ndarray, num_rows: int,
                too_wide: Callable[[int, int], ValueError]) -> np.ndarray:
    """Scatter values[k] into row row[k] of a 0-padded (num_rows, A >= 1) matrix, keeping their order
    within each row (row must be sorted). A matrix over `CELL_SLACK` cells and 16 x len(values)
    raises too_wide(row with the most values, its count) instead of being allocated."""
    if row.size == 0:
        return np.zeros((num_rows, 1), dtype=np.int64)
    counts = np.bincount(row, minlength=num_rows)
    widest = int(counts.argmax())
    if num_rows * int(counts[widest]) > max(CELL_SLACK, ID_RATIO * len(values)):
        raise too_wide(widest, int(counts[widest]))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(len(row), dtype=np.int64) - starts[row]
    out = np.zeros((num_rows, max(1, int(counts.max()))), dtype=np.int64)
    out[row, col] = values
    return out


def body_lines(lines: list[str], first: int) -> tuple[list[str], list[int]]:
    """Non-blank lines from index `first` on, with their 1-based line numbers."""
    linenos = [i + 1 for i in range(first, len(lines)) if lines[i].strip()]
    return [lines[i - 1] for i in linenos], linenos


def split_columns(body: list[str], linenos: list[int], ncols: int, path: PathLike,
                  expected: str) -> list[tuple[str, ...]]:
    """Split tab-separated lines into `ncols` columns (ValueError naming the first bad line)."""
    rows = [line.split("\t") for line in body]
    for row, lineno in zip(rows, linenos):
        if len(row) != ncols:
            raise error_at(path, lineno, f"expected {ncols} tab-separated columns ({expected}), got {len(row)}")
    if not rows:
        return [() for _ in range(ncols)]
    return list(zip(*rows))


def csr_from_counts(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr
