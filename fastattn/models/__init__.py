"""Sequential recommenders built on fastattn's kernels (one file per model, a config dataclass each).

Every model is a `SequentialRecommender`: `losses(TrainBatch)`, `user_vectors(EvalBatch)` and
`item_table()`; batches are left padded (`fastattn.data.batch`). Each model module declares a
`ModelSpec` (`SPEC`); `MODELS` (`fastattn.models.registry`) maps --model names to them and
`register` adds one from outside the package.
"""
from .autocdsr import AutoCDSR, AutoCDSRConfig
from .autocdsr_plus import AutoCDSRPlus, AutoCDSRPlusConfig
from .base import SequentialRecommender
from .bert4rec import BERT4Rec, BERT4RecConfig
from .config import EncoderConfig
from .difsr import DIFSR, DIFSRConfig
from .man import MAN, MANConfig
from .mqsa_ted import MQSATED, MQSATEDConfig
from .registry import MODELS, register, unregister
from .sasrec import SASRec, SASRecConfig
from .spec import ModelSpec

__all__ = ["AutoCDSR", "AutoCDSRConfig", "AutoCDSRPlus", "AutoCDSRPlusConfig", "BERT4Rec", "BERT4RecConfig",
           "DIFSR", "DIFSRConfig", "EncoderConfig", "MAN", "MANConfig", "MODELS", "MQSATED", "MQSATEDConfig",
           "ModelSpec", "SASRec", "SASRecConfig", "SequentialRecommender", "register", "unregister"]
