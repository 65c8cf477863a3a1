#!/usr/bin/env python
"""Peer benchmark: RecBole 1.2.1 SASRec on Amazon Beauty (CPU).

Standalone: it does NOT import fastattn and is meant to be run with a separate
virtual environment that holds RecBole (kept outside the repository):

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install torch==2.13.0          # CPU build, FIRST
    /work/recbole-venv/bin/pip install --no-deps recbole==1.2.1
    /work/recbole-venv/bin/pip install "numpy<2" scipy "pandas<3" pyyaml \
        colorlog==4.7.2 colorama==0.4.4 tqdm texttable tabulate \
        tensorboard scikit-learn

Exact versions that worked (Python 3.11.7, 2-core AMD EPYC, no GPU):
    torch==2.13.0+cpu  recbole==1.2.1  numpy==1.26.4  scipy==1.17.1
    pandas==2.3.3  pyyaml==6.0.4  colorlog==4.7.2  colorama==0.4.4
    tqdm==4.70.1  texttable==1.7.2  tabulate==0.10.0  tensorboard==2.21.0
    scikit-learn==1.9.1
(`recbole.quick_start` imports ray, so this script avoids it and uses the
explicit Config / create_dataset / data_preparation / Trainer path instead;
ray, thop, psutil and plotly are then not needed.  pandas<3 because RecBole's
`_fill_nan` uses chained `fillna(inplace=True)`, a silent no-op under pandas 3
copy-on-write (harmless here, the data has no NaN, but pandas 2 keeps RecBole's
intended behaviour).  RecBole's own
`Trainer.evaluate(load_best_model=True)` calls `torch.load` without
`weights_only=False`, which fails on torch>=2.6 because the checkpoint holds
the Config object, so the best checkpoint is reloaded here explicitly.)

What it does:
  1. converts the S3-Rec style Beauty.txt (`user item item ...`, one user per
     line, chronological) to a RecBole atomic file `beauty.inter`
     (user_id:token, item_id:token, timestamp:float with timestamp = position
     in the user's sequence) inside a temporary directory;
  2. trains RecBole's SASRec (CE loss over all items, no negative sampling)
     with the settings in SETTINGS below, timing each epoch's training
     (`Trainer._train_epoch`) separately from its validation
     (`Trainer._valid_epoch`);
  3. evaluates the test split with the checkpoint of the best validation
     NDCG@10 epoch and writes a JSON report.

Reproduce (the committed result used --threads 1: on the shared 2-core box
two OpenMP threads competing with other jobs spin-waited, >20 min/epoch;
uncontended, torch's default 2 threads took ~186 s/epoch, 1 thread ~270-300 s):
    /work/recbole-venv/bin/python bench/studies/peer_recbole.py --epochs 20 --threads 1 \
        --out bench/results/peer-recbole-beauty.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_DATA = "/work/shared/data/s3rec/Beauty.txt"
DATASET = "beauty"


def settings(epochs: int, seed: int, eval_batch_size: int) -> dict:
    return {
        "model": "SASRec",
        "dataset": DATASET,
        # model
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "hidden_size": 64,
        "n_layers": 2,
        "n_heads": 2,
        "inner_size": 256,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "MAX_ITEM_LIST_LENGTH": 50,
        # training
        "learning_rate": 0.001,
        "learner": "adam",
        "weight_decay": 0.0,
        "train_batch_size": 256,
        "eval_batch_size": eval_batch_size,
        "epochs": epochs,
        "eval_step": 1,
        "stopping_step": 10**6,  # never stop early: all epochs run
        # evaluation
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "mode": "full",
            "group_by": "user",
        },
        "metrics": ["Hit", "NDCG"],
        "topk": [5, 10, 20],
        "valid_metric": "NDCG@10",
        # data
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        # environment
        "use_gpu": False,
        "gpu_id": "",
        "seed": seed,
        "reproducibility": True,
        "show_progress": False,
        "worker": 0,
    }


def convert(src: str, dst_dir: str) -> dict:
    """Beauty.txt -> <dst_dir>/beauty/beauty.inter; returns raw counts."""
    os.makedirs(os.path.join(dst_dir, DATASET), exist_ok=True)
    path = os.path.join(dst_dir, DATASET, f"{DATASET}.inter")
    users, items, n_inter = set(), set(), 0
    with open(src) as fin, open(path, "w") as fout:
        fout.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in fin:
            parts = line.split()
            if not parts:
                continue
            user, seq = parts[0], parts[1:]
            users.add(user)
            for pos, item in enumerate(seq):
                items.add(item)
                fout.write(f"{user}\t{item}\t{pos}\n")
                n_inter += 1
    return {"users": len(users), "items": len(items), "interactions": n_inter}


def user_histories(src: str, dataset) -> "torch.Tensor":
    """(user_num, longest sequence) int64: each user's items in RecBole's internal ids, in order,
    0-padded; row = RecBole's internal user id."""
    import torch

    seqs = {}
    with open(src) as fin:
        for line in fin:
            parts = line.split()
            if parts:
                seqs[parts[0]] = parts[1:]
    out = torch.zeros(int(dataset.user_num), max(len(v) for v in seqs.values()), dtype=torch.long)
    for user, seq in seqs.items():
        uid = int(dataset.token2id(dataset.uid_field, user))
        out[uid, : len(seq)] = torch.as_tensor(dataset.token2id(dataset.iid_field, seq), dtype=torch.long)
    return out


def machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--eval-batch-size", type=int, default=2048)
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--mask-history", action="store_true",
                    help="exclude each user's whole history from the full ranking (fastattn's "
                         "protocol, docs/training.md); RecBole 1.2.1 masks nothing for sequential models")
    args = ap.parse_args(argv)
    data_path = os.path.abspath(args.data)
    out_path = os.path.abspath(args.out) if args.out else None

    t_wall0 = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    tmp = tempfile.TemporaryDirectory(prefix="peer-recbole-")
    old_cwd = os.getcwd()
    # RecBole writes ./log/ and ./log_tensorboard/ relative to the cwd.
    os.chdir(tmp.name)
    try:
        raw = convert(data_path, tmp.name)
        print(f"converted {data_path}: {raw}", flush=True)

        cfg_dict = settings(args.epochs, args.seed, args.eval_batch_size)
        cfg_dict["data_path"] = tmp.name
        cfg_dict["checkpoint_dir"] = os.path.join(tmp.name, "saved")
        config = Config(model="SASRec", dataset=DATASET, config_dict=cfg_dict)
        init_seed(config["seed"], config["reproducibility"])
        init_logger(config)
        logger = logging.getLogger()
        # RecBole logs to stdout through its own handler; keep it.
        logger.info(config)

        t0 = time.perf_counter()
        dataset = create_dataset(config)
        logger.info(dataset)
        # before data_preparation: SequentialDataset.build() later replaces
        # inter_feat with the prefix-augmented samples (inter - users rows)
        loaded_inter_num = int(dataset.inter_num)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        t_data = time.perf_counter() - t0

        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = SASRec(config, train_data._dataset).to(config["device"])
        logger.info(model)
        n_params = sum(p.numel() for p in model.parameters())

        train_secs, valid_secs, valid_ndcg10, valid_results, losses = [], [], [], [], []
        # test metrics evaluated whenever validation NDCG@10 improves (= the
        # checkpoint RecBole keeps), so a run cut short still has a test number
        test_at_best = {"epoch": None, "metrics": None, "seconds": []}
        counts = {
            # RecBole adds padding id 0 ("[PAD]") to the user and item vocabularies
            "user_num_incl_pad": int(dataset.user_num),
            "item_num_incl_pad": int(dataset.item_num),
            "inter_num": loaded_inter_num,
            "augmented_samples_total": int(dataset.inter_num),
            "train_samples_per_epoch": len(train_data._dataset),
            "valid_samples": len(valid_data._dataset),
            "test_samples": len(test_data._dataset),
            "train_batches_per_epoch": len(train_data),
        }

        def report(status: str, **extra) -> dict:
            best_epoch = (
                max(range(len(valid_ndcg10)), key=lambda i: (valid_ndcg10[i], -i))
                if valid_ndcg10 else None
            )
            r = {
                "benchmark": "peer: RecBole SASRec on Amazon Beauty (CPU)",
                "status": status,
                "epochs_done": len(valid_ndcg10),
                "recbole_version": recbole.__version__,
                "torch_version": torch.__version__,
                "numpy_version": __import__("numpy").__version__,
                "pandas_version": __import__("pandas").__version__,
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "data": data_path,
                "raw_counts": raw,
                "recbole_counts": counts,
                "n_params": n_params,
                "mask_history": bool(args.mask_history),
                "settings": {k: v for k, v in cfg_dict.items() if k not in ("data_path", "checkpoint_dir")},
                "torch_num_threads": torch.get_num_threads(),
                "machine": machine(),
                "per_epoch_train_seconds": train_secs,
                "median_train_seconds": statistics.median(train_secs) if train_secs else None,
                "min_train_seconds": min(train_secs) if train_secs else None,
                "per_epoch_valid_seconds": valid_secs,
                "median_valid_seconds": statistics.median(valid_secs) if valid_secs else None,
                "per_epoch_train_loss": losses,
                "per_epoch_valid_ndcg10": valid_ndcg10,
                "per_epoch_valid_metrics": valid_results,
                "best_epoch": best_epoch,
                "best_valid_ndcg10": valid_ndcg10[best_epoch] if valid_ndcg10 else None,
                "best_valid_metrics": valid_results[best_epoch] if valid_results else None,
                "test_metrics_at_best_epoch": test_at_best["metrics"],
                "test_metrics_epoch": test_at_best["epoch"],
                "test_eval_seconds": test_at_best["seconds"],
                "data_prep_seconds": t_data,
                "total_wall_seconds": time.perf_counter() - t_wall0,
            }
            r.update(extra)
            return r

        def dump(r: dict) -> None:
            if out_path:
                os.makedirs(os.path.dirname(out_path), exist_ok=True)
                with open(out_path + ".tmp", "w") as f:
                    f.write(json.dumps(r, indent=2) + "\n")
                os.replace(out_path + ".tmp", out_path)

        history = user_histories(data_path, dataset) if args.mask_history else None

        class TimedTrainer(Trainer):
            def _full_sort_batch_eval(self, batched_data):
                interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
                if history is not None:
                    # timestamp = the target's position in the user's sequence, so the items
                    # before it are exactly the history (validation: the training items; test:
                    # those and the validation item). A repeated target is masked too: a miss.
                    hist = history[interaction["user_id"].cpu()]
                    pos = torch.arange(hist.shape[1])
                    before = pos[None, :] < interaction["timestamp"].cpu().long()[:, None]
                    hist = torch.where(before, hist, torch.zeros_like(hist))  # 0 = [PAD], masked anyway
                    scores.scatter_(1, hist.to(scores.device), float("-inf"))
                return interaction, scores, positive_u, positive_i

            def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
                s = time.perf_counter()
                loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
                train_secs.append(time.perf_counter() - s)
                losses.append(float(sum(loss) if isinstance(loss, tuple) else loss))
                print(f"[peer] epoch {epoch_idx} train {train_secs[-1]:.2f}s loss {losses[-1]:.4f}", flush=True)
                return loss

            def _valid_epoch(self, valid_data, show_progress=False):
                s = time.perf_counter()
                score, result = super()._valid_epoch(valid_data, show_progress)
                valid_secs.append(time.perf_counter() - s)
                epoch = len(valid_secs) - 1
                improved = not valid_ndcg10 or score > max(valid_ndcg10)
                valid_ndcg10.append(float(score))
                valid_results.append({k: float(v) for k, v in result.items()})
                print(f"[peer] epoch {epoch} valid {valid_secs[-1]:.2f}s NDCG@10 {score:.4f}", flush=True)
                if improved:
                    # eval mode, no RNG use: does not change the training run
                    s = time.perf_counter()
                    test = self.evaluate(test_data, load_best_model=False, show_progress=False)
                    test_at_best["seconds"].append(time.perf_counter() - s)
                    test_at_best["epoch"] = epoch
                    test_at_best["metrics"] = {k: float(v) for k, v in test.items()}
                    print(f"[peer] epoch {epoch} test {test_at_best['metrics']}", flush=True)
                dump(report("running"))
                return score, result

        trainer = TimedTrainer(config, model)
        t0 = time.perf_counter()
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=True, show_progress=False
        )
        t_fit = time.perf_counter() - t0

        # test with the last-epoch weights (cheap extra information)
        test_last = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        # cross-check: reload RecBole's best-validation checkpoint and re-test
        ckpt = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        model.load_other_parameter(ckpt.get("other_parameter"))
        test_ckpt = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        test_ckpt = {k: float(v) for k, v in test_ckpt.items()}
        assert ckpt["epoch"] == test_at_best["epoch"], (ckpt["epoch"], test_at_best["epoch"])
        logger.info(f"best valid: {best_valid_result}")
        logger.info(f"test (best epoch {ckpt['epoch']}): {test_ckpt}")
        final = report(
            "complete",
            test_metrics_at_best_epoch_from_checkpoint=test_ckpt,
            test_metrics_at_last_epoch={k: float(v) for k, v in test_last.items()},
            fit_seconds=t_fit,
        )
    finally:
        os.chdir(old_cwd)
        tmp.cleanup()

    print(json.dumps(final, indent=2))
    dump(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
