"""Readers for the public sequential-recommendation formats (see DESIGN.md §7).

- S3Rec text (`read_s3rec`): `user item item ...` per line + optional `<stem>_item2attributes.json`.
- RecBole atomic files (`read_recbole`): tab-separated `X.inter` / `X.item` with `name:type` headers.
- Cross-domain TSV (`read_crossdomain_tsv`): `user \\t items \\t domains` (Amazon Toy/Game) or
  `split \\t seq_id \\t items \\t domains` (KuaiRand, with a predefined train/valid/test split).

Files ending in `.gz` (or starting with the gzip magic bytes) are decompressed transparently;
a UTF-8 byte order mark at the start of a file is skipped and CRLF line ends are accepted.
Parsing is vectorized: each file is split into fields once and every integer column is converted
by one numpy call over the joined text; the per-line Python work is a `str.split` per line.
Malformed input raises ValueError("<file>, line <n>: <what is wrong>") with a 1-based line
number; a missing file raises FileNotFoundError naming it.

Ids that index a table (item ids kept as read, attribute ids in item2attributes.json) must be
roughly dense: the largest may be at most max(2**20, 16 x the number of distinct ids), since
every id up to the largest gets an embedding row; sparser ids are refused (naming the file and
line of the first one too large) instead of allocating terabytes. Likewise the 0-padded
(items x most values per item) feature matrix may hold at most max(2**24, 16 x the values) cells.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .dataset import ItemFeature, SequenceDataset

__all__ = ["FORMATS", "load_dataset", "read_crossdomain_tsv", "read_recbole", "read_s3rec"]

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = ("s3rec", "recbole", "tsv")
_INT_TOKEN = re.compile(r"[+-]?\d+\Z")
_INT64_LIMITS = (np.iinfo(np.int64).min, np.iinfo(np.int64).max)
# Id tables (embeddings, feature rows) have one row per id up to the largest: refuse ids sparser than
# this (see the module docstring) rather than allocate for them.
_ID_SLACK = 1 << 20
_ID_RATIO = 16
_CELL_SLACK = 1 << 24
_SPLIT_NAMES = {"training": 0, "train": 0, "evaluation": 1, "valid": 1, "validation": 1,
                "testing": 2, "test": 2}


# ----------------------------------------------------------------------------------------------
# low-level helpers
# ----------------------------------------------------------------------------------------------

def _error(path: PathLike, lineno: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {message}")


def _require_file(path: Path) -> None:
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path} is not a regular file")
        raise FileNotFoundError(2, "No such file or directory", str(path))


def _read_text(path: Path) -> str:
    """The decoded (UTF-8) text of `path`, gunzipped when compressed."""
    _require_file(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    try:
        return data.decode("utf-8-sig")  # -sig: skip a byte order mark some editors write
    except UnicodeDecodeError as exc:
        raise _error(path, data[:exc.start].count(b"\n") + 1, "not valid UTF-8 text") from None


def _read_lines(path: Path) -> list[str]:
    """All lines of `path` without line terminators (lines[i] is line i + 1)."""
    lines = _read_text(path).split("\n")
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
    if values.size and (values.min() == _INT64_LIMITS[0] or values.max() == _INT64_LIMITS[1]):
        return None  # possibly clamped overflow: let the exact path decide
    return values


def _parse_int_fields(fields: Sequence[str], linenos: Sequence[int], path: PathLike,
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
            if not _INT_TOKEN.match(token):
                raise _error(path, lineno, f"{what} {token!r} is not an integer")
    out = []
    for field, lineno in zip(fields, linenos):
        for token in field.split():
            value = int(token)
            if not _INT64_LIMITS[0] <= value <= _INT64_LIMITS[1]:
                raise _error(path, lineno, f"{what} {token!r} does not fit in 64 bits")
            out.append(value)
    return np.array(out, dtype=np.int64), counts


def _float_or_nan(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return float("nan")


def _line_of(flat_index: int, counts: np.ndarray, linenos: Sequence[int]) -> int:
    """The line number holding flat position `flat_index` of values parsed with `counts`."""
    row = int(np.searchsorted(np.cumsum(counts), flat_index, side="right"))
    return linenos[row]


def _check_dense_ids(ids: np.ndarray, path: PathLike, line_of: Callable[[int], int], what: str) -> None:
    """Refuse int64 ids (>= 1) whose largest is far beyond the number of distinct ids (see
    `_ID_SLACK`): ValueError naming `path` and the line (`line_of(flat index)`) of the first too large."""
    if ids.size == 0 or ids.max() <= _ID_SLACK:
        return
    distinct = len(np.unique(ids))
    bound = max(_ID_SLACK, _ID_RATIO * distinct)
    if ids.max() <= bound:
        return
    first = int(np.flatnonzero(ids > bound)[0])
    raise _error(path, line_of(first), f"{what} {ids[first]} is far larger than the {distinct:,} distinct "
                 f"{what}s (at most {bound:,} allowed: every id up to the largest gets a table row); "
                 f"renumber the {what}s densely from 1")


def _remap_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _remap_first_appearance(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques): codes[i] = index of tokens[i] among the distinct tokens in order of
    first appearance; uniques lists them in that order."""
    if tokens.size == 0:
        return np.zeros(0, dtype=np.int64), tokens.copy()
    uniques, first, inverse = np.unique(tokens, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[order] = np.arange(len(uniques), dtype=np.int64)
    return rank[inverse.reshape(-1)], uniques[order]


def _dataset_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".tsv", ".txt", ".inter"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _padded_rows(row: np.ndarray, values: np.ndarray, num_rows: int,
                 too_wide: Callable[[int, int], ValueError]) -> np.ndarray:
    """Scatter values[k] into row row[k] of a 0-padded (num_rows, A >= 1) matrix, keeping their order
    within each row (row must be sorted). A matrix over `_CELL_SLACK` cells and 16 x len(values)
    raises too_wide(row with the most values, its count) instead of being allocated."""
    if row.size == 0:
        return np.zeros((num_rows, 1), dtype=np.int64)
    counts = np.bincount(row, minlength=num_rows)
    widest = int(counts.argmax())
    if num_rows * int(counts[widest]) > max(_CELL_SLACK, _ID_RATIO * len(values)):
        raise too_wide(widest, int(counts[widest]))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(len(row), dtype=np.int64) - starts[row]
    out = np.zeros((num_rows, max(1, int(counts.max()))), dtype=np.int64)
    out[row, col] = values
    return out


def _body(lines: list[str], first: int) -> tuple[list[str], list[int]]:
    """Non-blank lines from index `first` on, with their 1-based line numbers."""
    linenos = [i + 1 for i in range(first, len(lines)) if lines[i].strip()]
    return [lines[i - 1] for i in linenos], linenos


def _split_columns(body: list[str], linenos: list[int], ncols: int, path: PathLike,
                   expected: str) -> list[tuple[str, ...]]:
    """Split tab-separated lines into `ncols` columns (ValueError naming the first bad line)."""
    rows = [line.split("\t") for line in body]
    for row, lineno in zip(rows, linenos):
        if len(row) != ncols:
            raise _error(path, lineno, f"expected {ncols} tab-separated columns ({expected}), got {len(row)}")
    if not rows:
        return [() for _ in range(ncols)]
    return list(zip(*rows))


def _csr_from_counts(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr


# ----------------------------------------------------------------------------------------------
# S3Rec
# ----------------------------------------------------------------------------------------------

def read_s3rec(path: PathLike, attributes_path: Optional[PathLike] | str = "auto") -> SequenceDataset:
    """Read an S3Rec sequence file: one user per line, `user item item ...` (whitespace separated,
    chronological, item ids from 1), kept in file order; item ids are kept as they are and
    num_items is the largest id.

    attributes_path: an `{"item_id": [attribute ids]}` JSON file giving one feature named
    "attributes" (items absent from it get none; entries for ids > num_items are ignored);
    "auto" (default) uses `<stem>_item2attributes.json` next to `path` if it exists; None: none.
    """
    path = Path(path)
    lines = _read_lines(path)
    body, linenos = _body(lines, 0)
    if not body:
        raise ValueError(f"{path}: no sequences")
    values, counts = _parse_int_fields(body, linenos, path, "id")
    short = np.flatnonzero(counts < 2)
    if short.size:
        raise _error(path, linenos[short[0]], "expected a user id followed by at least one item id")
    indptr_all = _csr_from_counts(counts)
    user_ids = values[indptr_all[:-1]]
    keep = np.ones(len(values), dtype=bool)
    keep[indptr_all[:-1]] = False
    items = values[keep]
    bad = np.flatnonzero(items < 1)
    if bad.size:
        raise _error(path, _line_of(int(bad[0]), counts - 1, linenos),
                     f"item id {items[bad[0]]} is not >= 1 (0 is the padding item)")
    _check_dense_ids(items, path, lambda i: _line_of(i, counts - 1, linenos), "item id")
    num_items = int(items.max())
    features: tuple[ItemFeature, ...] = ()
    if isinstance(attributes_path, str) and attributes_path == "auto":
        candidate = path.with_name(_dataset_name(path) + "_item2attributes.json")
        attributes_path = candidate if candidate.is_file() else None
    if attributes_path is not None:
        features = (_read_item2attributes(Path(attributes_path), num_items),)
    return SequenceDataset(name=_dataset_name(path), num_items=num_items, indptr=_csr_from_counts(counts - 1),
                           items=items, features=features, user_ids=user_ids)


def _json_line(text: str, key: str) -> int:
    """Best-effort line number of the JSON object key `key` in `text`."""
    pos = text.find(json.dumps(key))
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 1


def _read_item2attributes(path: Path, num_items: int, name: str = "attributes") -> ItemFeature:
    """The S3Rec `{"item": [attribute ids]}` JSON as an ItemFeature over items 1..num_items."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise _error(path, 1, "expected a JSON object {\"item id\": [attribute ids, ...]}")
    keys: list[str] = []  # the key of every kept attribute value (for line numbers)
    rows: list[int] = []
    attrs: list[int] = []
    for key, value in data.items():
        if not _INT_TOKEN.match(key.strip()):
            raise _error(path, _json_line(text, key), f"item id {key!r} is not an integer")
        item = int(key)
        if not isinstance(value, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in value):
            raise _error(path, _json_line(text, key), f"attributes of item {key} must be a list of integers")
        if not all(1 <= a <= _INT64_LIMITS[1] for a in value):
            raise _error(path, _json_line(text, key), f"attribute ids of item {key} must be >= 1 (0 is padding) "
                         "and fit in 64 bits")
        if 1 <= item <= num_items:
            keys.extend([key] * len(value))
            rows.extend([item] * len(value))
            attrs.extend(value)
        elif item < 1:
            raise _error(path, _json_line(text, key), f"item id {key} is not >= 1")
    if not attrs:
        raise ValueError(f"{path}: no attribute ids for any of the {num_items:,} items of the data set "
                         "(an empty attributes file?)")
    row = np.array(rows, dtype=np.int64)
    attr = np.array(attrs, dtype=np.int64)
    _check_dense_ids(attr, path, lambda i: _json_line(text, keys[i]), "attribute id")
    order = np.argsort(row, kind="stable")

    def too_wide(item: int, count: int) -> ValueError:
        return _error(path, _json_line(text, keys[rows.index(item)]), f"item {item} has {count:,} attribute ids; a "
                      f"({num_items + 1:,} x {count:,}) 0-padded attribute matrix is too large")

    values = _padded_rows(row[order], attr[order], num_items + 1, too_wide)
    return ItemFeature(name=name, values=values, num_values=int(values.max()) + 1)


# ----------------------------------------------------------------------------------------------
# RecBole atomic files
# ----------------------------------------------------------------------------------------------

def _recbole_header(line: str, path: Path) -> list[tuple[str, str]]:
    columns = []
    for field in line.split("\t"):
        name, sep, kind = field.strip().partition(":")
        if not sep or not name or not kind:
            raise _error(path, 1, f"header field {field!r} is not of the form name:type")
        columns.append((name, kind))
    if len({name for name, _ in columns}) != len(columns):
        raise _error(path, 1, "duplicate column names in the header")
    return columns


def _resolve_recbole(path: Path) -> tuple[Path, Optional[Path]]:
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if not inters:
            raise FileNotFoundError(2, "No .inter file in directory", str(path))
        if len(inters) > 1:
            raise ValueError(f"{path} holds several .inter files ({', '.join(p.name for p in inters)}); "
                             "pass the one to read")
        inter = inters[0]
    else:
        _require_file(path)
        inter = path
    stem = inter.name[: -len(".inter")] if inter.name.endswith(".inter") else inter.stem
    item = inter.with_name(stem + ".item")
    return inter, item if item.is_file() else None


def read_recbole(path: PathLike, feature_columns: Optional[Sequence[str]] = None, *,
                 user_field: str = "user_id", item_field: str = "item_id",
                 time_field: str = "timestamp") -> SequenceDataset:
    """Read RecBole atomic files: `path` is `X.inter` or a directory holding one `X.inter` (and
    optionally `X.item` next to it).

    Users and items are tokens (strings) remapped to contiguous ids in order of FIRST APPEARANCE
    in the .inter file (RecBole's own convention): users 0..U-1 (sequence order), items 1..N; the
    original tokens are kept in `user_ids` / `item_ids` (item_ids[0] = "[PAD]"). Each user's
    interactions are sorted by `time_field` (stable, so ties keep file order; file order when the
    column is absent). Other .inter columns are ignored.

    Item features come from `X.item`: every `token` (one value) and `token_seq` (space-separated,
    multi-valued) column except the item id, or only `feature_columns` when given (float columns
    are never features). Each feature has its own vocabulary: ids 1.. in order of first appearance
    in the .item file (over items of the catalog; .item rows for items absent from the .inter file
    are ignored, items absent from the .item file get no values).
    """
    inter_path, item_path = _resolve_recbole(Path(path))
    lines = _read_lines(inter_path)
    if not lines:
        raise ValueError(f"{inter_path}: empty file (expected a name:type header)")
    header = _recbole_header(lines[0], inter_path)
    names = [name for name, _ in header]
    for required in (user_field, item_field):
        if required not in names:
            raise _error(inter_path, 1, f"no {required!r} column (columns: {', '.join(names)})")
    body, linenos = _body(lines, 1)
    columns = _split_columns(body, linenos, len(header), inter_path, ", ".join(names))
    user_tok = np.array(columns[names.index(user_field)], dtype=str)
    item_tok = np.array(columns[names.index(item_field)], dtype=str)
    if user_tok.size == 0:
        raise ValueError(f"{inter_path}: no interactions")
    for tokens, what in ((user_tok, user_field), (item_tok, item_field)):
        empty = np.flatnonzero(np.char.str_len(tokens) == 0)
        if empty.size:
            raise _error(inter_path, linenos[empty[0]], f"empty {what}")
    users, user_ids = _remap_first_appearance(user_tok)
    items, item_vocab = _remap_first_appearance(item_tok)
    items += 1
    order = np.arange(len(users))
    if time_field in names:
        raw = columns[names.index(time_field)]
        try:
            times = np.array(raw, dtype=np.float64)
        except ValueError:
            times = None
        bad = range(len(raw)) if times is None else np.flatnonzero(~np.isfinite(times))
        for r in bad:  # the first token that is not a finite number (NaN would make the order arbitrary)
            if not np.isfinite(_float_or_nan(raw[r])):
                raise _error(inter_path, linenos[r], f"{time_field} {raw[r]!r} is not a finite number")
        order = np.argsort(times, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    num_items = len(item_vocab)
    item_ids = np.concatenate([np.array(["[PAD]"]), item_vocab])
    features: tuple[ItemFeature, ...] = ()
    if item_path is not None:
        features = _recbole_item_features(item_path, item_vocab, feature_columns, item_field)
    elif feature_columns:
        raise ValueError(f"feature_columns {list(feature_columns)} given but there is no .item file "
                         f"next to {inter_path}")
    return SequenceDataset(name=_dataset_name(inter_path), num_items=num_items,
                           indptr=_csr_from_counts(np.bincount(users, minlength=len(user_ids))),
                           items=items[order], features=features, user_ids=user_ids, item_ids=item_ids)


def _recbole_item_features(path: Path, item_vocab: np.ndarray, feature_columns: Optional[Sequence[str]],
                           item_field: str) -> tuple[ItemFeature, ...]:
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file (expected a name:type header)")
    header = _recbole_header(lines[0], path)
    names = [name for name, _ in header]
    kinds = dict(header)
    if item_field not in names:
        raise _error(path, 1, f"no {item_field!r} column (columns: {', '.join(names)})")
    if feature_columns is None:
        selected = [n for n, k in header if n != item_field and k in ("token", "token_seq")]
    else:
        selected = list(feature_columns)
        for name in selected:
            if name not in kinds:
                raise ValueError(f"{path}: no feature column {name!r} (columns: {', '.join(names)})")
            if kinds[name] not in ("token", "token_seq") or name == item_field:
                raise ValueError(f"{path}: column {name!r} has type {kinds[name]!r}; features must be "
                                 "token or token_seq columns other than the item id")
    body, linenos = _body(lines, 1)
    columns = _split_columns(body, linenos, len(header), path, ", ".join(names))
    if not selected:
        return ()
    if not body:
        raise ValueError(f"{path}: no item rows after the header")
    tokens = np.array(columns[names.index(item_field)], dtype=str)
    # catalog id of every .item row (0 = not in the catalog)
    vocab_order = np.argsort(item_vocab)
    pos = np.searchsorted(item_vocab[vocab_order], tokens)
    pos = np.minimum(pos, len(item_vocab) - 1)
    found = item_vocab[vocab_order][pos] == tokens
    row_item = np.where(found, vocab_order[pos] + 1, 0)
    known = np.flatnonzero(row_item > 0)
    dup = np.flatnonzero(np.bincount(row_item[known], minlength=len(item_vocab) + 1)[1:] > 1)
    if dup.size:
        item = dup[0] + 1
        rows = known[row_item[known] == item]
        raise _error(path, linenos[rows[1]], f"item {item_vocab[dup[0]]!r} listed again "
                     f"(first on line {linenos[rows[0]]})")
    features = []
    for name in selected:
        column = columns[names.index(name)]
        if kinds[name] == "token":
            per_row = [[column[r]] if column[r] else [] for r in known]
        else:
            per_row = [column[r].split() for r in known]
        counts = np.fromiter((len(v) for v in per_row), dtype=np.int64, count=len(per_row))
        if not counts.any():  # a column with no value for any catalog item carries nothing
            if feature_columns is not None:
                raise ValueError(f"{path}: column {name!r} has no value for any item of the data set")
            continue
        flat = np.array([t for v in per_row for t in v], dtype=str)
        codes, vocab = _remap_first_appearance(flat)
        rows = np.repeat(row_item[known], counts)
        order = np.argsort(rows, kind="stable")

        def too_wide(item: int, count: int, name: str = name) -> ValueError:
            line = linenos[known[int(np.flatnonzero(row_item[known] == item)[0])]]
            return _error(path, line, f"item {item_vocab[item - 1]!r} has {count:,} values in column {name!r}; "
                          f"a ({len(item_vocab) + 1:,} x {count:,}) 0-padded feature matrix is too large")

        values = _padded_rows(rows[order], codes[order] + 1, len(item_vocab) + 1, too_wide)
        features.append(ItemFeature(name=name, values=values, num_values=len(vocab) + 1))
    if not features:
        raise ValueError(f"{path}: no value in column{'s' if len(selected) > 1 else ''} "
                         f"{', '.join(selected)} for any item of the data set")
    return tuple(features)


# ----------------------------------------------------------------------------------------------
# cross-domain TSV (Amazon Toy/Game, KuaiRand)
# ----------------------------------------------------------------------------------------------

def read_crossdomain_tsv(path: PathLike, remap_items: Optional[bool] = None) -> SequenceDataset:
    """Read a cross-domain TSV (optionally gzipped). Two layouts, told apart by the header:

    - `user \\t items \\t domains`: one user per line, space-separated item ids and as many domain
      ids; item ids kept as they are (>= 1, num_items = the largest).
    - `split \\t seq_id \\t items \\t domains` (KuaiRand): split in {training, evaluation, testing}
      fills `SequenceDataset.split` (0/1/2); item ids are sparse, so they are remapped to 1..N in
      sorted order of the original id (`item_ids[k]` = original id of item k, item_ids[0] = -1).

    remap_items: force (True) or forbid (False) the item remapping; None = by layout as above.
    Domain values are always remapped to 0..D-1 in sorted order (`domain_ids[d]` = original value;
    the identity for Amazon's 0/1).
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header)")
    head = [h.strip() for h in lines[0].split("\t")]
    if head == ["user", "items", "domains"]:
        layout = "user"
    elif head == ["split", "seq_id", "items", "domains"]:
        layout = "split"
    else:
        raise _error(path, 1, f"unknown header {lines[0]!r}; expected 'user\\titems\\tdomains' or "
                     "'split\\tseq_id\\titems\\tdomains'")
    body, linenos = _body(lines, 1)
    if not body:
        raise ValueError(f"{path}: no sequences")
    columns = _split_columns(body, linenos, len(head), path, ", ".join(head))
    items, item_counts = _parse_int_fields(columns[-2], linenos, path, "item id")
    domains, domain_counts = _parse_int_fields(columns[-1], linenos, path, "domain id")
    mismatch = np.flatnonzero(item_counts != domain_counts)
    if mismatch.size:
        r = mismatch[0]
        raise _error(path, linenos[r], f"{item_counts[r]} items but {domain_counts[r]} domains")
    empty = np.flatnonzero(item_counts == 0)
    if empty.size:
        raise _error(path, linenos[empty[0]], "no items")
    ids, id_counts = _parse_int_fields(columns[-3], linenos, path, "user id" if layout == "user" else "seq_id")
    bad = np.flatnonzero(id_counts != 1)
    if bad.size:
        raise _error(path, linenos[bad[0]], f"expected one integer id, got {columns[-3][bad[0]]!r}")
    split = None
    if layout == "split":
        try:
            split = np.array([_SPLIT_NAMES[s.strip()] for s in columns[0]], dtype=np.int8)
        except KeyError:
            r = next(i for i, s in enumerate(columns[0]) if s.strip() not in _SPLIT_NAMES)
            raise _error(path, linenos[r], f"unknown split {columns[0][r]!r}; expected training, "
                         "evaluation or testing") from None
    if remap_items is None:
        remap_items = layout == "split"
    item_ids = None
    if remap_items:
        codes, uniques = _remap_sorted(items)
        items = codes + 1
        item_ids = np.concatenate([np.array([-1], dtype=np.int64), uniques])
        num_items = len(uniques)
    else:
        bad = np.flatnonzero(items < 1)
        if bad.size:
            raise _error(path, _line_of(int(bad[0]), item_counts, linenos),
                         f"item id {items[bad[0]]} is not >= 1 (0 is the padding item)")
        _check_dense_ids(items, path, lambda i: _line_of(i, item_counts, linenos), "item id")
        num_items = int(items.max())
    domain_codes, domain_ids = _remap_sorted(domains)
    return SequenceDataset(name=_dataset_name(path), num_items=num_items, indptr=_csr_from_counts(item_counts),
                           items=items, domains=domain_codes, num_domains=len(domain_ids), split=split,
                           user_ids=ids, item_ids=item_ids, domain_ids=domain_ids)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------

def _infer_format(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("*.inter")):
            return "recbole"
        raise ValueError(f"cannot infer the format of directory {path} (no .inter file); pass format=")
    _require_file(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix
    by_suffix = {".txt": "s3rec", ".inter": "recbole", ".tsv": "tsv"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    lines = _read_lines(path)
    first = lines[0] if lines else ""
    fields = [f.strip() for f in first.split("\t")]
    if fields in (["user", "items", "domains"], ["split", "seq_id", "items", "domains"]):
        return "tsv"
    if first and all(":" in f for f in fields):
        return "recbole"
    if first and all(_INT_TOKEN.match(t) for t in first.split()):
        return "s3rec"
    raise ValueError(f"cannot infer the format of {path}; pass format= (one of {', '.join(FORMATS)})")


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _spec_value(spec: str, key: str, value: str, default: object) -> object:
    """`value` parsed as the type of `default` (bool, int, float or a '-'-joined tuple of those);
    ValueError naming the option and the spec."""
    text = value.strip()
    if isinstance(default, tuple):
        parts = text.split("-")
        if len(parts) != len(default):
            raise ValueError(f"--data {spec!r}: {key} takes {len(default)} values joined by '-' "
                             f"(e.g. {'-'.join(map(str, default))}), got {value!r}")
        return tuple(_spec_value(spec, key, part, d) for part, d in zip(parts, default))
    if isinstance(default, bool):
        if text.lower() not in _BOOLS:
            raise ValueError(f"--data {spec!r}: {key} must be true or false (or yes/no, 1/0), got {value!r}")
        return _BOOLS[text.lower()]
    if isinstance(default, int):
        if not _INT_TOKEN.match(text):
            raise ValueError(f"--data {spec!r}: {key} must be an integer, got {value!r}")
        return int(text)
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise ValueError(f"--data {spec!r}: {key} must be a finite number, got {value!r}")
    return number


def _synthetic_from_spec(spec: str) -> SequenceDataset:
    from .synthetic import SyntheticConfig, make_synthetic

    config = SyntheticConfig()
    _, _, options = spec.partition(":")
    changes: dict[str, object] = {}
    known = [f.name for f in dataclass_fields(SyntheticConfig)]
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in known:
            what = f"unknown synthetic option {key!r}" if sep else f"synthetic option {option!r} is not key=value"
            raise ValueError(f"--data {spec!r}: {what}; the keys are {', '.join(known)}")
        if key in changes:
            raise ValueError(f"--data {spec!r}: synthetic option {key} is given twice")
        changes[key] = _spec_value(spec, key, value, getattr(config, key))
    try:
        config = replace(config, **changes)
    except ValueError as exc:
        raise ValueError(f"--data {spec!r}: {exc}") from None
    return make_synthetic(config)


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
    if format is None and (text == "synthetic" or text.startswith("synthetic:")):
        return _synthetic_from_spec(text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", text)
    fmt = format or _infer_format(path)
    if fmt == "s3rec":
        return read_s3rec(path)
    if fmt == "recbole":
        return read_recbole(path)
    return read_crossdomain_tsv(path)
