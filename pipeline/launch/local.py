"""Run a stage in this process on one device (CPU or one GPU), or under torchrun.

No Ray here: a single-GPU box need not have it installed. Re-running a stopped run (same
name) resumes stage one from the newest committed checkpoint in its folder.
"""

from __future__ import annotations

from typing import Any

from pipeline.checkpoint import latest_checkpoint
from pipeline.config import RunConfig
from pipeline.distributed import init_from_env
from pipeline.launch.base import LocalReporter


def run_stage_local(stage: str, cfg: RunConfig) -> dict[str, Any]:
    from pipeline.inputs import stage_dir
    from pipeline.stages import run_stage

    ctx = init_from_env(cfg.engine.device)
    # Torn saves (no commit marker) are skipped by latest_checkpoint.
    resume = latest_checkpoint(stage_dir(cfg, stage) / "checkpoints") if stage == "pretrain" else None
    reporter = LocalReporter(resume_from=resume)
    result = run_stage(stage, cfg, reporter, ctx)
    if reporter.last_checkpoint is not None:
        result["checkpoint"] = str(reporter.last_checkpoint)
    elif resume is not None and result.get("resumed_from_step") == cfg.pretrain.steps:
        result["checkpoint"] = str(resume)  # nothing left to train: the resumed checkpoint is the result
    return result
