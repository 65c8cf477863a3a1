"""RecBole atomic files: tab-separated `X.inter` (interactions) and optional `X.item` (item
features) with `name:type` headers (docs/training.md, 'Data formats')."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ._parsing import (PathLike, body_lines, csr_from_counts, dataset_name, float_or_nan, error_at, padded_rows,
                       read_lines, remap_first_appearance, require_file, split_columns)
from .dataset import ItemFeature, SequenceDataset

__all__ = ["read_recbole"]


def _recbole_header(line: str, path: Path) -> list[tuple[str, str]]:
    columns = []
    for field in line.split("\t"):
        name, sep, kind = field.strip().partition(":")
        if not sep or not name or not kind:
            raise error_at(path, 1, f"header field {field!r} is not of the form name:type")
        columns.append((name, kind))
    if len({name for name, _ in columns}) != len(columns):
        raise error_at(path, 1, "duplicate column names in the header")
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
        require_file(path)
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
    lines = read_lines(inter_path)
    header = _table_header(inter_path, lines, (user_field, item_field))
    names = [name for name, _ in header]
    body, linenos = body_lines(lines, 1)
    columns = split_columns(body, linenos, len(header), inter_path, ", ".join(names))
    user_tok = np.array(columns[names.index(user_field)], dtype=str)
    item_tok = np.array(columns[names.index(item_field)], dtype=str)
    if user_tok.size == 0:
        raise ValueError(f"{inter_path}: no interactions")
    for tokens, what in ((user_tok, user_field), (item_tok, item_field)):
        empty = np.flatnonzero(np.char.str_len(tokens) == 0)
        if empty.size:
            raise error_at(inter_path, linenos[empty[0]], f"empty {what}")
    users, user_ids = remap_first_appearance(user_tok)
    items, item_vocab = remap_first_appearance(item_tok)
    items += 1
    order = np.arange(len(users))
    if time_field in names:
        order = _time_order(columns[names.index(time_field)], linenos, inter_path, time_field)
    order = order[np.argsort(users[order], kind="stable")]
    item_ids = np.concatenate([np.array(["[PAD]"]), item_vocab])
    features: tuple[ItemFeature, ...] = ()
    if item_path is not None:
        features = _recbole_item_features(item_path, item_vocab, feature_columns, item_field)
    elif feature_columns:
        raise ValueError(f"feature_columns {list(feature_columns)} given but there is no .item file "
                         f"next to {inter_path}")
    return SequenceDataset(name=dataset_name(inter_path), num_items=len(item_vocab),
                           indptr=csr_from_counts(np.bincount(users, minlength=len(user_ids))),
                           items=items[order], features=features, user_ids=user_ids, item_ids=item_ids)


def _table_header(path: Path, lines: list[str], required: Sequence[str]) -> list[tuple[str, str]]:
    """The (name, type) columns of a RecBole file's header; ValueError when it has none or lacks a
    required column."""
    if not lines:
        raise ValueError(f"{path}: empty file (expected a name:type header)")
    header = _recbole_header(lines[0], path)
    names = [name for name, _ in header]
    for name in required:
        if name not in names:
            raise error_at(path, 1, f"no {name!r} column (columns: {', '.join(names)})")
    return header


def _time_order(raw: Sequence[str], linenos: list[int], path: Path, time_field: str) -> np.ndarray:
    """The (n,) int64 stable argsort of the timestamps raw (one per row); ValueError naming the first
    that is not a finite number (NaN would make the order arbitrary)."""
    try:
        times = np.array(raw, dtype=np.float64)
    except ValueError:
        times = None
    bad = range(len(raw)) if times is None else np.flatnonzero(~np.isfinite(times))
    for r in bad:
        if not np.isfinite(float_or_nan(raw[r])):
            raise error_at(path, linenos[r], f"{time_field} {raw[r]!r} is not a finite number")
    return np.argsort(times, kind="stable")


def _selected_columns(path: Path, header: list[tuple[str, str]], feature_columns: Optional[Sequence[str]],
                      item_field: str) -> list[str]:
    """The .item columns that become features: every token / token_seq column but the item id, or
    feature_columns checked to be such columns."""
    if feature_columns is None:
        return [n for n, k in header if n != item_field and k in ("token", "token_seq")]
    kinds = dict(header)
    for name in feature_columns:
        if name not in kinds:
            raise ValueError(f"{path}: no feature column {name!r} (columns: {', '.join(kinds)})")
        if kinds[name] not in ("token", "token_seq") or name == item_field:
            raise ValueError(f"{path}: column {name!r} has type {kinds[name]!r}; features must be "
                             "token or token_seq columns other than the item id")
    return list(feature_columns)


def _catalog_rows(path: Path, tokens: np.ndarray, item_vocab: np.ndarray, linenos: list[int]) -> np.ndarray:
    """The catalog id (1..N) of every .item row, 0 for rows of items not in the catalog; ValueError
    naming the line of an item listed twice."""
    vocab_order = np.argsort(item_vocab)
    pos = np.searchsorted(item_vocab[vocab_order], tokens)
    pos = np.minimum(pos, len(item_vocab) - 1)
    found = item_vocab[vocab_order][pos] == tokens
    row_item = np.where(found, vocab_order[pos] + 1, 0)
    known = np.flatnonzero(row_item > 0)
    dup = np.flatnonzero(np.bincount(row_item[known], minlength=len(item_vocab) + 1)[1:] > 1)
    if dup.size:
        rows = known[row_item[known] == dup[0] + 1]
        raise error_at(path, linenos[rows[1]], f"item {item_vocab[dup[0]]!r} listed again "
                       f"(first on line {linenos[rows[0]]})")
    return row_item


def _recbole_item_features(path: Path, item_vocab: np.ndarray, feature_columns: Optional[Sequence[str]],
                           item_field: str) -> tuple[ItemFeature, ...]:
    """The features of the .item file at path over the catalog item_vocab (item k + 1 = item_vocab[k])."""
    lines = read_lines(path)
    header = _table_header(path, lines, (item_field,))
    names = [name for name, _ in header]
    selected = _selected_columns(path, header, feature_columns, item_field)
    body, linenos = body_lines(lines, 1)
    columns = split_columns(body, linenos, len(header), path, ", ".join(names))
    if not selected:
        return ()
    if not body:
        raise ValueError(f"{path}: no item rows after the header")
    row_item = _catalog_rows(path, np.array(columns[names.index(item_field)], dtype=str), item_vocab, linenos)
    kinds = dict(header)
    features = []
    for name in selected:
        feature = _item_feature(path, name, kinds[name] == "token_seq", columns[names.index(name)], row_item,
                                item_vocab, linenos)
        if feature is not None:
            features.append(feature)
        elif feature_columns is not None:
            raise ValueError(f"{path}: column {name!r} has no value for any item of the data set")
    if not features:
        raise ValueError(f"{path}: no value in column{'s' if len(selected) > 1 else ''} "
                         f"{', '.join(selected)} for any item of the data set")
    return tuple(features)


def _item_feature(path: Path, name: str, multi_valued: bool, column: Sequence[str], row_item: np.ndarray,
                  item_vocab: np.ndarray, linenos: list[int]) -> Optional[ItemFeature]:
    """One .item column as an ItemFeature (value ids 1.. in order of first appearance), or None when
    no catalog item has a value (such a column carries nothing)."""
    known = np.flatnonzero(row_item > 0)
    if multi_valued:
        per_row = [column[r].split() for r in known]
    else:
        per_row = [[column[r]] if column[r] else [] for r in known]
    counts = np.fromiter((len(v) for v in per_row), dtype=np.int64, count=len(per_row))
    if not counts.any():
        return None
    codes, vocab = remap_first_appearance(np.array([t for v in per_row for t in v], dtype=str))
    rows = np.repeat(row_item[known], counts)
    order = np.argsort(rows, kind="stable")

    def too_wide(item: int, count: int) -> ValueError:
        line = linenos[known[int(np.flatnonzero(row_item[known] == item)[0])]]
        return error_at(path, line, f"item {item_vocab[item - 1]!r} has {count:,} values in column {name!r}; "
                        f"a ({len(item_vocab) + 1:,} x {count:,}) 0-padded feature matrix is too large")

    values = padded_rows(rows[order], codes[order] + 1, len(item_vocab) + 1, too_wide)
    return ItemFeature(name=name, values=values, num_values=len(vocab) + 1)
