"""Bookkeeping for restarts: how often a stage started, how far it got, whether it finished.

- `AttemptLog` (rank 0, inside a stage): `<stage dir>/attempts.json` counts the starts of the
  stage's training loop in this run and the highest step any start reached, so a restart
  knows how many steps it redoes (those between its resume checkpoint and that high water).
- `finished_result` / `mark_finished` (the driver): `<stage dir>/finished.json` holds a stage's
  result with a fingerprint of the config sections it depends on; re-running the same run
  name with the same config skips the stage instead of retraining it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.checkpoint import is_committed
from pipeline.config import RunConfig, to_dict

log = logging.getLogger("transferline.resume")

ATTEMPTS_FILE = "attempts.json"
FINISHED_FILE = "finished.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class AttemptLog:
    """Starts and progress of one stage's training loop; a no-op on ranks other than 0."""

    def __init__(self, stage_dir: Path, enabled: bool = True) -> None:
        self.path = Path(stage_dir) / ATTEMPTS_FILE
        self.enabled = enabled
        self.attempts = 1
        self.steps_redone = 0
        self.high_water_step = 0
        self.previous_high_water = 0

    def begin(self, resumed_from_step: int) -> None:
        """Count this start; steps between the resume point and the last high water are redone."""
        if not self.enabled:
            return
        before = _read_json(self.path) or {}
        self.attempts = int(before.get("attempts", 0)) + 1
        self.previous_high_water = int(before.get("high_water_step", 0))
        self.steps_redone = int(before.get("steps_redone", 0)) + max(0, self.previous_high_water - resumed_from_step)
        self.high_water_step = max(self.previous_high_water, resumed_from_step)
        if self.attempts > 1:
            log.warning("attempt %d of this stage: resuming from step %d (an earlier attempt reached step %d%s)",
                        self.attempts, resumed_from_step, self.previous_high_water,
                        "; no committed checkpoint to resume from, so from the start" if resumed_from_step == 0
                        and self.previous_high_water else "")
        self._save()

    def reached(self, step: int) -> None:
        """Called after every optimiser step (a small local write: cheap next to a step)."""
        if self.enabled and step > self.high_water_step:
            self.high_water_step = step
            self._save()

    def _save(self) -> None:
        _write_json(self.path, {"attempts": self.attempts, "high_water_step": self.high_water_step,
                                "steps_redone": self.steps_redone})


def stage_fingerprint(cfg: RunConfig, stage: str) -> str:
    """Hash of the config sections a stage's result depends on."""
    full = to_dict(cfg)
    sections = ["pretrain"] if stage == "pretrain" else ["finetune", "scratch"]
    relevant = {k: full[k] for k in sections}
    if "finetune" in relevant and not relevant["finetune"].get("targets"):
        # A suite target's config has none; without this, adding the key changed every fingerprint.
        relevant["finetune"] = {k: v for k, v in relevant["finetune"].items() if k != "targets"}
    relevant["name"] = full["name"]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _checkpoint_present(path: str) -> bool:
    if storage.is_remote(path):
        return storage.exists(path)
    return is_committed(path)


def finished_result(cfg: RunConfig, stage: str, *, say: bool = True) -> dict[str, Any] | None:
    """The stored result when `stage` already finished in this run with this config, else None
    (``say``: log why a stored result is not used)."""
    path = Path(cfg.output_dir) / stage / FINISHED_FILE
    done = _read_json(path)
    if not done:
        return None
    if done.get("fingerprint") != stage_fingerprint(cfg, stage):
        if say:
            log.info("%s: finished before with another config; running it again", stage)
        return None
    result = done["result"]
    ckpt = result.get("checkpoint")
    if stage == "pretrain" and (not ckpt or not _checkpoint_present(ckpt)):
        if say:
            log.info("%s: finished before but its checkpoint %s is gone; running it again", stage, ckpt)
        return None
    return result


def mark_finished(cfg: RunConfig, stage: str, result: dict[str, Any]) -> None:
    _write_json(Path(cfg.output_dir) / stage / FINISHED_FILE,
                {"fingerprint": stage_fingerprint(cfg, stage), "result": result})
