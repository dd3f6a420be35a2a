"""Run a stage in this process on one device (CPU or one GPU), or under torchrun.

No Ray here: a single-GPU box need not have it installed.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from pipeline.distributed import init_from_env
from pipeline.launch.base import LocalReporter


def run_stage_local(stage: str, cfg: RunConfig) -> dict[str, Any]:
    from pipeline.stages import run_stage

    ctx = init_from_env(cfg.engine.device)
    reporter = LocalReporter()
    result = run_stage(stage, cfg, reporter, ctx)
    if reporter.last_checkpoint is not None:
        result["checkpoint"] = str(reporter.last_checkpoint)
    return result
