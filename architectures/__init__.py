"""Model library: a registry of architectures that all follow one transfer-learning contract.

    model = create_model("hybrid_tiny", num_classes=10, in_chans=1)
    model = create_model("my_pkg.models:build", num_classes=10)   # a user's own model

The contract (forward_features / forward_head / reset_classifier / transfer_blocks / ...)
is described in `architectures._contract`. This package never imports `pipeline`.
"""

from . import hybrid, resnet  # noqa: F401  (importing the families registers their models)
from ._contract import (
    ParamPartition,
    TransferModel,
    check_contract,
    param_in_prefix,
    partition_parameters,
)
from ._registry import create_model, get_model_factory, is_model, list_models, register_model

__all__ = [
    "ParamPartition",
    "TransferModel",
    "check_contract",
    "create_model",
    "get_model_factory",
    "is_model",
    "list_models",
    "param_in_prefix",
    "partition_parameters",
    "register_model",
]
