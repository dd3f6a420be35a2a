"""Experiment tracking: Weights & Biases on rank 0, a null tracker everywhere else.

- One W&B run per stage, all stages of a pipeline run in one `group` (the run name), `job_type` =
  the stage, run id `<name>-<stage>` with `resume="allow"`: a stage that Ray restarts (or that a
  re-run of the same name resumes) continues the same W&B run.
- Offline by default (files under `<output_dir>/wandb`, `wandb sync` later); online when
  `tracking.mode=online` and WANDB_API_KEY is set; `disabled` tracks nothing.
- Stage one's tracker logs its final checkpoint as a `model` artifact; stage two's declares it as
  its input (`use_artifact` when online — wandb refuses it offline). What an artifact is and where
  a checkpoint came from is `pipeline.lineage`.
- Tracking never costs a run: if W&B cannot start or cannot be reached, training goes on, offline
  when possible, with a single warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.checkpoint import load_meta, resolve_checkpoint
from pipeline.config import RunConfig, to_dict
from pipeline.lineage import ARTIFACT_SCHEME, MODEL_ARTIFACT_TYPE, checkpoint_artifact, model_artifact_name, safe_name
from pipeline.redact import redact_secrets
from pipeline.suite import stage_kind, stage_run_name

log = logging.getLogger("transferline.tracking")


def stage_run_id(run_name: str, stage: str) -> str:
    return safe_name(stage_run_name(run_name, stage))


# --- trackers ------------------------------------------------------------------------------


class NullTracker:
    """Tracks nothing; used on ranks > 0 and when tracking is disabled."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """Log a checkpoint folder as a `model` artifact; returns its name and digest."""
        return None

    def use_checkpoint(self, source: dict[str, Any]) -> None:
        """Declare the checkpoint this run starts from (see `checkpoint_source`)."""

    def log_report(self, files: list[Path], summary: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any] | None:
        """Where this run lives (id, mode, local dir, URL), for summary.json and report.md."""
        return None

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run: Any, *, run_name: str) -> None:
        self.run = run
        self.run_id = run.id
        self.run_name = run_name
        self.logged_artifacts: list[dict[str, Any]] = []
        self._warned = False

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A tracking hiccup must not stop training: warn once per run, then carry on."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not self._warned:
                self._warned = True
                log.warning("W&B %s failed (%s: %s); training continues (further W&B errors of run %s "
                            "are not reported)", what, type(e).__name__, e, self.run_id)
            return None

    @property
    def online(self) -> bool:
        return not self.run.offline

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard("log", self.run.log, metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", self.run.summary.update, redact_secrets(values))

    def log_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        def _log() -> dict[str, Any]:
            step_dir = resolve_checkpoint(path)
            meta = load_meta(step_dir)
            # `mutable` (the default) stages a copy now: under Ray the folder is deleted once
            # reported, before an offline run is synced.
            art = checkpoint_artifact(step_dir, model_artifact_name(self.run_name), meta, policy="mutable")
            aliases = ["latest", f"step-{int(meta['step'])}"]
            self.run.log_artifact(art, aliases=aliases)
            info = {"name": art.name, "type": MODEL_ARTIFACT_TYPE, "digest": art.digest, "aliases": aliases,
                    "step": int(meta["step"])}
            self.logged_artifacts.append(info)
            return info

        return self._guard("log_artifact", _log)

    def use_checkpoint(self, source: dict[str, Any]) -> None:
        if not self.online:
            return  # wandb refuses use_artifact offline; the config and summary carry the input

        def _use() -> None:
            if source.get("ref"):
                self.run.use_artifact(source["ref"][len(ARTIFACT_SCHEME):], type=MODEL_ARTIFACT_TYPE)
            else:
                # Same name + same content = the version stage one logged (W&B dedups by digest).
                meta = load_meta(source["path"])
                self.run.use_artifact(checkpoint_artifact(Path(source["path"]), source["name"], meta,
                                                          policy="immutable"))

        self._guard("use_artifact", _use)

    def log_report(self, files: list[Path], summary: dict[str, Any]) -> None:
        def _log() -> None:
            import wandb

            art = wandb.Artifact(safe_name(f"{self.run_name}-report"), type="report")
            for path in files:
                if path.is_file():
                    art.add_file(str(path))
            self.run.log_artifact(art)
            curves = next((p for p in files if p.suffix == ".png" and p.is_file()), None)
            if curves is not None:
                self.run.log({"curves": wandb.Image(str(curves))})
            self.run.summary.update(redact_secrets(_flat_numbers({k: v for k, v in summary.items()
                                                                  if k not in ("tracking", "outputs")})))

        self._guard("report logging", _log)

    def describe(self) -> dict[str, Any] | None:
        return self._guard("describe", self._describe)

    def _describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "run_id": self.run.id, "name": self.run.name, "group": self.run.group,
            "job_type": self.run.job_type, "project": self.run.project,
            "mode": "online" if self.online else "offline",
            "dir": str(self.run.settings.sync_dir),
        }
        if self.online:
            info["url"] = self.run.url
        if self.logged_artifacts:
            info["artifacts"] = list(self.logged_artifacts)
        return info

    def finish(self) -> None:
        self._guard("finish", self.run.finish)
        self._guard("finish", _flush_service)


def _flush_service() -> None:
    """`run.finish()` returns before wandb-core has written the end of the run's file (the
    stream closes asynchronously), and a Ray worker may be killed right after: tear the service
    down, which waits for every stream to close. Skipped while another run of this process is
    still open (teardown would finish it); the next `wandb.init` starts a fresh service."""
    import wandb
    from wandb.sdk import wandb_setup

    if wandb_setup.singleton().most_recent_active_run is None:
        wandb.teardown()


def _flat_numbers(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers and short strings of a nested summary, as `a/b` keys for a W&B run summary."""
    flat: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
        elif isinstance(value, str) and len(value) <= 500:
            flat[name] = value
    return flat


def _wandb_settings(timeout_s: float) -> Any:
    import torch
    import wandb

    # System metrics (GPU utilisation) matter on GPUs; on a CPU box they only cost a core.
    return wandb.Settings(silent=True, console="off", init_timeout=timeout_s,
                          x_disable_stats=not torch.cuda.is_available())


def _init_run(cfg: RunConfig, *, mode: str, job_type: str, run_id: str, config: dict[str, Any],
              label: str = "") -> Any:
    import wandb

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity or None, group=cfg.name,
        job_type=job_type, name=f"{cfg.name}-{label or job_type}", id=run_id, resume="allow", dir=str(out),
        mode=mode, config=config, settings=_wandb_settings(cfg.tracking.timeout_s),
    )


def _open_run(cfg: RunConfig, *, job_type: str, run_id: str, config: dict[str, Any],
              label: str = "") -> Any | None:
    """wandb.init; online failures fall back to an offline run (nothing lost), other failures
    to no run; one warning either way."""
    import wandb

    mode = cfg.tracking.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("tracking.mode=online but WANDB_API_KEY is not set: run %s logs offline "
                    "(`wandb sync` later)", run_id)
        mode = "offline"
    try:
        return _init_run(cfg, mode=mode, job_type=job_type, run_id=run_id, config=config, label=label)
    except Exception as e:
        first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if mode != "online":
            log.warning("W&B could not start (%s); training continues untracked", first)
            return None
        # The failed online run keeps its id registered in wandb's service process until it is
        # torn down; a fresh service takes the offline run.
        wandb.teardown()
        try:
            run = _init_run(cfg, mode="offline", job_type=job_type, run_id=run_id, config=config, label=label)
        except Exception as e2:
            log.warning("W&B could not start online (%s) nor offline (%s); training continues untracked",
                        first, type(e2).__name__)
            return None
        log.warning("W&B could not start online (%s); run %s logs offline instead (`wandb sync` later)",
                    first, run_id)
        return run


def _define_axes(run: Any, stage: str) -> None:
    if stage in ("finetune", "scratch"):
        # Seeds run one after another on W&B's monotonic step; their curves (and the seed mean)
        # share the fine-tuning step as x axis, so finetune and scratch runs overlay.
        run.define_metric("target_step")
        run.define_metric("seed_*", step_metric="target_step")
        run.define_metric("mean/*", step_metric="target_step")


def start_tracker(stage: str, cfg: RunConfig, *, is_main: bool,
                  extra_config: dict[str, Any] | None = None) -> NullTracker:
    """The W&B run of one stage on rank 0 (a `NullTracker` elsewhere or when disabled). A suite
    target's label (`finetune-<target>`) names the run and its id; the job type stays the stage."""
    if not is_main or cfg.tracking.mode == "disabled":
        return NullTracker()
    kind = stage_kind(stage)
    config = redact_secrets({**to_dict(cfg), **(extra_config or {})})
    run = _open_run(cfg, job_type=kind, run_id=stage_run_id(cfg.name, stage), config=config, label=stage)
    if run is None:
        return NullTracker()
    tracker = WandbTracker(run, run_name=cfg.name)
    tracker._guard("define_metric", _define_axes, run, kind)
    return tracker


def start_report_tracker(cfg: RunConfig) -> NullTracker:
    """A short run of job type `report` in the pipeline's group, opened by the driver (no Ray)."""
    if cfg.tracking.mode == "disabled" or int(os.environ.get("RANK", "0")) != 0:
        return NullTracker()
    run = _open_run(cfg, job_type="report", run_id=stage_run_id(cfg.name, "report"),
                    config=redact_secrets(to_dict(cfg)))
    return NullTracker() if run is None else WandbTracker(run, run_name=cfg.name)


# --- metrics -------------------------------------------------------------------------------


def step_metrics(prefix: str, stats: Any, **extra: Any) -> dict[str, Any]:
    """`prefix/<field>` for every number of a StepStats-like dataclass (so a counter added to
    it, e.g. skipped samples, is logged without touching this), plus `extra`."""
    values = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
    values.pop("step", None)
    values.update(extra)
    return {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}


def seed_metrics(seed: int, step: int, **values: Any) -> dict[str, Any]:
    """Per-seed metrics of a target stage on the shared `target_step` axis."""
    return {"target_step": step, **{f"seed_{seed}/{k}": v for k, v in values.items()}}


def log_mean_curve(tracker: NullTracker, runs: list[dict[str, Any]], *, first_step: int) -> None:
    """The seed-mean test accuracy over fine-tuning steps, logged after the seeds (W&B steps only
    grow); `first_step` is the first unused W&B step."""
    if not runs:
        return
    for i, (step, _) in enumerate(runs[0]["curve"]):
        accs = [r["curve"][i][1] for r in runs if i < len(r["curve"])]
        tracker.log({"target_step": step, "mean/test_accuracy": sum(accs) / len(accs)}, step=first_step + i)
