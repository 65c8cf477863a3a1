"""Sequential recommenders built on fastattn's kernels (one file per model, a config dataclass each).

Every model is a `SequentialRecommender`: `losses(TrainBatch)`, `user_vectors(EvalBatch)` and
`item_table()`; batches are left padded (`fastattn.data.batch`).
"""
from .autocdsr import AutoCDSR, AutoCDSRConfig, AutoCDSRPlus, AutoCDSRPlusConfig
from .base import SequentialRecommender
from .difsr import DIFSR, DIFSRConfig
from .man import MAN, MANConfig
from .mqsa_ted import MQSATED, MQSATEDConfig
from .sasrec import SASRec, SASRecConfig

__all__ = ["AutoCDSR", "AutoCDSRConfig", "AutoCDSRPlus", "AutoCDSRPlusConfig", "DIFSR", "DIFSRConfig", "MAN", "MANConfig", "MQSATED", "MQSATEDConfig", "SASRec", "SASRecConfig", "SequentialRecommender"]
