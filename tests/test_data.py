"""fastattn.data: readers (exact parsed arrays, malformed input), splits, batching, synthetic data,
and the real data sets under <repo>/../shared/data (skipped when absent)."""
from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastattn.data import (EvalBatch, EvalSet, ItemFeature, SequenceDataset, SyntheticConfig, TrainBatch,
                           eval_batches, load_dataset, make_synthetic, num_train_batches, read_crossdomain_tsv,
                           read_recbole, read_s3rec, split_dataset, train_batches)
from fastattn.data.batching import batch_rows, prefix_sequences, train_order

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _csr(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.cumsum([0] + [len(s) for s in seqs])
    return indptr, np.array([i for s in seqs for i in s], dtype=np.int64)


def _eq(a: object, b: object) -> None:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# readers: exact parses
# ------------------------------------------------------------------------------------------------

def test_s3rec_with_attributes(tmp_path: Path) -> None:
    _write(tmp_path / "Toy.txt", "1 3 1 2\n2 2 4\n\n3 5 1 3 4 2\n")
    _write(tmp_path / "Toy_item2attributes.json", json.dumps({"1": [1, 2], "3": [2], "5": [3, 1, 4], "9": [7]}))
    ds = read_s3rec(tmp_path / "Toy.txt")  # "auto" finds the json
    assert ds.name == "Toy" and ds.num_items == 5 and ds.num_users == 3
    _eq(ds.indptr, [0, 3, 5, 10])
    _eq(ds.items, [3, 1, 2, 2, 4, 5, 1, 3, 4, 2])
    _eq(ds.user_ids, [1, 2, 3])
    _eq(ds.sequence(2), [5, 1, 3, 4, 2])
    _eq(ds.lengths(), [3, 2, 5])
    assert ds.domains is None and ds.num_domains == 1 and ds.split is None
    (feature,) = ds.features
    assert feature.name == "attributes" and feature.num_values == 5  # ids 1..4 (+ padding); item 9 ignored
    _eq(feature.values, [[0, 0, 0], [1, 2, 0], [0, 0, 0], [2, 0, 0], [0, 0, 0], [3, 1, 4]])
    assert read_s3rec(tmp_path / "Toy.txt", attributes_path=None).features == ()
    summary = ds.summary()
    assert "3 users" in summary and "5 items" in summary and "10 interactions" in summary and "attributes" in summary


def _recbole_files(folder: Path) -> Path:
    folder.mkdir()
    _write(folder / "mini.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
           "u2\ti10\t3\t300\n"
           "u1\ti20\t4\t200\n"
           "u2\ti30\t5\t100\n"
           "u1\ti10\t1\t100\n"
           "u2\ti20\t2\t300\n")
    _write(folder / "mini.item", "item_id:token\ttitle:token_seq\tyear:token\tscore:float\tgenre:token_seq\n"
           "i20\tb c\t1990\t1.5\tDrama\n"
           "i10\ta b\t1995\t2.0\tComedy Drama\n"
           "i99\tz\t2000\t0.1\tHorror\n"
           "i30\t\t1990\t3.0\t\n")
    return folder / "mini.inter"


def test_recbole(tmp_path: Path) -> None:
    inter = _recbole_files(tmp_path / "mini")
    ds = read_recbole(inter)
    # users and items in order of first appearance; each user sorted by time, ties in file order
    assert ds.name == "mini" and ds.num_items == 3 and ds.num_users == 2
    _eq(ds.user_ids, ["u2", "u1"])
    _eq(ds.item_ids, ["[PAD]", "i10", "i20", "i30"])
    _eq(ds.indptr, [0, 3, 5])
    _eq(ds.items, [3, 1, 2, 1, 2])
    names = [f.name for f in ds.features]
    assert names == ["title", "year", "genre"]  # token/token_seq columns, float ignored
    title, year, genre = ds.features
    _eq(title.values, [[0, 0], [3, 1], [1, 2], [0, 0]])  # vocabulary b, c, a (first appearance)
    assert title.num_values == 4
    _eq(year.values, [[0], [2], [1], [1]])
    assert year.num_values == 3
    _eq(genre.values, [[0, 0], [2, 1], [1, 0], [0, 0]])
    assert genre.num_values == 3  # Horror belongs to an item outside the catalog
    # a directory works too, and feature_columns picks features
    ds2 = read_recbole(tmp_path / "mini", feature_columns=["genre"])
    assert [f.name for f in ds2.features] == ["genre"]
    _eq(ds2.features[0].values, genre.values)
    _eq(ds2.items, ds.items)
    with pytest.raises(ValueError, match="score.*float"):
        read_recbole(inter, feature_columns=["score"])
    with pytest.raises(ValueError, match="nope"):
        read_recbole(inter, feature_columns=["nope"])


def test_recbole_without_timestamp_keeps_file_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.inter", "item_id:token\tuser_id:token\n7\ta\n5\tb\n9\ta\n7\tb\n")
    ds = read_recbole(path)
    _eq(ds.items, [1, 3, 2, 1])
    _eq(ds.indptr, [0, 2, 4])
    assert ds.features == ()


def test_tsv_user_layout(tmp_path: Path) -> None:
    path = _write(tmp_path / "toy_game.tsv", "user\titems\tdomains\n1\t5 3 7\t0 1 0\n2\t2 4\t1 1\n")
    ds = read_crossdomain_tsv(path)
    assert ds.name == "toy_game" and ds.num_items == 7 and ds.num_domains == 2 and ds.split is None
    _eq(ds.indptr, [0, 3, 5])
    _eq(ds.items, [5, 3, 7, 2, 4])
    _eq(ds.domains, [0, 1, 0, 1, 1])
    _eq(ds.user_ids, [1, 2])
    _eq(ds.domain_ids, [0, 1])
    assert ds.item_ids is None


KUAI = ("split\tseq_id\titems\tdomains\n"
        "training\t0\t100 5 100 7\t9 4 9 0\n"
        "evaluation\t1\t7 42\t0 11\n"
        "testing\t2\t5 1000 3\t4 4 9\n"
        "training\t3\t42 3\t9 9\n")


def test_tsv_split_layout_gzipped(tmp_path: Path) -> None:
    ds = read_crossdomain_tsv(_write(tmp_path / "kuai.tsv.gz", KUAI))
    assert ds.name == "kuai" and ds.num_items == 6 and ds.num_domains == 4
    _eq(ds.item_ids, [-1, 3, 5, 7, 42, 100, 1000])  # sorted original ids → 1..6
    _eq(ds.domain_ids, [0, 4, 9, 11])
    _eq(ds.indptr, [0, 4, 6, 9, 11])
    _eq(ds.items, [5, 2, 5, 3, 3, 4, 2, 6, 1, 4, 1])
    _eq(ds.domains, [2, 1, 2, 0, 0, 3, 1, 1, 2, 2, 2])
    _eq(ds.split, [0, 1, 2, 0])
    assert ds.split.dtype == np.int8
    _eq(ds.user_ids, [0, 1, 2, 3])
    assert "split 2/1/1" in ds.summary()


def test_load_dataset_infers_format(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "1 1 2\n")
    _recbole_files(tmp_path / "rb")
    _write(tmp_path / "k.tsv.gz", KUAI)
    _write(tmp_path / "noext", KUAI)
    _write(tmp_path / "seqs.dat", "1 1 2 3\n")
    assert load_dataset(tmp_path / "a.txt").num_items == 2
    assert load_dataset(str(tmp_path / "rb")).num_items == 3
    assert load_dataset(tmp_path / "rb" / "mini.inter").num_items == 3
    assert load_dataset(tmp_path / "k.tsv.gz").split is not None
    assert load_dataset(tmp_path / "noext").num_items == 6  # by header
    assert load_dataset(tmp_path / "seqs.dat").num_items == 3  # by contents
    assert load_dataset(tmp_path / "seqs.dat", format="s3rec").num_items == 3
    with pytest.raises(ValueError, match="format 'csv'"):
        load_dataset(tmp_path / "a.txt", format="csv")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_dataset(tmp_path / "missing.txt")
    small = load_dataset("synthetic:num_users=50,seed=3,attrs_per_item=2-2")
    assert small.num_users == 50 and small.features[1].values.shape[1] == 2
    with pytest.raises(ValueError, match="bogus"):
        load_dataset("synthetic:bogus=1")


# ------------------------------------------------------------------------------------------------
# readers: malformed input
# ------------------------------------------------------------------------------------------------

MALFORMED = [
    ("s3rec", "bad.txt", "1 2 3\n2 4 x\n", "line 2.*'x'"),
    ("s3rec", "bad.txt", "1 2 3\n\n2 4 5.5\n", "line 3"),  # blank lines still count
    ("s3rec", "bad.txt", "1 2 3\n2\n", "line 2.*at least one item"),
    ("s3rec", "bad.txt", "1 2 3\n2 4 5\n3 0 1\n", "line 3.*item id 0"),
    ("recbole", "bad.inter", "user_id:token\titem_id:token\tt:float\nu\ti\t1\nu\ti\n", "line 3.*3 tab-separated"),
    ("recbole", "bad.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\tj\tnoon\n",
     "line 3.*'noon'"),
    ("recbole", "bad.inter", "user_id\titem_id:token\nu\ti\n", "line 1.*name:type"),
    ("recbole", "bad.inter", "uid:token\titem_id:token\nu\ti\n", "line 1.*'user_id'"),
    ("tsv", "bad.tsv", "user\titems\tdomains\n1\t1 2\t0 1\n2\t3 4 5\t0 1\n", "line 3.*3 items but 2 domains"),
    ("tsv", "bad.tsv", "user\titems\tdomains\n1\t1 2\t0 1\n2\t3 q\t0 1\n", "line 3.*'q'"),
    ("tsv", "bad.tsv", "user\titems\tdomains\n1\t1 2\t0 1\n2\t3 4\n", "line 3.*3 tab-separated"),
    ("tsv", "bad.tsv", "user\titems\tdomains\n1\t1 2\t0 1\n2\t0 4\t1 1\n", "line 3.*item id 0"),
    ("tsv", "bad.tsv", "user\titems\n1\t1 2\n", "line 1.*header"),
    ("tsv", "bad.tsv.gz", KUAI + "validation\t4\t1 2\t0 0\nfoo\t5\t1\t0\n", "line 7.*split 'foo'"),
    ("tsv", "bad.tsv.gz", KUAI + "testing\t4\t1 2\t0\n", "line 6.*2 items but 1 domains"),
]


@pytest.mark.parametrize("fmt, name, text, message", MALFORMED)
def test_malformed_files_name_file_and_line(tmp_path: Path, fmt: str, name: str, text: str, message: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=f"{name}, {message}"):
        load_dataset(path, format=fmt)


def test_malformed_json(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "1 1 2\n")
    bad = _write(tmp_path / "bad.json", '{"1": [1,\n 2,, 3]}')
    with pytest.raises(ValueError, match="bad.json, line 2.*JSON"):
        read_s3rec(tmp_path / "a.txt", attributes_path=bad)
    bad = _write(tmp_path / "bad2.json", '{"1": [1],\n "2": ["x"]}')
    with pytest.raises(ValueError, match="bad2.json, line 2.*integers"):
        read_s3rec(tmp_path / "a.txt", attributes_path=bad)
    bad = _write(tmp_path / "bad3.json", '{\n"one": [1]}')
    with pytest.raises(ValueError, match="bad3.json, line 2.*'one'"):
        read_s3rec(tmp_path / "a.txt", attributes_path=bad)


EDGE_FILES = [
    ("e.txt", b"", r": no sequences$"),
    ("e.tsv", b"", r": empty file \(expected a header\)$"),
    ("e.inter", b"", r": empty file \(expected a name:type header\)$"),
    ("h.tsv", b"user\titems\tdomains\n", r": no sequences$"),
    ("h.inter", b"user_id:token\titem_id:token\n", r": no interactions$"),
    ("n.txt", b"1 2 -3\n", r", line 1: item id -3 is not >= 1"),
    ("n.tsv", b"user\titems\tdomains\n1\t1 2\t0 0\n2\t1 -2\t0 0\n", r", line 3: item id -2 is not >= 1"),
    ("w.txt", b"1 2 3\n2 4 x\n", r", line 2: id 'x' is not an integer$"),
    ("f.tsv", b"user\titems\tdomains\n1\t1 2.5\t0 0\n", r", line 2: item id '2.5' is not an integer$"),
    ("u.txt", b"1 2\n\xff\n", r", line 2: not valid UTF-8 text$"),
]


@pytest.mark.parametrize("name, data, message", EDGE_FILES)
def test_edge_files_give_one_line_naming_the_file(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match="^" + re.escape(str(path)) + message) as info:
        load_dataset(path)
    assert "\n" not in str(info.value)


def test_crlf_line_ends(tmp_path: Path) -> None:
    for name, text in (("a.txt", "1 3 1 2 4\n2 2 4 1 5\n"), ("b.tsv", "user\titems\tdomains\n1\t1 2 3 4\t0 0 1 1\n"),
                       ("c.inter", "user_id:token\titem_id:token\n1\t2\n1\t3\n")):
        plain = load_dataset(_write(tmp_path / name, text))
        crlf = tmp_path / ("crlf_" + name)
        crlf.write_bytes(text.replace("\n", "\r\n").encode())
        read = load_dataset(crlf)
        assert read.num_items == plain.num_items
        _eq(read.indptr, plain.indptr)
        _eq(read.items, plain.items)


def test_directory_without_inter(tmp_path: Path) -> None:
    _write(tmp_path / "ml.item", "item_id:token\n")
    with pytest.raises(ValueError, match=r"^cannot infer the format of directory .* \(no .inter file\); pass format=$"):
        load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_dataset(tmp_path, format="recbole")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_s3rec(tmp_path / "nope.txt")
    _write(tmp_path / "a.txt", "1 1 2\n")
    with pytest.raises(FileNotFoundError, match="attrs.json"):
        read_s3rec(tmp_path / "a.txt", attributes_path=tmp_path / "attrs.json")
    with pytest.raises(FileNotFoundError, match="x.inter"):
        read_recbole(tmp_path / "x.inter")
    with pytest.raises(FileNotFoundError, match="k.tsv.gz"):
        read_crossdomain_tsv(tmp_path / "k.tsv.gz")


def test_dataset_validation() -> None:
    indptr, items = _csr([[1, 2], [3]])
    with pytest.raises(ValueError, match="item ids"):
        SequenceDataset("x", num_items=2, indptr=indptr, items=items)
    with pytest.raises(ValueError, match="indptr"):
        SequenceDataset("x", num_items=3, indptr=[0, 2, 4], items=items)
    with pytest.raises(ValueError, match="domains"):
        SequenceDataset("x", num_items=3, indptr=indptr, items=items, domains=[0, 1], num_domains=2)
    with pytest.raises(ValueError, match="rows"):
        SequenceDataset("x", num_items=3, indptr=indptr, items=items,
                        features=(ItemFeature("f", np.zeros((3, 1), np.int64), 1),))
    with pytest.raises(ValueError, match="padding"):
        ItemFeature("f", [[1], [0]], 2)
    with pytest.raises(ValueError, match="split"):
        SequenceDataset("x", num_items=3, indptr=indptr, items=items, split=[0, 3])


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------

def test_leave_one_out() -> None:
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10], [2, 3, 4, 5]]
    indptr, items = _csr(seqs)
    ds = SequenceDataset("loo", num_items=10, indptr=indptr, items=items, domains=items % 3, num_domains=3)
    sp = split_dataset(ds)
    _eq(sp.train.indptr, [0, 3, 5])
    _eq(sp.train.items, [1, 2, 3, 2, 3])
    _eq(sp.train.domains, np.array([1, 2, 3, 2, 3]) % 3)
    assert sp.train.split is None and sp.train.num_items == 10
    _eq(sp.valid.users, [0, 1, 3])
    _eq(sp.valid.indptr, [0, 3, 4, 6])
    _eq(sp.valid.items, [1, 2, 3, 6, 2, 3])
    _eq(sp.valid.target, [4, 7, 4])
    _eq(sp.valid.target_domain, [1, 1, 1])
    _eq(sp.test.indptr, [0, 4, 6, 9])
    _eq(sp.test.items, [1, 2, 3, 4, 6, 7, 2, 3, 4])
    _eq(sp.test.domains, np.array([1, 2, 3, 4, 6, 7, 2, 3, 4]) % 3)
    _eq(sp.test.target, [5, 8, 5])
    _eq(sp.test.target_domain, [2, 2, 2])
    assert sp.skipped_eval == 1 and sp.dropped_train == 2
    assert len(sp.valid) == 3 and list(sp.test.history(1)) == [6, 7]


def test_predefined_split(tmp_path: Path) -> None:
    ds = read_crossdomain_tsv(_write(tmp_path / "kuai.tsv", KUAI))
    sp = split_dataset(ds)
    _eq(sp.train.indptr, [0, 4, 6])
    _eq(sp.train.items, [5, 2, 5, 3, 4, 1])
    _eq(sp.train.domains, [2, 1, 2, 0, 2, 2])
    _eq(sp.train.user_ids, [0, 3])
    _eq(sp.valid.items, [3])
    _eq(sp.valid.target, [4])
    _eq(sp.valid.target_domain, [3])
    _eq(sp.test.indptr, [0, 2])
    _eq(sp.test.items, [2, 6])
    _eq(sp.test.domains, [1, 1])
    _eq(sp.test.target, [1])
    _eq(sp.test.target_domain, [2])
    assert sp.skipped_eval == 0 and sp.dropped_train == 0


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------

def _batch_dataset() -> SequenceDataset:
    indptr, items = _csr([[1, 2, 3, 4, 5], [6, 7], [8], [2, 4, 6]])
    values = np.zeros((9, 2), dtype=np.int64)
    values[1:, 0] = np.arange(1, 9) + 10
    values[1:, 1] = np.where(np.arange(1, 9) % 2 == 0, np.arange(1, 9) + 20, 0)
    return SequenceDataset("b", num_items=8, indptr=indptr, items=items, domains=items % 2, num_domains=2,
                           features=(ItemFeature("f", values, 29),))


def test_train_batches_exact() -> None:
    ds = _batch_dataset()
    batches = list(train_batches(ds, batch_size=2, max_len=3, shuffle=False))
    assert num_train_batches(ds, 2) == len(batches) == 2  # the length-1 sequence is skipped
    first, second = batches
    assert isinstance(first, TrainBatch)
    _eq(first.items, [[2, 3, 4], [0, 0, 6]])  # truncated to the last 3 inputs, left padded
    _eq(first.targets, [[3, 4, 5], [0, 0, 7]])
    _eq(second.items, [[2, 4]])
    _eq(second.targets, [[4, 6]])
    _eq(first.padding_mask, [[False, False, False], [True, True, False]])
    values = ds.features[0].values
    for batch in batches:
        assert batch.items.dtype == torch.int64 and batch.domains is not None
        (attrs,), (tattrs,) = batch.attributes, batch.target_attributes
        assert attrs.shape == (*batch.items.shape, 2)
        _eq(attrs, values[batch.items.numpy()])
        _eq(tattrs, values[batch.targets.numpy()])
        _eq(batch.domains, batch.items.numpy() % 2)
        _eq(batch.target_domains, batch.targets.numpy() % 2)
    assert not first.attributes[0][1, :2].any()  # padded slots carry no attribute
    assert len(list(train_batches(ds, batch_size=2, max_len=3, drop_last=True))) == 1


def test_train_batches_epoch_coverage_and_determinism() -> None:
    ds = make_synthetic(SyntheticConfig(num_users=300, min_len=1, max_len=12, seed=5))
    eligible = [tuple(ds.sequence(u)) for u in range(ds.num_users) if len(ds.sequence(u)) >= 2]

    def rows(seed: int, epoch: int, max_len: int = 50, unit: str = "sequences") -> list[tuple[int, ...]]:
        out = []
        for batch in train_batches(ds, 32, max_len, seed=seed, epoch=epoch, unit=unit):
            for x, y in zip(batch.items.numpy(), batch.targets.numpy()):
                real = x != 0
                assert real[-1] and (np.diff(real.astype(int)) >= 0).all()  # left padded
                _eq(y == 0, ~real)
                _eq(y[:-1][real[:-1]], x[1:][real[:-1]])  # targets are the inputs shifted by one
                out.append(tuple(x[x != 0]) + (int(y[-1]),))
        return out

    epoch0 = rows(0, 0)
    assert sorted(epoch0) == sorted(eligible)  # every sequence exactly once
    assert rows(0, 0) == epoch0  # deterministic given (seed, epoch)
    assert rows(0, 1) != epoch0 and rows(1, 0) != epoch0
    assert sorted(rows(0, 1)) == sorted(eligible)
    order = train_order(ds, seed=0, epoch=0)
    _eq(next(train_batches(ds, 32, 50, seed=0, epoch=0)).targets[0, -1], ds.sequence(int(order[0]))[-1])
    for batch in train_batches(ds, 32, 4, seed=0, epoch=0):
        assert batch.items.shape[1] <= 4
    # the same guarantees when batches are cut by target count
    by_targets = rows(0, 0, unit="targets")
    assert sorted(by_targets) == sorted(eligible) and rows(0, 0, unit="targets") == by_targets
    assert rows(0, 1, unit="targets") != by_targets


@pytest.mark.parametrize("batch_size, max_len", [(1, 50), (7, 3), (40, 12), (10_000, 50)])
def test_batches_by_target_count(batch_size: int, max_len: int) -> None:
    ds = make_synthetic(SyntheticConfig(num_users=400, min_len=2, max_len=30, seed=2))
    counts = np.minimum(ds.lengths() - 1, max_len)
    batches = batch_rows(ds, batch_size, max_len, unit="targets", seed=3, epoch=1)
    assert num_train_batches(ds, batch_size, unit="targets", max_len=max_len, seed=3, epoch=1) == len(batches)
    _eq(np.sort(np.concatenate(batches)), np.flatnonzero(ds.lengths() >= 2))
    sizes = np.array([counts[b].sum() for b in batches])
    # a batch ends once the running count crosses a multiple of batch_size: never more than one
    # sequence past it, and the total over the epoch is preserved
    assert sizes.sum() == counts[ds.lengths() >= 2].sum()
    assert sizes.max() <= batch_size + 2 * max_len
    assert np.median(sizes) >= min(batch_size, sizes.sum()) - max_len
    # bucketing: rows of a batch have similar lengths, so there is little padding
    widths = np.array([counts[b].max() for b in batches])
    assert len(batches) == 1 or (widths * np.array([len(b) for b in batches])).sum() <= 1.5 * sizes.sum() + len(batches) * max_len
    with pytest.raises(ValueError, match="unit must be one of"):
        batch_rows(ds, 8, 8, unit="tokens")


def test_unbucketed_target_batches_follow_the_shuffled_order() -> None:
    """bucket_batches=0: the same target-count cut, over the epoch's shuffled order itself."""
    ds = make_synthetic(SyntheticConfig(num_users=400, min_len=2, max_len=30, seed=2))
    batches = batch_rows(ds, 40, 12, unit="targets", seed=3, epoch=1, bucket_batches=0)
    assert num_train_batches(ds, 40, unit="targets", max_len=12, seed=3, epoch=1, bucket_batches=0) == len(batches)
    order = train_order(ds, seed=3, epoch=1)
    joined = np.concatenate(batches)
    assert sorted(joined.tolist()) == sorted(order.tolist())
    # consecutive runs of the shuffled order (the batch order itself is shuffled again)
    starts = {int(b[0]): b for b in batches}
    position = {int(u): i for i, u in enumerate(order)}
    for b in starts.values():
        idx = [position[int(u)] for u in b]
        assert idx == list(range(idx[0], idx[0] + len(b)))
    counts = np.minimum(ds.lengths() - 1, 12)
    assert max(counts[b].sum() for b in batches) <= 40 + 2 * 12
    with pytest.raises(ValueError, match="bucket_batches must be an int >= 0"):
        batch_rows(ds, 8, 8, unit="targets", bucket_batches=-1)


def test_prefix_sequences_by_hand() -> None:
    indptr, items = _csr([[1, 2, 3, 4, 5], [6], [7, 8]])
    ds = SequenceDataset(name="p", indptr=indptr, items=items, num_items=8, domains=items % 2, num_domains=2)
    rows = prefix_sequences(ds, max_len=2)
    got = [rows.items[rows.indptr[i]:rows.indptr[i + 1]].tolist() for i in range(len(rows.indptr) - 1)]
    # every (history of at most 2 items, next item) pair, in order; [6] has none
    assert got == [[1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [7, 8]]
    _eq(rows.domains, np.concatenate([np.asarray(r) % 2 for r in got]))
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        prefix_sequences(ds, 0)


def test_prefix_batches_hold_every_sample_once() -> None:
    """unit="prefixes": RecBole's training samples — each (history, next item) pair once per
    epoch, one target per row at the last column, batch_size rows per batch."""
    ds = make_synthetic(SyntheticConfig(num_users=60, min_len=2, max_len=20, seed=4))
    max_len = 6
    batches = list(train_batches(ds, 16, max_len, unit="prefixes", seed=1, epoch=2))
    assert len(batches) == num_train_batches(ds, 16, unit="prefixes", max_len=max_len, seed=1, epoch=2)
    samples = []
    for b in batches:
        assert b.items.shape[0] <= 16 and b.items.shape[1] <= max_len
        assert not b.targets[:, :-1].any() and bool((b.targets[:, -1] > 0).all())
        assert not b.target_domains[:, :-1].any()
        for row, target in zip(b.items.tolist(), b.targets[:, -1].tolist()):
            samples.append((tuple(i for i in row if i), target))
    want = []
    for u in range(len(ds.indptr) - 1):
        seq = ds.items[ds.indptr[u]:ds.indptr[u + 1]].tolist()
        want += [(tuple(seq[max(0, k - 1 - max_len):k - 1]), seq[k - 1]) for k in range(2, len(seq) + 1)]
    assert sorted(samples) == sorted(want)
    # the input domains stay aligned with the items (only targets are cut to the last column)
    first = batches[0]
    _eq(first.domains, np.where(first.items.numpy() > 0, _domain_of(ds, first.items.numpy()), 0))


def _domain_of(ds: SequenceDataset, items: np.ndarray) -> np.ndarray:
    """The (fixed) domain of each item of a synthetic data set (0 at padding)."""
    table = np.zeros(ds.num_items + 1, dtype=np.int64)
    table[ds.items] = ds.domains
    return table[items]


def test_eval_batches_exact() -> None:
    seqs = [[1, 2, 3, 4, 5], [6], [2, 3]]
    indptr, items = _csr(seqs)
    ev = EvalSet(indptr=indptr, items=items, domains=items % 2, target=np.array([6, 7, 8]),
                 target_domain=np.array([0, 1, 0]))
    feature = _batch_dataset().features[0]
    batches = list(eval_batches(ev, (feature,), batch_size=2, max_len=2))
    assert len(batches) == 2 and isinstance(batches[0], EvalBatch)
    first, second = batches
    _eq(first.items, [[4, 5], [0, 6]])
    _eq(first.exclude, [[0, 1, 2, 3, 4, 5], [0, 6, -1, -1, -1, -1]])  # whole history, not only max_len
    _eq(first.target, [6, 7])
    _eq(first.target_domain, [0, 1])
    _eq(first.domains, [[0, 1], [0, 0]])
    _eq(first.attributes[0], feature.values[[[4, 5], [0, 6]]])
    _eq(second.items, [[2, 3]])
    _eq(second.exclude, [[0, 2, 3]])
    assert first.exclude.dtype == torch.int64
    # a data set may be passed instead of its features; no domains → None
    ds = SequenceDataset("x", num_items=8, indptr=indptr, items=items, features=(feature,))
    sp_ev = EvalSet(indptr=indptr, items=items, domains=None, target=np.array([6, 7, 8]), target_domain=None)
    (only,) = eval_batches(sp_ev, ds, batch_size=8, max_len=10)
    assert only.domains is None and only.target_domain is None and only.items.shape == (3, 5)


# ------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------

def test_synthetic_shapes_and_determinism() -> None:
    start = time.perf_counter()
    ds = make_synthetic()
    assert time.perf_counter() - start < 1.0
    config = SyntheticConfig()
    assert ds.num_users == config.num_users and ds.num_items == config.num_items
    lengths = ds.lengths()
    assert lengths.min() >= config.min_len and lengths.max() <= config.max_len
    category, tags = ds.features
    assert (category.name, tags.name) == ("category", "tags")
    assert category.values.shape == (501, 1) and category.num_values == 21
    assert set(category.values[1:, 0]) == set(range(1, 21))
    assert tags.values.shape == (501, 3) and tags.num_values == config.num_tags + 1
    row_counts = (tags.values[1:] > 0).sum(1)
    assert row_counts.min() >= 1 and row_counts.max() <= 3
    for row in tags.values[1:]:
        nz = row[row > 0]
        assert len(set(nz)) == len(nz) and (row[len(nz):] == 0).all()  # distinct, zeros last
    assert ds.domains is not None and set(np.unique(ds.domains)) == {0, 1}
    # no user consumes an item twice (so history-masked ranking can reach every target)
    assert all(len(np.unique(ds.sequence(u))) == lengths[u] for u in range(ds.num_users))
    tight = make_synthetic(SyntheticConfig(num_users=300, num_items=25, num_attributes=5, max_len=25))
    assert all(len(np.unique(tight.sequence(u))) == tight.lengths()[u] for u in range(300))
    repeats = make_synthetic(SyntheticConfig(allow_repeats=True))
    assert any(len(np.unique(repeats.sequence(u))) < repeats.lengths()[u] for u in range(repeats.num_users))
    again = make_synthetic(SyntheticConfig())
    _eq(again.items, ds.items)
    _eq(again.domains, ds.domains)
    _eq(again.features[1].values, tags.values)
    other = make_synthetic(SyntheticConfig(seed=1))
    assert not np.array_equal(other.items[:1000], ds.items[:1000])
    with pytest.raises(ValueError, match="min_len"):
        SyntheticConfig(min_len=10, max_len=5)


def test_synthetic_is_learnable() -> None:
    """A first-order Markov count model over classes, fit on 1,500 users, predicts the next class
    of the other 500 far better than chance and than always guessing the most common class."""
    ds = make_synthetic()
    cls = ds.features[0].values[:, 0]

    def pairs(users: range) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = ds.indptr[users.start], ds.indptr[users.stop]
        c = cls[ds.items[lo:hi]]
        same = np.diff(np.repeat(np.arange(len(users)), ds.lengths()[users.start:users.stop])) == 0
        return c[:-1][same], c[1:][same]

    a, b = pairs(range(0, 1500))
    counts = np.zeros((21, 21))
    np.add.at(counts, (a, b), 1)
    ta, tb = pairs(range(1500, 2000))
    markov = float((counts.argmax(1)[ta] == tb).mean())
    popular = float((np.bincount(b).argmax() == tb).mean())
    assert markov > 0.4 and markov > 2.5 * popular and markov > 5 / 20, (markov, popular)


# ------------------------------------------------------------------------------------------------
# real data (../shared/data)
# ------------------------------------------------------------------------------------------------

def _real(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real data set {relative} not found under {DATA} (the project reads ../shared/data)")
    return path


def test_real_beauty() -> None:
    path = _real("s3rec/Beauty.txt")
    start = time.perf_counter()
    ds = load_dataset(path)
    print(f"Beauty loaded in {time.perf_counter() - start:.3f} s: {ds.summary()}")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (22_363, 12_101, 198_502)
    (attributes,) = ds.features
    _eq(attributes.values[4, :3], [1, 2, 3])  # {"4": [1, 2, 3], ...}
    sp = split_dataset(ds)
    assert len(sp.test) == 22_363 and sp.train.num_interactions == 198_502 - 2 * 22_363
    start = time.perf_counter()
    n = sum(1 for _ in train_batches(sp.train, 256, 50))
    elapsed = time.perf_counter() - start
    print(f"Beauty train epoch batching: {elapsed:.3f} s for {n} batches")
    assert n == num_train_batches(sp.train, 256) and elapsed < 5


def test_real_ml100k() -> None:
    ds = load_dataset(_real("recbole-ml-100k"))
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100_000)
    assert "class" in [f.name for f in ds.features]
    only_class = read_recbole(_real("recbole-ml-100k/ml-100k.inter"), feature_columns=["class"])
    assert [f.name for f in only_class.features] == ["class"] and only_class.features[0].num_values > 10


def test_real_amazon_toy_game() -> None:
    ds = load_dataset(_real("crossdomain/amazon_toy_game.tsv"))
    assert ds.num_users == 7_996 and ds.num_items == 49_603 and ds.num_domains == 2
    assert ds.items[ds.domains == 0].max() <= 37_868 and ds.items[ds.domains == 1].min() >= 37_869


def test_real_kuairand() -> None:
    path = _real("crossdomain/kuairand_cdsr.tsv.gz")
    start = time.perf_counter()
    ds = load_dataset(path)
    elapsed = time.perf_counter() - start
    print(f"KuaiRand loaded in {elapsed:.3f} s: {ds.summary()}")
    assert elapsed < 20
    _eq(np.bincount(ds.split, minlength=3), [3_101, 1_000, 1_000])
    assert ds.num_users == 5_101 and ds.lengths().max() <= 800
    assert ds.num_items == len(np.unique(ds.items)) and 940_000 < ds.num_items < 950_000
    _eq(ds.domain_ids, [0, 1, 4, 7, 8, 9, 11])
    sp = split_dataset(ds)
    assert (sp.train.num_users, len(sp.valid), len(sp.test)) == (3_101, 1_000, 1_000)
