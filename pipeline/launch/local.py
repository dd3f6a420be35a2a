"""Run stages in this process on one device (CPU or one GPU), or under torchrun.

No Ray here: a single-GPU box need not have it installed. Re-running a stopped run (same
name) resumes stage one from the newest committed checkpoint in its folder. Stage two's trials
(every target's fine-tune, scratch baseline and `assess`) run one after another; the Ray
launcher runs the same `run_trial` as parallel tasks.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.checkpoint import latest_checkpoint
from pipeline.config import RunConfig
from pipeline.distributed import init_from_env, resolve_device
from pipeline.launch.base import LocalReporter, Trial
from pipeline.suite import stage_kind


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


def run_trial(label: str, cfg: RunConfig) -> dict[str, Any]:
    """One stage-two trial in this process: a target's `finetune` or `scratch` stage, or its
    `assess` (transferability scores and the cross-validated gain over scratch)."""
    if stage_kind(label) == "assess":
        import torch

        from pipeline.assess import assess
        from pipeline.storage import fetch_checkpoint

        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        # The trial's device (a GPU share under Ray), as the fine-tunes it predicts use.
        device = str(resolve_device(cfg.engine.device))
        return assess(cfg, str(fetch_checkpoint(cfg.finetune.init_from)), device=device)
    return run_stage_local(label, cfg)


class LocalLauncher:
    """Every stage in this process, one after another."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> "LocalLauncher":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def run_stage(self, stage: str, cfg: RunConfig, command: str) -> dict[str, Any]:
        return run_stage_local(stage, cfg)

    def run_trials(self, trials: list[Trial], command: str,
                   on_done: Callable[[Trial, dict[str, Any]], None]) -> None:
        for t in trials:
            on_done(t, run_trial(t.label, t.cfg))
