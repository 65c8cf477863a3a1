"""Data for sequential recommenders: readers for the public formats, splits, padded batches and a
synthetic generator (numpy only; no dependency on `fastattn.models` or Triton).

    ds = load_dataset("../shared/data/s3rec/Beauty.txt")      # or "synthetic"
    splits = split_dataset(ds)                                  # leave-one-out or predefined
    for batch in train_batches(splits.train, 256, 50, epoch=e): ...   # TrainBatch
    for batch in eval_batches(splits.test, ds.features, 512, 50): ...  # EvalBatch
"""
from .batch import EvalBatch, TrainBatch
from .batching import BATCH_UNITS, batch_rows, eval_batches, num_train_batches, train_batches, train_order
from .dataset import ItemFeature, SequenceDataset
from .readers import FORMATS, load_dataset, read_crossdomain_tsv, read_recbole, read_s3rec
from .splits import EvalSet, Splits, split_dataset
from .synthetic import SyntheticConfig, make_synthetic

__all__ = ["BATCH_UNITS", "EvalBatch", "EvalSet", "FORMATS", "ItemFeature", "SequenceDataset", "Splits",
           "SyntheticConfig", "TrainBatch", "batch_rows", "eval_batches", "load_dataset", "make_synthetic",
           "num_train_batches", "read_crossdomain_tsv", "read_recbole", "read_s3rec", "split_dataset",
           "train_batches", "train_order"]
