"""Every check that needs no training, run on the driver before any worker starts.

Shards (counts, schemes, files, indexes, the first samples' keys and labels), the model name,
the checkpoint a re-run would resume, every target's dataset, and the stage-one checkpoint
against each target's architecture: a bad run fails in seconds, naming the key, before Ray.
"""

from __future__ import annotations

from architectures import create_model
from pipeline.checkpoint import load_checkpoint
from pipeline.config import ConfigError, RunConfig
from pipeline.data.shards import DataConfigError, check_stream, plan_from_config, probe_stream
from pipeline.inputs import TargetSettings, load_target_data, model_from_meta, pretrain_num_classes
from pipeline.resume import check_resume_point
from pipeline.storage import fetch_checkpoint
from pipeline.suite import suite_targets
from pipeline.transfer import IncompatibleCheckpointError, check_compatible


def preflight(cfg: RunConfig, stages: list[str]) -> None:
    """Fail fast, naming the key, before any worker starts."""
    if "pretrain" in stages:
        check_pretrain(cfg)
    if "finetune" in stages:
        targets = suite_targets(cfg)
        # Every target's dataset, before any training; then the checkpoint against each.
        classes = [target_classes(t.cfg, t.key) for t in targets]
        if cfg.finetune.init_from:
            for t, names in zip(targets, classes):
                check_init_checkpoint(t.cfg, key=t.key, class_names=names)


def check_pretrain(cfg: RunConfig) -> None:
    """Stage one's shards, model and resume point."""
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


def target_classes(cfg: RunConfig, key: str = "finetune") -> list[str]:
    """Class names of one target's dataset (loading it checks source, splits and columns)."""
    try:
        _, _, names = load_target_data(cfg.finetune.data)
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
    if class_names is None:
        class_names = target_classes(cfg, key)
    model = model_from_meta(meta, num_classes=len(class_names), in_chans=TargetSettings.channels(cfg, meta))
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
