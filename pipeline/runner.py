"""The stage sequence on the driver: pretrain -> finetune -> scratch, then the report.

Everything that can be checked without training is checked here first (shards, the target
dataset, model names, checkpoint compatibility), so a bad run fails in seconds, before Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from architectures import create_model
from pipeline.checkpoint import latest_checkpoint, load_checkpoint, load_meta
from pipeline.config import ConfigError, RunConfig, save_config, stages_for
from pipeline.data.shards import DataConfigError, absolutize_urls, check_stream, plan_from_config, probe_stream
from pipeline.data.target import load_target
from pipeline.report import write_report
from pipeline.resume import finished_result, mark_finished
from pipeline.launch.base import ray_run_name, ray_storage_path
from pipeline.stages import (
    check_resumable,
    pretrain_meta,
    pretrain_num_classes,
    shard_normalisation,
    stage_dir,
    target_settings,
)
from pipeline.suite import suite_targets
from pipeline.storage import checkpoint_metas, fetch_checkpoint
from pipeline.tracking import is_artifact_ref, prepare_tracking
from pipeline.transfer import IncompatibleCheckpointError, check_compatible

log = logging.getLogger("transferline.runner")


def _is_url(s: str) -> bool:
    return "://" in s


def absolutize(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute on the driver: Ray workers may run in another directory."""
    def fix(path: str) -> str:
        return path if not path or _is_url(path) or os.path.isabs(path) else str(Path(path).absolute())

    pd = cfg.pretrain.data
    sources = [dataclasses.replace(s, urls=absolutize_urls(s.urls)) for s in pd.sources]
    p = dataclasses.replace(cfg.pretrain, data=dataclasses.replace(pd, urls=absolutize_urls(pd.urls or ""),
                                                                   sources=sources))
    def fix_data(fd: Any) -> Any:
        source = fd.source or ""
        # A hub name ("user/name") is not a local path: only rewrite what exists here.
        return dataclasses.replace(fd, source=fix(source) if source and Path(source).exists() else fd.source)

    f = dataclasses.replace(
        cfg.finetune,
        init_from=cfg.finetune.init_from if is_artifact_ref(cfg.finetune.init_from) else fix(cfg.finetune.init_from),
        data=fix_data(cfg.finetune.data),
        targets=[dataclasses.replace(t, data=fix_data(t.data)) for t in cfg.finetune.targets],
    )
    return dataclasses.replace(cfg, output_dir=fix(cfg.output_dir), pretrain=p, finetune=f)


def preflight(cfg: RunConfig, stages: list[str]) -> None:
    """Fail fast, naming the key, before any worker starts."""
    if "pretrain" in stages:
        d = cfg.pretrain.data
        try:
            # Shard counts, URL schemes, local files, indexes, then the first samples' keys and labels.
            plan = plan_from_config(d)
            check_stream(plan, world_size=cfg.launcher.num_workers if cfg.launcher.kind == "ray" else 1,
                         num_workers=d.num_workers)
            num_classes = pretrain_num_classes(cfg, plan.info)
            probe_stream(plan, image_key=d.image_key, label_key=d.label_key, num_classes=num_classes)
        except DataConfigError as e:
            raise ConfigError(str(e)) from None
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ConfigError(f"pretrain.data.urls: {e}") from None
        try:
            model = create_model(cfg.pretrain.model.name, num_classes=num_classes, in_chans=d.in_chans,
                                 **cfg.pretrain.model.kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"pretrain.model: {e}") from None
        check_resume_point(cfg, model, num_classes, plan.info)
    if "finetune" in stages:
        targets = suite_targets(cfg)
        # Every target's dataset, before any training; then the checkpoint against each.
        classes = [target_classes(t.cfg, t.key) for t in targets]
        if cfg.finetune.init_from:
            for t, names in zip(targets, classes):
                check_init_checkpoint(t.cfg, key=t.key, class_names=names)


def check_resume_point(cfg: RunConfig, model: Any, num_classes: int, info: dict[str, Any] | None) -> None:
    """Refuse, before any worker starts, a checkpoint a re-run of this name would resume stage one
    from when it holds another model or other training settings (`stages.check_resumable`; the
    stage checks again on the checkpoint it is given). Under Ray: the newest committed checkpoint in
    the run's Ray storage; locally: the one the local launcher resumes."""
    if finished_result(cfg, "pretrain", say=False) is not None:
        return  # stage one will be skipped: nothing resumes
    if cfg.launcher.kind == "ray":
        metas = checkpoint_metas(f"{ray_storage_path(cfg).rstrip('/')}/{ray_run_name(cfg, 'pretrain')}")
    else:
        latest = latest_checkpoint(stage_dir(cfg, "pretrain") / "checkpoints")
        metas = [load_meta(latest)] if latest is not None else []
    if not metas:
        return
    newest = max(metas, key=lambda m: int(m.get("step", 0)))
    current = pretrain_meta(cfg, model, num_classes, *shard_normalisation(cfg, info))
    try:
        check_resumable(newest, current, cfg.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def target_classes(cfg: RunConfig, key: str = "finetune") -> list[str]:
    """Class names of one target's dataset (loading it checks source, splits and columns)."""
    fd = cfg.finetune.data
    try:
        _, _, names = load_target(fd.source, train_split=fd.train_split, test_split=fd.test_split,
                                  image_column=fd.image_column, label_column=fd.label_column)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{key}.data.source: {e}") from None
    return names


def check_init_checkpoint(cfg: RunConfig, key: str = "finetune", class_names: list[str] | None = None) -> None:
    """Refuse a checkpoint that does not fit the architecture it claims, before fine-tuning.
    `cfg` is one target's config (pipeline/suite.py); `key` names that target in errors."""
    try:
        state, meta = load_checkpoint(fetch_checkpoint(cfg.finetune.init_from))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"finetune.init_from: {e}") from None
    settings = target_settings(cfg, meta)
    if class_names is None:
        class_names = target_classes(cfg, key)
    model = create_model(meta["name"], num_classes=len(class_names), in_chans=settings["in_chans"], **meta["kwargs"])
    try:
        check_compatible(model, state, meta=meta)
    except IncompatibleCheckpointError as e:
        if key == "finetune":
            raise
        raise IncompatibleCheckpointError(f"{key}: {e}") from None
    if cfg.finetune.strategy == "partial":
        n = len(model.transfer_blocks())
        if cfg.finetune.partial_blocks > n:
            raise ConfigError(f"finetune.partial_blocks: {cfg.finetune.partial_blocks} exceeds the "
                              f"{n} blocks of {meta['name']}: {model.transfer_blocks()}")


@contextlib.contextmanager
def _launcher(cfg: RunConfig):
    if cfg.launcher.kind == "local":
        from pipeline.launch.local import run_stage_local

        yield lambda stage, c, command: run_stage_local(stage, c)
    else:
        from pipeline.launch.ray import RayLauncher

        with RayLauncher(cfg) as launcher:
            yield launcher.run_stage


def run_pipeline(cfg: RunConfig, command: str = "run") -> dict[str, Any]:
    """Run the stages `command` asks for and write summary.json, report.md, curves.png."""
    cfg = absolutize(cfg)
    stages = stages_for(command, cfg)
    cfg = prepare_tracking(cfg, stages)  # W&B reachable? a `wandb:` init_from downloaded
    preflight(cfg, stages)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    # Results by stage label: `pretrain`, then per target `finetune`/`scratch` (single-target
    # form) or `finetune-<target>`/`scratch-<target>` (a suite), and `assess[-<target>]`.
    results: dict[str, Any] = {}

    def run_once(label: str, stage_cfg: RunConfig, run_stage: Any, *, stale: bool = False) -> bool:
        """Run a stage unless it finished before with this config; True when it ran."""
        done = finished_result(stage_cfg, label)
        if done is not None and not stale:
            log.info("== %s: already finished in this run with this config; not retrained ==", label)
            results[label] = done
            return False
        if done is not None:
            log.info("== %s: finished before, from stage one's earlier weights; running it again ==", label)
        log.info("== %s (%s launcher) ==", label, cfg.launcher.kind)
        results[label] = run_stage(label, stage_cfg, command)
        mark_finished(stage_cfg, label, results[label])
        return True

    # Fine-tuning results depend on stage one's weights, which its fingerprint cannot see (a
    # checkpoint path may stay the same): when stage one trained in this call, they are stale.
    new_weights = False
    with _launcher(cfg) as run_stage:
        if "pretrain" in stages and run_once("pretrain", cfg, run_stage):
            new_weights = results["pretrain"].get("resumed_from_step", 0) < results["pretrain"].get("steps", 0)
        targets = suite_targets(cfg)
        if "finetune" in stages and "pretrain" in results:
            cfg = dataclasses.replace(
                cfg, finetune=dataclasses.replace(cfg.finetune, init_from=results["pretrain"]["checkpoint"]))
            save_config(cfg, out / "config.yaml")
            targets = suite_targets(cfg)
            for t in targets:
                check_init_checkpoint(t.cfg, key=t.key)
        for t in targets:  # one stage-one checkpoint, every target with its own baseline
            for stage in ("finetune", "scratch"):
                if stage in stages:
                    run_once(t.label(stage), t.cfg, run_stage, stale=new_weights and stage == "finetune")
    for t in targets:
        if t.label("finetune") in results and cfg.finetune.assess:
            results[t.label("assess")] = _assess(t.cfg)
    summary = write_report(cfg, results)
    print(json.dumps(_headline(summary), indent=2), flush=True)
    return summary


def _assess(cfg: RunConfig) -> dict[str, Any]:
    """Transferability scores of the checkpoint stage two started from (seconds, on the driver)."""
    from pipeline.assess import assess

    return assess(cfg, str(fetch_checkpoint(cfg.finetune.init_from)))


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("transfer_gain", "summary_line")
    head = {k: summary[k] for k in keys if k in summary}
    head["outputs"] = summary.get("outputs", {})
    return head
