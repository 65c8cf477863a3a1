"""S3Rec sequence files: `user item item ...` per line, plus an optional
`<stem>_item2attributes.json` giving each item's attribute ids (docs/training.md, 'Data formats')."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ._parsing import (INT64_LIMITS, INT_TOKEN, PathLike, body_lines, check_dense_ids, csr_from_counts, dataset_name,
                       error_at, line_of, padded_rows, parse_int_fields, read_lines, read_text)
from .dataset import ItemFeature, SequenceDataset

__all__ = ["read_s3rec"]


def read_s3rec(path: PathLike, attributes_path: Optional[PathLike] | str = "auto") -> SequenceDataset:
    """Read an S3Rec sequence file: one user per line, `user item item ...` (whitespace separated,
    chronological, item ids from 1), kept in file order; item ids are kept as they are and
    num_items is the largest id.

    attributes_path: an `{"item_id": [attribute ids]}` JSON file giving one feature named
    "attributes" (items absent from it get none; entries for ids > num_items are ignored);
    "auto" (default) uses `<stem>_item2attributes.json` next to `path` if it exists; None: none.
    """
    path = Path(path)
    lines = read_lines(path)
    body, linenos = body_lines(lines, 0)
    if not body:
        raise ValueError(f"{path}: no sequences")
    values, counts = parse_int_fields(body, linenos, path, "id")
    short = np.flatnonzero(counts < 2)
    if short.size:
        raise error_at(path, linenos[short[0]], "expected a user id followed by at least one item id")
    indptr_all = csr_from_counts(counts)
    user_ids = values[indptr_all[:-1]]
    keep = np.ones(len(values), dtype=bool)
    keep[indptr_all[:-1]] = False
    items = values[keep]
    bad = np.flatnonzero(items < 1)
    if bad.size:
        raise error_at(path, line_of(int(bad[0]), counts - 1, linenos),
                       f"item id {items[bad[0]]} is not >= 1 (0 is the padding item)")
    check_dense_ids(items, path, lambda i: line_of(i, counts - 1, linenos), "item id")
    num_items = int(items.max())
    features: tuple[ItemFeature, ...] = ()
    if isinstance(attributes_path, str) and attributes_path == "auto":
        candidate = path.with_name(dataset_name(path) + "_item2attributes.json")
        attributes_path = candidate if candidate.is_file() else None
    if attributes_path is not None:
        features = (_read_item2attributes(Path(attributes_path), num_items),)
    return SequenceDataset(name=dataset_name(path), num_items=num_items, indptr=csr_from_counts(counts - 1),
                           items=items, features=features, user_ids=user_ids)


def _json_line(text: str, key: str) -> int:
    """Best-effort line number of the JSON object key `key` in `text`."""
    pos = text.find(json.dumps(key))
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 1


def _read_item2attributes(path: Path, num_items: int, name: str = "attributes") -> ItemFeature:
    """The S3Rec `{"item": [attribute ids]}` JSON as an ItemFeature over items 1..num_items."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error_at(path, exc.lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise error_at(path, 1, "expected a JSON object {\"item id\": [attribute ids, ...]}")
    keys: list[str] = []  # the key of every kept attribute value (for line numbers)
    rows: list[int] = []
    attrs: list[int] = []
    for key, value in data.items():
        if not INT_TOKEN.match(key.strip()):
            raise error_at(path, _json_line(text, key), f"item id {key!r} is not an integer")
        item = int(key)
        if not isinstance(value, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in value):
            raise error_at(path, _json_line(text, key), f"attributes of item {key} must be a list of integers")
        if not all(1 <= a <= INT64_LIMITS[1] for a in value):
            raise error_at(path, _json_line(text, key), f"attribute ids of item {key} must be >= 1 (0 is padding) "
                           "and fit in 64 bits")
        if 1 <= item <= num_items:
            keys.extend([key] * len(value))
            rows.extend([item] * len(value))
            attrs.extend(value)
        elif item < 1:
            raise error_at(path, _json_line(text, key), f"item id {key} is not >= 1")
    if not attrs:
        raise ValueError(f"{path}: no attribute ids for any of the {num_items:,} items of the data set "
                         "(an empty attributes file?)")
    row = np.array(rows, dtype=np.int64)
    attr = np.array(attrs, dtype=np.int64)
    check_dense_ids(attr, path, lambda i: _json_line(text, keys[i]), "attribute id")
    order = np.argsort(row, kind="stable")

    def too_wide(item: int, count: int) -> ValueError:
        return error_at(path, _json_line(text, keys[rows.index(item)]), f"item {item} has {count:,} attribute ids; a "
                        f"({num_items + 1:,} x {count:,}) 0-padded attribute matrix is too large")

    values = padded_rows(row[order], attr[order], num_items + 1, too_wide)
    return ItemFeature(name=name, values=values, num_values=int(values.max()) + 1)


# ----------------------------------------------------------------------------------------------
# RecBole atomic files
