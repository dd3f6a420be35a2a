"""The resume policy and the bookkeeping for restarts.

- `check_resumable` / `check_resume_point`: a run resumes only a checkpoint of its own model
  trained with its own settings (`RESUME_MAY_CHANGE` lists the keys that may differ); the
  driver checks the checkpoint a re-run would resume before any worker starts.

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
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.checkpoint import is_committed, latest_checkpoint, load_meta, load_train_state
from pipeline.config import ConfigError, RunConfig, to_dict
from pipeline.fileio import read_json, write_json_atomic
from pipeline.redact import redact_secrets
from pipeline.inputs import pretrain_meta, shard_normalisation, stage_dir
from pipeline.launch.base import ray_run_name, ray_storage_path

log = logging.getLogger("transferline.resume")

ATTEMPTS_FILE = "attempts.json"
FINISHED_FILE = "finished.json"


class AttemptLog:
    """Starts and progress of one stage's training loop; a no-op on ranks other than 0."""

    def __init__(self, stage_dir: Path, enabled: bool = True) -> None:
        self.path = Path(stage_dir) / ATTEMPTS_FILE
        self.enabled = enabled
        self.attempts = 1
        self.steps_redone = 0
        self.high_water_step = 0
        self.previous_high_water = 0
        self.world_sizes: list[list[int]] = []
        """`[world_size, first_step, last_step]` per start: an elastic run's sizes and the steps each trained."""

    def begin(self, resumed_from_step: int, world_size: int = 1) -> None:
        """Count this start; steps between the resume point and the last high water are redone."""
        if not self.enabled:
            return
        before = read_json(self.path) or {}
        self.world_sizes = [list(w) for w in before.get("world_sizes", [])] + [
            [world_size, resumed_from_step + 1, resumed_from_step]]
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
        if not self.enabled:
            return
        if self.world_sizes:
            self.world_sizes[-1][2] = max(self.world_sizes[-1][2], step)
        if step > self.high_water_step:
            self.high_water_step = step
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, {"attempts": self.attempts, "high_water_step": self.high_water_step,
                                      "steps_redone": self.steps_redone, "world_sizes": self.world_sizes})


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
    path = stage_dir(cfg, stage) / FINISHED_FILE
    done = read_json(path)
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
    """Store a finished stage's result, with any secret that slipped into it (a target path
    holding a token, say) redacted, as in summary.json."""
    write_json_atomic(stage_dir(cfg, stage) / FINISHED_FILE,
                      {"fingerprint": stage_fingerprint(cfg, stage), "result": redact_secrets(result)})


#: `pretrain` keys a resumed run may change: they decide how a run is carried out, not what it
#: learns (checkpointing, monitoring, loader processes, fetch retries, where JPEGs are decoded).
RESUME_MAY_CHANGE = frozenset({
    "enabled", "checkpoint_every", "keep_checkpoints", "monitor_every", "monitor_shots", "monitor_queries",
    "data.num_workers", "data.retries", "data.retry_delay", "data.timeout", "data.shard_errors",
    "data.allow_pipe", "data.decode",
})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(ckpt_meta: dict[str, Any], meta: dict[str, Any], run: str) -> None:
    """A run resumes only a checkpoint of the same model trained with the same `pretrain` settings
    (those outside `RESUME_MAY_CHANGE`); anything else names the differences and how to start fresh.

    Keys the checkpoint's config does not have (added to the config schema since) are not compared.
    """
    keys = ("name", "kwargs", "num_classes", "in_chans")
    ours = json.loads(json.dumps({k: meta[k] for k in keys}))  # as meta.json stores it (tuples -> lists)
    diff = [f"{k}: checkpoint {ckpt_meta.get(k)!r} vs config {ours[k]!r}" for k in keys if ckpt_meta.get(k) != ours[k]]
    if diff:
        raise ValueError(f"pretrain: run {run!r} has a checkpoint at step {ckpt_meta.get('step')} of another model "
                         f"({'; '.join(diff)}); use a new run name to start fresh")
    then = _flatten(ckpt_meta.get("config") or {})
    now = _flatten(json.loads(json.dumps(meta.get("config") or {})))
    changed = [f"pretrain.{k}: checkpoint {then[k]!r} vs config {now.get(k)!r}" for k in sorted(then)
               if k not in RESUME_MAY_CHANGE and then[k] != now.get(k)]
    if changed:
        raise ValueError(f"pretrain: run {run!r} has a checkpoint at step {ckpt_meta.get('step')} trained with other "
                         f"settings ({'; '.join(changed)}); resuming it would mix the two. Use a new run name to "
                         f"start fresh, or the checkpoint's settings to continue it")


def _resume_point(cfg: RunConfig) -> tuple[dict[str, Any] | None, str, Path | None]:
    """`(meta, where, local step dir)` of the committed stage-one checkpoint a re-run of this name
    resumes from (meta None: it starts fresh): under Ray, the one Ray's checkpoint manager
    registered last; locally, the newest committed step folder."""
    if cfg.launcher.kind == "ray":
        point = storage.ray_resume_point(f"{ray_storage_path(cfg).rstrip('/')}/{ray_run_name(cfg, 'pretrain')}")
        return (point[0], point[1], None) if point is not None else (None, "", None)
    latest = latest_checkpoint(stage_dir(cfg, "pretrain") / "checkpoints")
    return (load_meta(latest) if latest is not None else None), str(latest), latest


def check_resume_point(cfg: RunConfig, model: Any, num_classes: int, info: dict[str, Any] | None) -> str:
    """Refuse, before any worker starts, a checkpoint a re-run of this name would resume stage one
    from when it holds another model or other training settings (`check_resumable`; the stage
    checks again on the checkpoint it is given), or one that cannot be read (locally: a
    `train_state.pt` a safe load refuses). Returns what stage one will do: skip, resume from a
    step, or start fresh."""
    if finished_result(cfg, "pretrain", say=False) is not None:
        return "finished before with this config: skipped"
    try:
        meta, where, local = _resume_point(cfg)
        if local is not None:
            load_train_state(local)  # what the stage would unpickle, refused here rather than there
    except ValueError as e:
        raise ConfigError(f"pretrain: cannot resume: {e}") from None
    if meta is None:
        return "starts fresh"
    current = pretrain_meta(cfg, model, num_classes, *shard_normalisation(cfg, info))
    try:
        check_resumable(meta, current, cfg.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return f"resumes from step {int(meta.get('step', 0))} ({where})"


def newest_committed_step(cfg: RunConfig) -> tuple[int, str] | None:
    """`(step, where)` of the stage-one checkpoint a re-run resumes from, or None."""
    meta, where, _ = _resume_point(cfg)
    return (int(meta.get("step", 0)), where) if meta is not None else None


def stopped_message(cfg: RunConfig, what: str = "interrupted") -> str:
    """What stopped the run (`what`: a Ctrl-C, a dead loader worker), what is kept, and how to go
    on: one line."""
    if finished_result(cfg, "pretrain", say=False) is None and cfg.pretrain.enabled:
        reached = int((read_json(stage_dir(cfg, "pretrain") / ATTEMPTS_FILE) or {}).get("high_water_step", 0))
        try:
            kept = newest_committed_step(cfg)
            saved = f"last committed checkpoint: step {kept[0]} ({kept[1]})" if kept else "no committed checkpoint yet"
        except (OSError, ValueError) as e:  # not "none yet": that would be a guess
            saved = f"the last committed checkpoint could not be read ({e})"
        return f"{what} in stage one at step {reached}; {saved}; run the same command to resume"
    return (f"{what} in stage two; finished stages are kept (stage one's checkpoint too); run the same "
            "command to go on: what finished is not rerun")
