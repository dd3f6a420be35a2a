"""The run configuration's schema: small typed dataclasses, each validating its own keys.

A `RunConfig` is a tree of them (`pretrain.optim`, `finetune.targets[i].data`, ...). Every field
carries a docstring; `???` marks what a user must give. Every error is a `ConfigError` whose
message starts with the full key (`pretrain.optim.lr: ...`). Loading, overrides and saving live
in `pipeline.config`, the only module that imports omegaconf.
"""

from pipeline.schema._base import MISSING, ConfigError, ModelConfig, OptimConfig
from pipeline.schema.finetune import (
    STRATEGIES,
    AutoConfig,
    FinetuneConfig,
    ScratchConfig,
    TargetConfig,
    TargetDataConfig,
    target_name,
)
from pipeline.schema.pretrain import PretrainConfig, ShardDataConfig, ShardSourceConfig
from pipeline.schema.run import (
    STORAGE_SCHEMES,
    EngineConfig,
    FailureConfig,
    LauncherConfig,
    RunConfig,
    TrackingConfig,
    stages_for,
)

__all__ = [
    "MISSING", "STORAGE_SCHEMES", "STRATEGIES", "AutoConfig", "ConfigError", "EngineConfig", "FailureConfig", "FinetuneConfig",
    "LauncherConfig", "ModelConfig", "OptimConfig", "PretrainConfig", "RunConfig", "ScratchConfig",
    "ShardDataConfig", "ShardSourceConfig", "TargetConfig", "TargetDataConfig", "TrackingConfig",
    "stages_for", "target_name",
]
