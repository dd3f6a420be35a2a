"""What a stage's inputs are, derived from a config (and stage one's checkpoint meta).

The driver (preflight, runner, assess) and the workers (stages, monitor) both need these
answers; they live here, below all of them, so none imports another's private helpers:
stage directories, stage one's normalisation and class count, the checkpoint meta stage one
records, stage two's `TargetSettings`, the model rebuilt from a meta, and the target data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from architectures import create_model
from pipeline.checkpoint import model_meta
from pipeline.config import ConfigError, RunConfig, TargetDataConfig, to_dict
from pipeline.data.target import channel_stats, fine_tune_size, load_target, native_size, seed_shots
from pipeline.redact import redact_secrets

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """`<output_dir>/<stage label>`: results, attempts and checkpoints of one stage."""
    return Path(cfg.output_dir) / stage


def shard_normalisation(cfg: RunConfig, info: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """Stage one's mean/std: the config's, else the shards' `_info.json`, else ImageNet's."""
    d = cfg.pretrain.data
    if d.mean:
        return list(d.mean), list(d.std)
    if info and info.get("mean") and info.get("std"):
        return list(info["mean"]), list(info["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def pretrain_num_classes(cfg: RunConfig, info: dict[str, Any] | None) -> int:
    """Stage one's classes: the config's, else the index's; 0 (no classifier) for a label-free objective."""
    if not cfg.pretrain.labeled:
        return 0
    indexed = int((info or {}).get("num_classes", 0) or 0)
    n = cfg.pretrain.data.num_classes or indexed
    if not n:
        raise ConfigError("pretrain.data.num_classes: 0 and the shards have no _info.json with num_classes; set it")
    if indexed > n:
        raise ConfigError(f"pretrain.data.num_classes: {n}, but the shards' _info.json says they hold {indexed} "
                          f"classes: labels {n}..{indexed - 1} would all be skipped; set it to {indexed}, or 0 "
                          "to read it from the index")
    return int(n)


def stream_label_key(cfg: RunConfig) -> str:
    """The sample key stage one reads labels from; empty (read none) for a label-free objective."""
    return cfg.pretrain.data.label_key if cfg.pretrain.labeled else ""


def pretrain_meta(cfg: RunConfig, model: torch.nn.Module, num_classes: int, mean: list[float],
                  std: list[float]) -> dict[str, Any]:
    """What stage one's checkpoints record: the model (`model_meta`) and the redacted `pretrain` config."""
    d = cfg.pretrain.data
    meta = model_meta(model, num_classes=num_classes, in_chans=d.in_chans, img_size=d.img_size, mean=mean, std=std)
    meta.update(stage="pretrain", run=cfg.name, config=redact_secrets(to_dict(cfg)["pretrain"]))
    return meta


@dataclass(frozen=True)
class TargetSettings:
    """Resolution, channels and normalisation of stage two: the config's, else the checkpoint's."""
    img_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    normalize: str = "checkpoint"
    """`finetune.data.normalize`; with `target`, `for_seed` replaces mean/std by the seed's shots'."""

    @classmethod
    def resolve(cls, cfg: RunConfig, meta: dict[str, Any], train_ds: Any) -> TargetSettings:
        """`train_ds` (the target's training split) gives its own resolution when `img_size` is 0."""
        d = cfg.finetune.data
        if not d.img_size and len(train_ds) == 0:
            raise ValueError(f"finetune.data.source: {d.source!r} split {d.train_split!r} has no images")
        img_size = d.img_size or fine_tune_size(native_size(train_ds, image_column=d.image_column),
                                                int(meta["img_size"]))
        return cls(img_size=img_size, in_chans=cls.channels(cfg, meta),
                   mean=list(d.mean) or list(meta["mean"]), std=list(d.std) or list(meta["std"]),
                   normalize=d.normalize)

    @staticmethod
    def channels(cfg: RunConfig, meta: dict[str, Any]) -> int:
        """Stage two's input channels: `finetune.data.in_chans`, else the checkpoint's."""
        return cfg.finetune.data.in_chans or int(meta["in_chans"])

    def for_seed(self, d: TargetDataConfig, train_ds: Any, class_names: list[str], seed: int) -> TargetSettings:
        """The settings of one seed: with `normalize: target`, the statistics of its training images."""
        if self.normalize != "target":
            return self
        indices = seed_shots(train_ds, d.shots_per_class, seed, label_column=d.label_column, class_names=class_names)
        mean, std = channel_stats(train_ds, indices, in_chans=self.in_chans, img_size=self.img_size,
                                  image_column=d.image_column)
        return replace(self, mean=mean, std=std)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_from_meta(meta: dict[str, Any], *, num_classes: int, in_chans: int) -> torch.nn.Module:
    """The architecture a checkpoint's meta names, built for a target's classes and channels."""
    return create_model(meta["name"], num_classes=num_classes, in_chans=in_chans, **meta["kwargs"])


def load_target_data(d: TargetDataConfig) -> tuple[Any, Any, list[str]]:
    """(train split, test split, class names) of one target's `finetune.data`."""
    return load_target(d.source, train_split=d.train_split, test_split=d.test_split,
                       image_column=d.image_column, label_column=d.label_column)
