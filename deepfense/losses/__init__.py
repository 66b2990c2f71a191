"""Loss heads (AMSoftmax, ASoftmax, OCSoftmax, CrossEntropy, ArcFace, CombinedMargin and the adaptive-margin face heads
AdaFace, MagFace, ElasticFace, CurricularFace), the margin scheduler, their multi-loss sum, the config registry and
toolkit checkpoint loading."""

from .checks import (LossConfigError, MissingKeyError, UnknownKeyError, UnknownLossError, WrongTypeError)
from .config import REQUIRED, build_loss, get_loss_class, list_losses, loss_signature, register_loss
from .checkpoints import load_head_weight
from .margins import ArcFace, CombinedMargin, MarginScheduler
from .adaptive import AdaFace, CurricularFace, ElasticFace, MagFace
from .modules import AMSoftmax, ASoftmax, CrossEntropy, MultiLoss, OCSoftmax

__all__ = ["AMSoftmax", "ASoftmax", "OCSoftmax", "CrossEntropy", "ArcFace", "CombinedMargin", "MarginScheduler",
           "AdaFace", "MagFace", "ElasticFace", "CurricularFace",
           "load_head_weight",
           "MultiLoss", "build_loss", "register_loss",
           "list_losses", "loss_signature", "get_loss_class", "REQUIRED", "LossConfigError", "UnknownLossError",
           "UnknownKeyError", "MissingKeyError", "WrongTypeError"]
