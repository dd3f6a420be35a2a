"""Experiment tracking: Weights & Biases on rank 0, a null tracker everywhere else.

- One W&B run per stage, all stages of a pipeline run in one `group` (the run name), `job_type` =
  the stage, run id `<name>-<stage>` with `resume="allow"`: a stage that Ray restarts (or that a
  re-run of the same name resumes) continues the same W&B run.
- Offline by default (files under `<output_dir>/wandb`, `wandb sync` later); online when
  `tracking.mode=online` and WANDB_API_KEY is set; `disabled` tracks nothing.
- Stage one's final checkpoint is a `model` artifact; stage two records it as its input (name and
  digest in its config and summary; `use_artifact` when online — wandb refuses it offline).
- Tracking never costs a run: if W&B cannot start or cannot be reached, training goes on, offline
  when possible, with a single warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pipeline.redact import REDACTED, redact_secrets, redact_text  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from pipeline.config import RunConfig

log = logging.getLogger("transferline.tracking")

ARTIFACT_SCHEME = "wandb:"
MODEL_ARTIFACT_TYPE = "model"
# Written next to a checkpoint downloaded from W&B: which artifact version it came from.
ARTIFACT_SOURCE_FILE = "wandb_artifact.json"
# The files of a checkpoint that make up its artifact (train_state.pt is resume-only and large).
CHECKPOINT_ARTIFACT_FILES = ("model.safetensors", "meta.json", "COMMITTED")


def safe_name(text: str) -> str:
    """A W&B run id / artifact name: letters, digits, `-`, `_`, `.` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def stage_run_id(run_name: str, stage: str) -> str:
    return safe_name(f"{run_name}-{stage}")


def model_artifact_name(run_name: str) -> str:
    return safe_name(f"{run_name}-model")


def is_artifact_ref(value: str | None) -> bool:
    return bool(value) and str(value).startswith(ARTIFACT_SCHEME)


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
            from pipeline.checkpoint import load_meta, resolve_checkpoint

            step_dir = resolve_checkpoint(path)
            meta = load_meta(step_dir)
            # `mutable` (the default) stages a copy now: under Ray the folder is deleted once
            # reported, before an offline run is synced.
            art = _checkpoint_artifact(step_dir, model_artifact_name(self.run_name), meta, policy="mutable")
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
                from pipeline.checkpoint import load_meta

                meta = load_meta(source["path"])
                self.run.use_artifact(_checkpoint_artifact(Path(source["path"]), source["name"], meta,
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


def _checkpoint_artifact(step_dir: Path, name: str, meta: dict[str, Any], *, policy: str) -> Any:
    import wandb

    keep = ("name", "kwargs", "num_classes", "in_chans", "img_size", "mean", "std", "step", "stage", "run")
    art = wandb.Artifact(name, type=MODEL_ARTIFACT_TYPE, metadata={k: meta[k] for k in keep if k in meta})
    for file in CHECKPOINT_ARTIFACT_FILES:
        art.add_file(str(Path(step_dir) / file), name=file, policy=policy)
    return art


def checkpoint_source(path: str | os.PathLike[str], *, run_name: str) -> dict[str, Any]:
    """Name and digest of the `model` artifact a checkpoint folder is (or would be) in W&B.

    The digest is W&B's content digest of the checkpoint's files, so it equals the digest of the
    artifact stage one logged from the same files; a checkpoint downloaded from W&B also carries
    the reference it came from."""
    from pipeline.checkpoint import load_meta, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    meta = load_meta(step_dir)
    origin = {}
    if (step_dir / ARTIFACT_SOURCE_FILE).is_file():
        origin = json.loads((step_dir / ARTIFACT_SOURCE_FILE).read_text())
    name = origin.get("name") or model_artifact_name(str(meta.get("run") or run_name))
    # A downloaded artifact is described by W&B's own digest (its files may lack our marker).
    digest = origin.get("digest") or _checkpoint_artifact(step_dir, name, meta, policy="immutable").digest
    return {"name": name, "type": MODEL_ARTIFACT_TYPE, "digest": digest, "ref": origin.get("ref"),
            "version": origin.get("version"), "path": str(step_dir), "step": int(meta["step"])}


def input_checkpoint_source(local_path: str | os.PathLike[str], cfg: "RunConfig") -> dict[str, Any] | None:
    """`checkpoint_source` of stage two's `finetune.init_from` (fetched to `local_path`), or None
    with a warning when it cannot be described: describing the input must not stop training."""
    try:
        source = checkpoint_source(local_path, run_name=cfg.name)
    except Exception as e:
        log.warning("cannot describe finetune.init_from %s as a W&B artifact (%s: %s); stage two runs "
                    "without recording its input", cfg.finetune.init_from, type(e).__name__, e)
        return None
    return {**source, "init_from": cfg.finetune.init_from}


def _wandb_settings(timeout_s: float) -> Any:
    import torch
    import wandb

    # System metrics (GPU utilisation) matter on GPUs; on a CPU box they only cost a core.
    return wandb.Settings(silent=True, console="off", init_timeout=timeout_s,
                          x_disable_stats=not torch.cuda.is_available())


def _init_run(cfg: "RunConfig", *, mode: str, job_type: str, run_id: str, config: dict[str, Any],
              label: str = "") -> Any:
    import wandb

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity or None, group=cfg.name,
        job_type=job_type, name=f"{cfg.name}-{label or job_type}", id=run_id, resume="allow", dir=str(out),
        mode=mode, config=config, settings=_wandb_settings(cfg.tracking.timeout_s),
    )


def _open_run(cfg: "RunConfig", *, job_type: str, run_id: str, config: dict[str, Any],
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


def start_tracker(stage: str, cfg: "RunConfig", *, is_main: bool,
                  extra_config: dict[str, Any] | None = None) -> NullTracker:
    """The W&B run of one stage on rank 0 (a `NullTracker` elsewhere or when disabled). A suite
    target's label (`finetune-<target>`) names the run and its id; the job type stays the stage."""
    if not is_main or cfg.tracking.mode == "disabled":
        return NullTracker()
    from pipeline.config import to_dict
    from pipeline.suite import stage_kind

    kind = stage_kind(stage)
    config = redact_secrets({**to_dict(cfg), **(extra_config or {})})
    run = _open_run(cfg, job_type=kind, run_id=stage_run_id(cfg.name, stage), config=config, label=stage)
    if run is None:
        return NullTracker()
    tracker = WandbTracker(run, run_name=cfg.name)
    tracker._guard("define_metric", _define_axes, run, kind)
    return tracker


def start_report_tracker(cfg: "RunConfig") -> NullTracker:
    """A short run of job type `report` in the pipeline's group, opened by the driver (no Ray)."""
    if cfg.tracking.mode == "disabled" or int(os.environ.get("RANK", "0")) != 0:
        return NullTracker()
    from pipeline.config import to_dict

    run = _open_run(cfg, job_type="report", run_id=stage_run_id(cfg.name, "report"),
                    config=redact_secrets(to_dict(cfg)))
    return NullTracker() if run is None else WandbTracker(run, run_name=cfg.name)


# --- metrics -------------------------------------------------------------------------------


def step_metrics(prefix: str, stats: Any, **extra: Any) -> dict[str, Any]:
    """`prefix/<field>` for every number of a StepStats-like dataclass (so a counter added to
    it, e.g. skipped samples, is logged without touching this), plus `extra`."""
    import dataclasses

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


# --- the driver: before any stage ----------------------------------------------------------


def check_online(timeout_s: float) -> str | None:
    """None when W&B accepts our key within `timeout_s`, else why not (one line)."""
    if not os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is not set"
    try:
        import wandb

        wandb.Api(timeout=max(1, int(timeout_s))).viewer  # noqa: B018 - the request is the check
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _qualify(ref: str, cfg: "RunConfig") -> str:
    """`wandb:[entity/][project/]name[:alias]` -> `entity/project/name:alias` (entity optional)."""
    body = ref[len(ARTIFACT_SCHEME):]
    if ":" not in body.rsplit("/", 1)[-1]:
        body += ":latest"
    parts = body.split("/")
    if len(parts) == 1:
        parts = [cfg.tracking.project, *parts]
    if len(parts) == 2 and cfg.tracking.entity:
        parts = [cfg.tracking.entity, *parts]
    return "/".join(parts)


def download_artifact(ref: str, cfg: "RunConfig") -> Path:
    """Download a `wandb:` model artifact into `<output_dir>/artifacts/` (W&B's public API) and
    return it as a checkpoint folder, with `wandb_artifact.json` saying where it came from."""
    import wandb

    qualified = _qualify(ref, cfg)
    art = wandb.Api(timeout=max(1, int(cfg.tracking.timeout_s))).artifact(qualified, type=MODEL_ARTIFACT_TYPE)
    dest = Path(cfg.output_dir) / "artifacts" / safe_name(art.name.replace(":", "-"))
    root = Path(art.download(root=str(dest)))
    if not (root / "meta.json").is_file() or not (root / "model.safetensors").is_file():
        raise ValueError(f"W&B artifact {art.qualified_name} is not a transferline checkpoint "
                         "(it lacks model.safetensors or meta.json)")
    # W&B verified every file's digest on download: the folder is complete (an artifact logged
    # by another tool may lack our commit marker).
    if not (root / "COMMITTED").is_file():
        (root / "COMMITTED").write_text("downloaded from W&B\n")
    name = art.name.split(":", 1)[0]
    (root / ARTIFACT_SOURCE_FILE).write_text(json.dumps({
        "ref": f"{ARTIFACT_SCHEME}{art.qualified_name}", "requested": ref, "name": name,
        "version": art.version, "digest": art.digest,
    }, indent=2))
    return root


def prepare_tracking(cfg: "RunConfig", stages: list[str]) -> "RunConfig":
    """On the driver, before any stage: online, check once that W&B answers (else one warning and
    every stage logs offline); resolve a `wandb:` `finetune.init_from` to a downloaded folder."""
    from pipeline.config import ConfigError, replace

    t = cfg.tracking
    # In a `run` with stage one, stage two starts from stage one's checkpoint, not init_from.
    needs_init = "finetune" in stages and "pretrain" not in stages
    ref = cfg.finetune.init_from if needs_init and is_artifact_ref(cfg.finetune.init_from) else ""
    if t.mode != "online":
        return cfg  # a `wandb:` init_from needs online mode: validate() refused it already
    t0 = time.perf_counter()
    problem = check_online(t.timeout_s)
    if problem is not None:
        if ref:
            raise ConfigError(f"finetune.init_from: cannot fetch {ref}: W&B is not reachable ({problem})")
        log.warning("W&B online is not available (%s, after %.0f s): every stage logs offline under %s; "
                    "upload later with `wandb sync`", problem, time.perf_counter() - t0,
                    Path(cfg.output_dir) / "wandb")
        return replace(cfg, tracking=replace(t, mode="offline"))
    if ref:
        try:
            local = download_artifact(ref, cfg)
        except Exception as e:
            raise ConfigError(f"finetune.init_from: cannot fetch {ref}: {type(e).__name__}: {e}") from None
        log.info("finetune.init_from %s -> %s", ref, local)
        cfg = replace(cfg, finetune=replace(cfg.finetune, init_from=str(local)))
    return cfg


# --- the report ----------------------------------------------------------------------------


def tracking_links(cfg: "RunConfig", results: dict[str, Any]) -> dict[str, Any] | None:
    """Where each stage's W&B run is (summary.json `tracking`), with the `wandb sync` command
    when any run is offline."""
    runs = {stage: r["tracking"] for stage, r in results.items() if isinstance(r, dict) and r.get("tracking")}
    if not runs:
        return None
    links: dict[str, Any] = {"project": cfg.tracking.project, "group": cfg.name, "runs": runs}
    urls = [r["url"] for r in runs.values() if r.get("url")]
    if urls:
        links["group_url"] = urls[0].split("/runs/")[0] + f"/groups/{cfg.name}"
    if any(r["mode"] == "offline" for r in runs.values()):
        links["sync_command"] = f"wandb sync {Path(cfg.output_dir) / 'wandb'}/offline-run-*"
    return links
