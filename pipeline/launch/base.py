"""The contract between a stage and whatever launched it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.suite import stage_run_name

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def ray_storage_path(cfg: RunConfig) -> str:
    """Where Ray Train persists a run's checkpoints: `launcher.storage_path`, else `<output_dir>/ray`."""
    return cfg.launcher.storage_path or str(Path(cfg.output_dir) / "ray")


def ray_run_name(cfg: RunConfig, stage: str) -> str:
    """Ray Train's run name for one stage; its checkpoints are `<storage>/<run name>/checkpoint_*`."""
    return stage_run_name(cfg.name, stage)


class Reporter(Protocol):
    """How a stage hands results to its launcher.

    `report` is called by every rank the same number of times (a barrier under Ray); only
    rank 0 passes a checkpoint directory. `resume_checkpoint` is where a restarted stage picks
    up, or None for a fresh start.
    """

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None: ...

    def resume_checkpoint(self) -> Path | None: ...

    #: Whether stage one prunes its checkpoint root itself (False: the launcher deletes what it uploaded).
    prunes_local: bool

    def checkpoint_root(self, default: Path) -> Path:
        """Where rank 0 writes checkpoints before reporting them."""
        ...

    def notice(self, step: int) -> tuple[int, str]:
        """After every step, on every rank: `(stopping.NONE | CHECKPOINT | STOP, reason)` (a SIGTERM
        asks to stop; a preemption notice to checkpoint)."""
        ...


class LocalReporter:
    """In-process: checkpoints stay where the stage wrote them; the last one is remembered.

    `resume_from` is where a re-run of a stopped run picks up (the newest committed checkpoint
    in the stage's folder), or None.
    """

    #: Stage one deletes its own older checkpoints (`pretrain.keep_checkpoints`).
    prunes_local = True

    def __init__(self, resume_from: Path | None = None) -> None:
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, Any]] = []
        self.resume_from = resume_from

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is not None:
            self.last_checkpoint = Path(checkpoint_dir)

    def resume_checkpoint(self) -> Path | None:
        return self.resume_from

    def notice(self, step: int) -> tuple[int, str]:
        from pipeline.stopping import NONE, STOP, stop_requested

        reason = stop_requested()
        return (STOP, reason) if reason else (NONE, "")

    def checkpoint_root(self, default: Path) -> Path:
        return default


@dataclass(frozen=True)
class Trial:
    """One stage-two job: a target's `finetune`, `scratch` or `assess` under its stage label, with
    the config that target's stages see. Trials are independent of each other, so a launcher
    may run them in any order or at once."""
    label: str
    cfg: RunConfig
