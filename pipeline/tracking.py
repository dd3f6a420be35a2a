"""Experiment tracking: Weights & Biases on rank 0, a null tracker everywhere else.

Offline by default (files under `<output_dir>/wandb`, `wandb sync` later); online when
`tracking.mode=online` and WANDB_API_KEY is set. If W&B cannot start, training goes on with a
single warning: tracking must never cost a run.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    """Tracks nothing; used on ranks > 0 and when tracking is disabled."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_files(self, paths: list[Path], name: str, type: str) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id = run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # a tracking hiccup must not stop training
            log.warning("W&B log failed (%s); continuing", e)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def log_files(self, paths: list[Path], name: str, type: str) -> None:
        import wandb

        art = wandb.Artifact(name, type=type)
        for p in paths:
            if p.is_dir():
                art.add_dir(str(p))
            elif p.exists():
                art.add_file(str(p))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


def _wandb_mode(mode: str) -> str | None:
    if mode == "disabled":
        return None
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        warnings.warn("tracking.mode=online but WANDB_API_KEY is not set: logging offline instead", stacklevel=2)
        return "offline"
    return mode


def start_tracker(
    *,
    mode: str,
    project: str,
    entity: str,
    group: str,
    job_type: str,
    run_id: str,
    output_dir: Path,
    config: dict[str, Any],
    is_main: bool,
) -> NullTracker:
    """A W&B run for one stage on rank 0. `run_id` is stable per (run, stage), so a stage that
    Ray restarts continues the same W&B run."""
    wb_mode = _wandb_mode(mode)
    if not is_main or wb_mode is None:
        return NullTracker()
    try:
        import wandb

        output_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=project,
            entity=entity or None,
            group=group,
            job_type=job_type,
            name=f"{group}-{job_type}",
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            mode=wb_mode,
            config=config,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        return WandbTracker(run)
    except Exception as e:
        warnings.warn(f"W&B could not start ({type(e).__name__}: {e}); training continues untracked", stacklevel=2)
        return NullTracker()
