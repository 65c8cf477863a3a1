"""RecBole 1.2.1's own pipeline (Config, dataset, Trainer) on ml-100k, SASRec CE, unpatched vs patched.

    /work/recbole-venv/bin/python bench/studies/recbole_trainer_check.py {recbole|fastattn} DATA_DIR OUT_DIR

RecBole's Config needs numpy < 2 (it touches np.float_), so this runs in RecBole's own venv (pins
in bench/studies/peer_recbole.py's docstring) with the repository on PYTHONPATH. DATA_DIR must hold
ml-100k/ml-100k.{inter,item} (e.g. a symlink to ../shared/data/recbole-ml-100k). Writes
OUT_DIR/{recbole,fastattn}.json: training loss, seconds and validation HR/NDCG@10 per epoch.
Anomaly detection (switched on by RecBole's import) is off on both sides.
"""
import sys, time, json
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed
from fastattn.integrations.recbole import patch_model

torch.autograd.set_detect_anomaly(False)
patched = sys.argv[1] == "fastattn"
data_dir, out_dir = sys.argv[2], sys.argv[3]
cfg = Config(model="SASRec", dataset="ml-100k", config_dict={
    "data_path": data_dir, "train_neg_sample_args": None, "loss_type": "CE",
    "epochs": 3, "eval_step": 1, "show_progress": False, "device": "cpu", "use_gpu": False, "seed": 2020,
    "checkpoint_dir": f"{out_dir}/saved", "log_wandb": False, "train_batch_size": 2048,
    "topk": [10], "metrics": ["Hit", "NDCG"], "valid_metric": "NDCG@10"})
init_seed(cfg["seed"], cfg["reproducibility"])
ds = create_dataset(cfg)
train, valid, test = data_preparation(cfg, ds)
init_seed(cfg["seed"], cfg["reproducibility"])
model = SASRec(cfg, train.dataset)
if patched:
    patch_model(model)
trainer = Trainer(cfg, model)
losses = []
t0 = time.time()
for epoch in range(3):
    t = time.time()
    loss = trainer._train_epoch(train, epoch, show_progress=False)
    tt = time.time() - t
    res = trainer._valid_epoch(valid, show_progress=False)
    losses.append({"epoch": epoch + 1, "loss": float(loss), "train_s": round(tt, 2), "valid": {k: float(v) for k, v in res[1].items()}})
    print(losses[-1], flush=True)
with open(f"{out_dir}/{sys.argv[1]}.json", "w") as fh:
    json.dump(losses, fh, indent=1)
