"""Every check that needs no training, run on the driver before any worker starts.

Shards (counts, schemes, files, indexes, the first samples' keys and labels), the model name,
the checkpoint a re-run would resume, every target's dataset, and the stage-one checkpoint
against each target's architecture: a bad run fails in seconds, naming the key, before Ray.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from architectures import create_model
from pipeline.checkpoint import load_checkpoint
from pipeline.config import ConfigError, RunConfig
from pipeline.data.shards import DataConfigError, check_stream, describe_epoch, plan_from_config, probe_stream
from pipeline.data.target import seed_shots
from pipeline.inputs import TargetSettings, load_target_data, model_from_meta, pretrain_num_classes, stream_label_key
from pipeline.resume import check_resume_point
from pipeline.storage import fetch_checkpoint
from pipeline.suite import suite_targets
from pipeline.transfer import IncompatibleCheckpointError, check_compatible


def preflight(cfg: RunConfig, stages: list[str]) -> list[str]:
    """Fail fast, naming the key, before any worker starts (`check_output_dir` comes first).
    Returns what would run, a line each (what `--dry-run` prints)."""
    la = cfg.launcher
    two = (f"stage two as parallel trials of {la.trial_cpus:g} CPU" if la.stage_two == "trials"
           else f"stage two as {la.num_workers}-worker TorchTrainers")
    where = (f"ray, {la.num_workers} worker(s) x {la.cpus_per_worker:g} CPU; {two}" if la.kind == "ray"
             else "local, in-process")
    plan = [f"stages: {', '.join(stages)} ({where}); outputs in {cfg.output_dir}"]
    model = None
    if "pretrain" in stages:
        model, line = check_pretrain(cfg)
        plan.append(line)
    if "finetune" in stages:
        targets = suite_targets(cfg)
        # Every target's dataset, before any training; then the checkpoint against each.
        classes = []
        for t in targets:
            names, line = target_classes(t.cfg, t.key)
            classes.append(names)
            plan.append(line)
        if cfg.finetune.init_from:
            for t, names in zip(targets, classes):
                check_init_checkpoint(t.cfg, key=t.key, class_names=names)
            plan.append(f"stage two starts from {cfg.finetune.init_from}")
        elif model is not None:  # stage one's checkpoint will be this architecture
            check_partial_blocks(cfg, model, cfg.pretrain.model.name)
    return plan


#: Files a run writes at the top of its output_dir; `config.yaml` also says whose they are.
RUN_FILES = ("config.yaml", "summary.json", "report.md", "curves.png")


def check_output_dir(cfg: RunConfig, *, create: bool = True) -> None:
    """`output_dir` is writable (made when `create`) and holds no other run: a run never resumes,
    nor overwrites the files of, a run of another name (nor files no run wrote)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a directory")
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
                pass
        else:
            nearest = next(p for p in [out, *out.parents] if p.exists())
            if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
                raise PermissionError(13, f"{nearest} is not a writable directory")
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write to {out}: {e.strerror or e}") from None
    owner = _run_name(out / "config.yaml")
    if owner is None:
        theirs = [n for n in RUN_FILES[1:] if (out / n).exists()]
        if (out / "config.yaml").exists() or theirs:
            found = ", ".join(n for n in RUN_FILES if (out / n).exists())
            raise ConfigError(f"output_dir: {out} holds {found}, which no transferline run named {cfg.name!r} "
                              "wrote; give this run its own output_dir")
    elif owner != cfg.name:
        raise ConfigError(f"output_dir: {out} belongs to the run {owner!r} ({out / 'config.yaml'}); the run "
                          f"{cfg.name!r} needs its own output_dir, or name={owner} continues that run")


def _run_name(config: Path) -> str | None:
    """The `name` in a run's saved config.yaml; None when there is none (or it is not a run's)."""
    try:
        saved = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    name = saved.get("name") if isinstance(saved, dict) else None
    return name if isinstance(name, str) and "output_dir" in saved else None


def check_pretrain(cfg: RunConfig) -> tuple[Any, str]:
    """Stage one's shards, model and resume point; returns the model stage one will train and a
    line saying what it will do."""
    d = cfg.pretrain.data
    # Shard counts, URL schemes, local files, indexes, then the first samples' keys and labels.
    with _shard_errors():
        plan = plan_from_config(d)
        check_stream(plan, world_size=cfg.launcher.num_workers if cfg.launcher.kind == "ray" else 1,
                     num_workers=d.num_workers)
    num_classes = pretrain_num_classes(cfg, plan.info)  # a ConfigError naming its key
    with _shard_errors():
        probe_stream(plan, image_key=d.image_key, label_key=stream_label_key(cfg), num_classes=num_classes)
    try:
        model = create_model(cfg.pretrain.model.name, num_classes=num_classes, in_chans=d.in_chans,
                             **cfg.pretrain.model.kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"pretrain.model: {e}") from None
    start = check_resume_point(cfg, model, num_classes, plan.info)
    world = cfg.launcher.num_workers if cfg.launcher.kind == "ray" else 1
    epoch = describe_epoch(plan, batch_size=d.batch_size, world_size=world, estimate=False)
    shards = sum(len(s.urls) for s in plan.sources)
    held = f"{epoch['epoch_samples']} samples ({epoch['epoch_samples_from']})" if epoch["epoch_samples"] else "size unknown"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    learns = f"{num_classes} classes" if cfg.pretrain.labeled else f"{cfg.pretrain.objective}, no labels read"
    return model, (f"stage one: {cfg.pretrain.model.name} ({params:.2f}M parameters, {learns}), "
                   f"{cfg.pretrain.steps} steps x batch {d.batch_size} x {world} rank(s); {shards} shard(s), "
                   f"{held}; {start}")


@contextlib.contextmanager
def _shard_errors() -> Iterator[None]:
    """Shard problems as `ConfigError`s: the data layer's name their key; the rest are the URLs'."""
    try:
        yield
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"pretrain.data.urls: {e}") from None


def target_classes(cfg: RunConfig, key: str = "finetune") -> tuple[list[str], str]:
    """Class names of one target's dataset (loading it checks source, splits and columns), and
    that every class has the `shots_per_class` training images a k-shot subset takes; with a
    line saying what stage two will train on."""
    d = cfg.finetune.data
    try:
        train, test, names = load_target_data(d)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{key}.data.source: {e}") from None
    try:
        shots = seed_shots(train, d.shots_per_class, 0, label_column=d.label_column, class_names=names)
    except ValueError as e:
        raise ConfigError(f"{key}.data.shots_per_class: {e} in the {d.train_split!r} split of {d.source}") from None
    f = cfg.finetune
    if f.mix.enabled and len(names) < 2:  # BatchMix would refuse it inside the first trial
        raise ConfigError(f"finetune.mix: mixing needs at least 2 classes, {d.source} has {len(names)}: "
                          "set finetune.mix.mixup_alpha and cutmix_alpha to 0")
    which = "" if key == "finetune" else f" {key}"
    return names, (f"target{which} {d.source}: {len(names)} classes; {len(shots)} of {len(train)} training "
                   f"images ({d.shots_per_class or 'all'} per class), {len(test)} test; strategy {f.strategy}, "
                   f"seeds {list(f.seeds)}{', with the scratch baseline' if cfg.scratch.enabled else ''}")


def check_partial_blocks(cfg: RunConfig, model, name: str, key: str = "finetune") -> None:
    """`partial` (configured, or a candidate of `auto`) keeps the first `partial_blocks` of the
    architecture's transfer blocks."""
    f = cfg.finetune
    if f.strategy != "partial" and not (f.strategy == "auto" and "partial" in f.auto.candidates):
        return
    blocks = model.transfer_blocks()
    if cfg.finetune.partial_blocks > len(blocks):
        raise ConfigError(f"{key}.partial_blocks: {cfg.finetune.partial_blocks} exceeds the "
                          f"{len(blocks)} blocks of {name}: {blocks}")


def check_init_checkpoint(cfg: RunConfig, key: str = "finetune", class_names: list[str] | None = None) -> None:
    """Refuse a checkpoint that does not fit the architecture it claims, before fine-tuning.
    `cfg` is one target's config (pipeline/suite.py); `key` names that target in errors."""
    try:
        state, meta = load_checkpoint(fetch_checkpoint(cfg.finetune.init_from))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"finetune.init_from: {e}") from None
    if class_names is None:
        class_names, _ = target_classes(cfg, key)
    model = model_from_meta(meta, num_classes=len(class_names), in_chans=TargetSettings.channels(cfg, meta))
    try:
        check_compatible(model, state, meta=meta)
    except IncompatibleCheckpointError as e:
        if key == "finetune":
            raise
        raise IncompatibleCheckpointError(f"{key}: {e}") from None
    check_partial_blocks(cfg, model, meta["name"])
