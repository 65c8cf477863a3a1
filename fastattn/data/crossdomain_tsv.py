"""Cross-domain TSV files: `user \\t items \\t domains` (Amazon Toy/Game) or
`split \\t seq_id \\t items \\t domains` (KuaiRand, with a predefined train/valid/test split);
docs/training.md, 'Data formats'."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ._parsing import (PathLike, body_lines, check_dense_ids, csr_from_counts, dataset_name, error_at, line_of,
                       parse_int_fields, read_lines, remap_sorted, split_columns)
from .dataset import SequenceDataset

__all__ = ["read_crossdomain_tsv"]

_SPLIT_NAMES = {"training": 0, "train": 0, "evaluation": 1, "valid": 1, "validation": 1,
                "testing": 2, "test": 2}


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
    lines = read_lines(path)
    layout, head = _layout(path, lines)
    body, linenos = body_lines(lines, 1)
    if not body:
        raise ValueError(f"{path}: no sequences")
    columns = split_columns(body, linenos, len(head), path, ", ".join(head))
    items, item_counts = parse_int_fields(columns[-2], linenos, path, "item id")
    domains, domain_counts = parse_int_fields(columns[-1], linenos, path, "domain id")
    mismatch = np.flatnonzero(item_counts != domain_counts)
    if mismatch.size:
        r = mismatch[0]
        raise error_at(path, linenos[r], f"{item_counts[r]} items but {domain_counts[r]} domains")
    empty = np.flatnonzero(item_counts == 0)
    if empty.size:
        raise error_at(path, linenos[empty[0]], "no items")
    ids, id_counts = parse_int_fields(columns[-3], linenos, path, "user id" if layout == "user" else "seq_id")
    bad = np.flatnonzero(id_counts != 1)
    if bad.size:
        raise error_at(path, linenos[bad[0]], f"expected one integer id, got {columns[-3][bad[0]]!r}")
    split = _split_codes(path, columns[0], linenos) if layout == "split" else None
    if remap_items is None:
        remap_items = layout == "split"
    item_ids = None
    if remap_items:
        codes, uniques = remap_sorted(items)
        items = codes + 1
        item_ids = np.concatenate([np.array([-1], dtype=np.int64), uniques])
        num_items = len(uniques)
    else:
        bad = np.flatnonzero(items < 1)
        if bad.size:
            raise error_at(path, line_of(int(bad[0]), item_counts, linenos),
                           f"item id {items[bad[0]]} is not >= 1 (0 is the padding item)")
        check_dense_ids(items, path, lambda i: line_of(i, item_counts, linenos), "item id")
        num_items = int(items.max())
    domain_codes, domain_ids = remap_sorted(domains)
    return SequenceDataset(name=dataset_name(path), num_items=num_items, indptr=csr_from_counts(item_counts),
                           items=items, domains=domain_codes, num_domains=len(domain_ids), split=split,
                           user_ids=ids, item_ids=item_ids, domain_ids=domain_ids)


def _layout(path: Path, lines: list[str]) -> tuple[str, list[str]]:
    """("user" or "split", the column names) from the header line; ValueError for another header."""
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header)")
    head = [h.strip() for h in lines[0].split("\t")]
    if head == ["user", "items", "domains"]:
        return "user", head
    if head == ["split", "seq_id", "items", "domains"]:
        return "split", head
    raise error_at(path, 1, f"unknown header {lines[0]!r}; expected 'user\\titems\\tdomains' or "
                   "'split\\tseq_id\\titems\\tdomains'")


def _split_codes(path: Path, column: Sequence[str], linenos: list[int]) -> np.ndarray:
    """The split column as (n,) int8 codes 0/1/2 (train/valid/test); ValueError naming an unknown one."""
    try:
        return np.array([_SPLIT_NAMES[s.strip()] for s in column], dtype=np.int8)
    except KeyError:
        r = next(i for i, s in enumerate(column) if s.strip() not in _SPLIT_NAMES)
        raise error_at(path, linenos[r], f"unknown split {column[r]!r}; expected training, "
                       "evaluation or testing") from None
