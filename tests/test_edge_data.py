"""Issue 15, data side: edge and bad input to the data readers, the synthetic spec, the splitter
and SequenceDataset (fingerprint, bad ids, BOMs, empty files, ...). Each test failed on fc02d37."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fastattn.data import (ItemFeature, SequenceDataset, SyntheticConfig, load_dataset, make_synthetic,
                           read_crossdomain_tsv, read_recbole, split_dataset)


def _toy(items: list[int] | None = None, **kwargs: object) -> SequenceDataset:
    items = [3, 1, 2, 2, 4, 5, 1, 3, 4, 2] if items is None else items
    feature = ItemFeature("attributes", np.array([[0, 0], [1, 2], [0, 0], [2, 0], [0, 0], [3, 1]]), 4)
    return SequenceDataset("Toy", 5, np.array([0, 3, 5, 10]), np.array(items), features=(feature,), **kwargs)


# ------------------------------------------------------------------------------------------------
# fingerprint (issue item 7 needs it to refuse a resume on different data)
# ------------------------------------------------------------------------------------------------

def test_fingerprint_same_data_same_digest() -> None:
    a, b = _toy(), _toy()
    b.name = "renamed copy"
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    # stable across processes and machines: pinned value of sha256 over little-endian int64 bytes
    assert a.fingerprint() == "cca6b54364adb1be"


def test_fingerprint_changes_with_content() -> None:
    base = _toy().fingerprint()
    changed = [3, 1, 2, 2, 4, 5, 1, 3, 4, 1]  # one interaction differs
    assert _toy(changed).fingerprint() != base
    assert _toy(split=np.array([0, 1, 2], dtype=np.int8)).fingerprint() != base
    moved = SequenceDataset("Toy", 5, np.array([0, 4, 5, 10]), np.array([3, 1, 2, 2, 4, 5, 1, 3, 4, 2]),
                            features=_toy().features)  # same items, one moved to another user
    assert moved.fingerprint() != base
    assert SequenceDataset("Toy", 6, np.array([0, 3, 5, 10]), np.array([3, 1, 2, 2, 4, 5, 1, 3, 4, 2])
                           ).fingerprint() != SequenceDataset("Toy", 5, np.array([0, 3, 5, 10]),
                                                              np.array([3, 1, 2, 2, 4, 5, 1, 3, 4, 2])).fingerprint()
    other = ItemFeature("attributes", np.array([[0, 0], [1, 2], [0, 0], [2, 0], [0, 0], [3, 2]]), 4)
    assert SequenceDataset("Toy", 5, np.array([0, 3, 5, 10]), np.array([3, 1, 2, 2, 4, 5, 1, 3, 4, 2]),
                           features=(other,)).fingerprint() != base
    with_domains = _toy(domains=np.zeros(10, dtype=np.int64), num_domains=2)
    assert with_domains.fingerprint() != base
    assert with_domains.fingerprint() != _toy(domains=np.array([0] * 9 + [1]), num_domains=2).fingerprint()


# ------------------------------------------------------------------------------------------------
# item 6: the synthetic spec parses booleans, ints and floats strictly
# ------------------------------------------------------------------------------------------------

def test_synthetic_spec_booleans() -> None:
    shape = "num_users=30,num_items=40,num_attributes=4,max_len=30"
    for value, spellings in ((False, ["False", "false", "NO", "0", " no "]), (True, ["True", "yes", "1", "TRUE"])):
        expected = make_synthetic(SyntheticConfig(num_users=30, num_items=40, num_attributes=4, max_len=30,
                                                  allow_repeats=value))
        # 30 users of up to 30 draws from 40 items: with repeats allowed, some sequence repeats an item
        assert any(len(np.unique(s)) < len(s) for s in map(expected.sequence, range(30))) == value
        for text in spellings:
            ds = load_dataset(f"synthetic:{shape},allow_repeats={text}")
            np.testing.assert_array_equal(ds.items, expected.items, err_msg=text)


@pytest.mark.parametrize("options, message", [
    ("allow_repeats=maybe", r"allow_repeats must be true or false.*'maybe'"),
    ("allow_repeats=", r"allow_repeats must be true or false"),
    ("num_users=1.5", r"num_users must be an integer, got '1.5'"),
    ("seed=1e3", r"seed must be an integer"),
    ("noise=x", r"noise must be a finite number, got 'x'"),
    ("zipf=nan", r"zipf must be a finite number"),
    ("zipf=inf", r"zipf must be a finite number"),
    ("attrs_per_item=1", r"attrs_per_item takes 2 values joined by '-'"),
    ("attrs_per_item=1-x", r"attrs_per_item must be an integer, got 'x'"),
    ("bogus=1", r"unknown synthetic option 'bogus'"),
    ("num_users", r"synthetic option 'num_users' is not key=value"),
    ("num_users=5,num_users=6", r"num_users is given twice"),
    ("seed=-1", r"seed >= 0"),
    ("num_users=100000000000", r"num_users \* max_len"),
    ("num_items=100000000000", r"num_items \* attrs_per_item\[1\]"),
    ("num_attributes=1000000,num_items=1000000", r"num_attributes <="),
])
def test_synthetic_spec_bad_values(options: str, message: str) -> None:
    spec = "synthetic:" + options
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(spec)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"--data {spec!r}: ")


# ------------------------------------------------------------------------------------------------
# item 8: nothing to train on or to evaluate is refused when splitting
# ------------------------------------------------------------------------------------------------

def test_split_refuses_data_without_an_evaluable_user() -> None:
    ds = SequenceDataset("short", 5, np.array([0, 2, 3, 5]), np.array([1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"^data set 'short': no user has the 3 interactions leave-one-out "
                                         r"needs .*: 3 users, all dropped \(longest sequence: 2\)$"):
        split_dataset(ds)
    spec = "synthetic:num_users=7,min_len=1,max_len=2"
    with pytest.raises(ValueError, match=r"7 users, all dropped"):
        split_dataset(load_dataset(spec))


def test_split_refuses_an_empty_training_split() -> None:
    ds = SequenceDataset("three", 5, np.array([0, 3, 6]), np.array([1, 2, 3, 4, 5, 1]))  # evaluable, no training
    with pytest.raises(ValueError, match=r"^data set 'three': no user has the 4 interactions leave-one-out "
                                         r"training needs .*2 users, all dropped from training"):
        split_dataset(ds)
    ok = SequenceDataset("four", 5, np.array([0, 4, 7]), np.array([1, 2, 3, 4, 5, 1, 2]))
    sp = split_dataset(ok)  # one trainable user is enough
    assert sp.train.num_users == 1 and len(sp.test) == 2


KUAI_HEADER = "split\tseq_id\titems\tdomains\n"


@pytest.mark.parametrize("rows, message", [
    (["evaluation\t1\t1 2\t0 0", "testing\t2\t1 2\t0 0"], r"training split is empty \(no sequence is marked "
                                                            r"'training', 2 sequences in all\)"),
    (["training\t1\t5\t0", "evaluation\t2\t1 2\t0 0", "testing\t3\t1 2\t0 0"],
     r"training split is empty \(1 training sequence, none with the 2 items"),
    (["training\t1\t1 2\t0 0", "testing\t3\t1 2\t0 0"], r"evaluation split is empty"),
    (["training\t1\t1 2\t0 0", "evaluation\t2\t1 2\t0 0", "testing\t3\t4\t1", "testing\t4\t3\t1"],
     r"testing split is empty \(2 testing sequences, none with the 2 items"),
])
def test_split_refuses_an_empty_predefined_split(tmp_path: Path, rows: list[str], message: str) -> None:
    path = tmp_path / "kuai.tsv"
    path.write_text(KUAI_HEADER + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"^data set 'kuai': the predefined " + message):
        split_dataset(load_dataset(path))


# ------------------------------------------------------------------------------------------------
# item 12: sparse ids that would allocate huge tables are refused, naming the file and line
# ------------------------------------------------------------------------------------------------

def _refused(call: Callable[[], object], path: Path, message: str) -> None:
    """call() raises a one-line ValueError: `path` then the regex `message`."""
    with pytest.raises(ValueError, match="^" + re.escape(str(path)) + message) as info:
        call()
    assert "\n" not in str(info.value)


def test_huge_item_id_s3rec(tmp_path: Path) -> None:
    path = tmp_path / "Toy.txt"
    path.write_text("1 3 1 2\n\n2 2 100000000000 4\n")
    _refused(lambda: load_dataset(path), path, r", line 3: item id 100000000000 is far larger than the "
                                                r"5 distinct item ids .*renumber")
    path.write_text("1 3 1 2\n2 2 1000000 4\n")  # sparse, but small enough to allocate: kept as read
    assert load_dataset(path).num_items == 1_000_000


def test_huge_item_id_tsv(tmp_path: Path) -> None:
    path = tmp_path / "toygame.tsv"
    path.write_text("user\titems\tdomains\n1\t1 2 3\t0 0 1\n2\t2 99999999999\t1 1\n")
    _refused(lambda: load_dataset(path), path, r", line 3: item id 99999999999 is far larger")
    ds = read_crossdomain_tsv(path, remap_items=True)  # remapped densely: nothing to refuse
    assert ds.num_items == 4 and list(ds.item_ids) == [-1, 1, 2, 3, 99999999999]
    split = tmp_path / "kuai.tsv.gz"  # the KuaiRand layout remaps by default
    split.write_bytes(gzip.compress(b"split\tseq_id\titems\tdomains\ntraining\t1\t5 100000000000 7\t9 9 4\n"))
    assert read_crossdomain_tsv(split).num_items == 3


def test_huge_attribute_id(tmp_path: Path) -> None:
    (tmp_path / "Toy.txt").write_text("1 3 1 2\n2 2 4\n")
    attrs = tmp_path / "Toy_item2attributes.json"
    attrs.write_text('{\n"1": [1, 2],\n"2": [3],\n"4": [100000000000]\n}')
    load = lambda: load_dataset(tmp_path / "Toy.txt")  # noqa: E731
    _refused(load, attrs, r", line 4: attribute id 100000000000 is far larger than the 4 distinct")
    attrs.write_text('{"1": [100000000000000000000]}')  # beyond int64: an error, not an OverflowError
    _refused(load, attrs, r", line 1: .*fit in 64 bits")


def test_huge_attribute_matrix(tmp_path: Path) -> None:
    (tmp_path / "Toy.txt").write_text("1 1 1000000\n")
    attrs = tmp_path / "Toy_item2attributes.json"
    attrs.write_text(json.dumps({"1": [1], "1000000": list(range(1, 41))}))
    _refused(lambda: load_dataset(tmp_path / "Toy.txt"), attrs,
             r", line 1: item 1000000 has 40 attribute ids; a \(1,000,001 x 40\)")


# ------------------------------------------------------------------------------------------------
# item 14: the empty-attributes error names the file; a UTF-8 BOM is accepted by every reader
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["{}", '{"1": []}', '{"9": [1, 2]}'])
def test_empty_item2attributes_names_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "Toy.txt").write_text("1 3 1 2\n2 2 4\n")
    attrs = tmp_path / "Toy_item2attributes.json"
    attrs.write_text(content)
    _refused(lambda: load_dataset(tmp_path / "Toy.txt"), attrs, r": no attribute ids for any of the 4 items")


def test_empty_recbole_item_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "ml.inter").write_text("user_id:token\titem_id:token\n1\t2\n1\t3\n")
    item = tmp_path / "ml.item"
    item.write_text("item_id:token\tclass:token_seq\n2\t\n3\t\n")
    _refused(lambda: load_dataset(tmp_path), item, r": no value in column class for any item")
    _refused(lambda: read_recbole(tmp_path, feature_columns=["class"]), item,
             r": column 'class' has no value for any item")
    item.write_text("item_id:token\tclass:token_seq\n")
    _refused(lambda: load_dataset(tmp_path), item, r": no item rows after the header")
    item.write_text("item_id:token\tclass:token_seq\ttag:token\n2\ta\t\n3\t\t\n")  # an empty column is skipped
    assert [f.name for f in load_dataset(tmp_path).features] == ["class"]


BOM = "\ufeff"


def _bom_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    return {
        "s3rec": (tmp_path / "a" / "Toy.txt", "1 3 1 2 4\n2 2 4 1 5\n"),
        "json": (tmp_path / "a" / "Toy_item2attributes.json", '{"1": [1, 2], "3": [2]}'),
        "inter": (tmp_path / "b" / "ml.inter", "user_id:token\titem_id:token\n1\t2\n1\t3\n1\t4\n1\t5\n"),
        "item": (tmp_path / "b" / "ml.item", "item_id:token\tclass:token_seq\n2\tx y\n3\tz\n"),
        "tsv": (tmp_path / "c" / "toygame.tsv", "user\titems\tdomains\n1\t1 2 3 4\t0 0 1 1\n"),
        "tsv.gz": (tmp_path / "d" / "kuai.tsv.gz", KUAI_HEADER + "training\t1\t5 6 7\t0 0 1\n"
                   "evaluation\t2\t5 6\t1 1\ntesting\t3\t7 5\t0 1\n"),
    }


def _write_case(path: Path, text: str) -> None:
    path.parent.mkdir(exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("which", ["s3rec", "json", "inter", "item", "tsv", "tsv.gz"])
def test_utf8_bom_is_accepted(tmp_path: Path, which: str) -> None:
    cases = _bom_cases(tmp_path)
    for path, text in cases.values():
        _write_case(path, text)
    load = {"s3rec": "a/Toy.txt", "json": "a/Toy.txt", "inter": "b", "item": "b", "tsv": "c/toygame.tsv",
            "tsv.gz": "d/kuai.tsv.gz"}[which]
    plain = load_dataset(tmp_path / load)
    path, text = cases[which]
    _write_case(path, BOM + text)
    with_bom = load_dataset(tmp_path / load)
    assert with_bom.fingerprint() == plain.fingerprint() and with_bom.summary() == plain.summary()
    if which in ("json", "item"):
        assert with_bom.features  # the feature file was read, not skipped


def test_bom_in_a_file_of_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(BOM + "user\titems\tdomains\n1\t1 2 3 4\t0 0 1 1\n")  # format inferred from line 1
    assert load_dataset(path).num_interactions == 4


# ------------------------------------------------------------------------------------------------
# other bad input a new user hits: one line naming the file (and line)
# ------------------------------------------------------------------------------------------------

def test_nan_timestamp_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ml.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\tnan\n1\t4\t7\n")
    _refused(lambda: load_dataset(path), path, r", line 3: timestamp 'nan' is not a finite number")
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\tx\n")
    _refused(lambda: load_dataset(path), path, r", line 3: timestamp 'x' is not a finite number")
