"""`run_stage`: what every worker runs, under any launcher.

Stage one (`pretrain`) streams webdataset shards into the architecture and checkpoints it.
Stage two (`finetune`) starts from that checkpoint on a small HF dataset, once per seed, with
one of the transfer strategies; `scratch` is the same run from random init (the baseline).
Rank 0 writes `<output_dir>/<stage>/result.json`, which is how results reach the driver.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from architectures import create_model
from pipeline.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_train_state,
    model_meta,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.config import RunConfig, to_dict
from pipeline.data.augment import BatchNormalize, SampleAugment
from pipeline.data.device_decode import DeviceDecodedStream, DeviceDecoder
from pipeline.data.shards import ShardStream, StreamPlan, build_shard_loader, plan_from_config
from pipeline.data.target import build_target_loaders, load_target
from pipeline.data.transforms import build_transform
from pipeline.distributed import DistContext, gather_peak_rss
from pipeline.engine import Engine, StepStats
from pipeline.launch.base import Reporter
from pipeline.flops import measure_matmul_flops, train_flops_per_sample
from pipeline.optim import build_optimizer, build_scheduler, param_groups
from pipeline.progress import Progress
from pipeline.redact import redact_secrets
from pipeline.resume import AttemptLog
from pipeline.storage import fetch_checkpoint
from pipeline.suite import stage_kind, suite_targets
from pipeline.tracking import (NullTracker, input_checkpoint_source, log_mean_curve, seed_metrics, start_tracker,
                               step_metrics)
from pipeline.transfer import apply_freeze, load_backbone, set_backbone_eval

if TYPE_CHECKING:
    from pipeline.monitor import DownstreamMonitor

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / stage


def write_stage_result(cfg: RunConfig, stage: str, result: dict[str, Any]) -> Path:
    path = stage_dir(cfg, stage) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return path


def read_stage_result(cfg: RunConfig, stage: str) -> dict[str, Any]:
    path = stage_dir(cfg, stage) / "result.json"
    if not path.is_file():
        raise RuntimeError(f"stage {stage} finished without writing {path}")
    return json.loads(path.read_text())


def run_stage(stage: str, cfg: RunConfig, reporter: Reporter, ctx: DistContext) -> dict[str, Any]:
    """Run `stage`: `pretrain`, `finetune` or `scratch`, or a suite target's label of the latter
    two (`finetune-<target>`, pipeline/suite.py), which names its directory and W&B run."""
    kind = stage_kind(stage)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    # Stage two's input: the model artifact it starts from (name + digest; lineage when online).
    source = None
    if kind == "finetune" and ctx.is_main and cfg.tracking.mode != "disabled":
        source = input_checkpoint_source(fetch_checkpoint(cfg.finetune.init_from), cfg)
    tracker = start_tracker(stage, cfg, is_main=ctx.is_main,
                            extra_config={"input_artifact": source} if source else None)
    try:
        if source:
            tracker.use_checkpoint(source)
        if stage == "pretrain":
            result = pretrain(cfg, reporter, ctx, tracker)
        elif kind in ("finetune", "scratch"):
            result = target_stage(stage, cfg, reporter, ctx, tracker)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        if source:
            result["input_artifact"] = source
        tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float, str))}
                        | ({"input_artifact": source} if source else {}))
        result["tracking"] = tracker.describe()
    finally:
        tracker.finish()
    if ctx.is_main:
        write_stage_result(cfg, stage, result)
    return result


def shard_normalisation(cfg: RunConfig, info: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    d = cfg.pretrain.data
    if d.mean:
        return list(d.mean), list(d.std)
    if info and info.get("mean") and info.get("std"):
        return list(info["mean"]), list(info["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def pretrain_num_classes(cfg: RunConfig, info: dict[str, Any] | None) -> int:
    n = cfg.pretrain.data.num_classes or (info or {}).get("num_classes", 0)
    if not n:
        raise ValueError(
            "pretrain.data.num_classes: 0 and the shards have no _info.json with num_classes; set it"
        )
    return int(n)


def pretrain_meta(cfg: RunConfig, model: torch.nn.Module, num_classes: int, mean: list[float],
                  std: list[float]) -> dict[str, Any]:
    """What stage one's checkpoints record: the model (`model_meta`) and the redacted `pretrain` config."""
    d = cfg.pretrain.data
    meta = model_meta(model, num_classes=num_classes, in_chans=d.in_chans, img_size=d.img_size, mean=mean, std=std)
    meta.update(stage="pretrain", run=cfg.name, config=redact_secrets(to_dict(cfg)["pretrain"]))
    return meta


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


def pretrain(cfg: RunConfig, reporter: Reporter, ctx: DistContext, tracker: NullTracker) -> dict[str, Any]:
    p, d = cfg.pretrain, cfg.pretrain.data
    t_start = time.perf_counter()
    plan = plan_from_config(d)  # shard lists of all sources, their _info.json indexes, fetch options
    info = plan.info
    num_classes = pretrain_num_classes(cfg, info)
    mean, std = shard_normalisation(cfg, info)

    torch.manual_seed(p.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)
    model = create_model(p.model.name, num_classes=num_classes, in_chans=d.in_chans, **p.model.kwargs)
    model.to(ctx.device)  # before the optimiser: fused AdamW is chosen only for CUDA-resident params
    meta = pretrain_meta(cfg, model, num_classes, mean, std)
    optimizer = build_optimizer(
        param_groups(model, lr=p.optim.lr, weight_decay=p.optim.weight_decay),
        name=p.optim.name, lr=p.optim.lr, betas=tuple(p.optim.betas), momentum=p.optim.momentum,
    )
    scheduler = build_scheduler(optimizer, warmup_steps=min(p.optim.warmup_steps, p.steps), total_steps=p.steps,
                                schedule=p.optim.schedule, min_lr_ratio=p.optim.min_lr_ratio)

    start_step, samples_seen, loss_curve = 0, 0, []
    data_position = None
    resume = reporter.resume_checkpoint()
    if resume is not None:
        state, rmeta = load_checkpoint(resume)  # refuses a folder without its commit marker
        check_resumable(rmeta, meta, cfg.name)
        model.load_state_dict(state)
        train_state = load_train_state(resume) or {}
        if "optimizer" in train_state:
            optimizer.load_state_dict(train_state["optimizer"])
            scheduler.load_state_dict(train_state["scheduler"])
            restore_rng_state(train_state["rng"])
        start_step = int(rmeta["step"])
        samples_seen = int(train_state.get("samples_seen", 0))
        loss_curve = list(train_state.get("loss_curve", []))
        data_position = train_state.get("data_position")  # every rank's loader position
    attempts = AttemptLog(stage_dir(cfg, "pretrain"), enabled=ctx.is_main)
    attempts.begin(resumed_from_step=start_step)

    flops = train_flops_per_sample(model, d.in_chans, d.img_size)
    peak = peak_flops(cfg, ctx)
    engine = Engine(model, optimizer, scheduler, ctx, precision=cfg.engine.precision,
                    grad_accum_steps=cfg.engine.grad_accum_steps, clip_grad_norm=p.optim.clip_grad_norm,
                    channels_last=cfg.engine.channels_last, compile=cfg.engine.compile,
                    log_every=cfg.engine.log_every, flops_per_sample=flops)
    engine.samples_seen = samples_seen
    monitor = build_monitor(cfg, ctx, d.img_size, d.in_chans, mean, std)
    monitor_curve: list[list[Any]] = []

    def run_monitor(step: int) -> None:
        if monitor is None:
            return
        scores = monitor(model, ctx.device)
        monitor_curve.append([step, scores])
        tracker.log({f"pretrain/monitor_knn/{name}": acc for name, acc in scores.items()}, step=step)
    remaining = p.steps - start_step
    batches = pretrain_stream(
        cfg, plan, ctx, steps=max(1, remaining) * cfg.engine.grad_accum_steps, num_classes=num_classes,
        mean=mean, std=std,
        position=data_position,  # continues exactly where the checkpoint's stream was
        start_epoch=start_step,  # without a usable position: fresh shard orders, not the first batches again
    )
    ckpt_root = reporter.checkpoint_root(stage_dir(cfg, "pretrain") / "checkpoints")
    progress = Progress("pretrain", total=p.steps, initial=start_step, enabled=ctx.is_main)
    last: dict[str, Any] = {"checkpoint": None, "loss": float("nan")}
    t_loop = time.perf_counter()

    def on_step(step: int, stats: StepStats | None) -> None:
        attempts.reached(step)
        if stats is not None:
            last["loss"] = stats.loss
            loss_curve.append([step, stats.loss])
            tracker.log({**step_metrics("pretrain", stats), **batches.metrics("pretrain")}, step=step)
            progress.update(step, loss=stats.loss, lr=stats.lr, samples_per_s=stats.samples_per_s)
            if peak:
                tracker.log({"pretrain/mfu": stats.tflops * 1e12 / peak}, step=step)
        if p.monitor_every and (step % p.monitor_every == 0 or step == p.steps):
            run_monitor(step)
        if step == p.steps or (p.checkpoint_every and step % p.checkpoint_every == 0):
            path = None
            position = batches.gather_state()  # a collective: every rank's loader position, on rank 0
            if ctx.is_main:
                train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": capture_rng_state(), "samples_seen": engine.samples_seen,
                               "loss_curve": loss_curve, "data_position": position}
                path = save_checkpoint(ckpt_root, step, model, meta, train_state, keep=p.keep_checkpoints)
                last["checkpoint"] = str(path)
                if step == p.steps and cfg.tracking.log_checkpoint:
                    tracker.log_checkpoint(path)  # before report: under Ray that deletes the folder
            reporter.report({"step": step, "loss": last["loss"]}, path)

    if remaining > 0:
        if start_step == 0:
            run_monitor(0)  # the random-init baseline of the curve
        t_loop = time.perf_counter()
        engine.fit(batches, start_step=start_step, end_step=p.steps, on_step=on_step)
    progress.close()
    loop_s = time.perf_counter() - t_loop
    trained = engine.samples_seen - samples_seen
    monitor_s = monitor.seconds if monitor is not None else 0.0
    samples_per_s = trained / max(loop_s - monitor_s, 1e-9) if trained else 0.0
    data_summary = batches.summary(estimate=ctx.is_main)  # a collective: counts over workers and ranks
    memory = gather_peak_rss()  # a collective too
    return {
        "checkpoint": last["checkpoint"],
        "model": p.model.name,
        "num_params": sum(t.numel() for t in model.parameters()),
        "num_classes": num_classes,
        "steps": p.steps,
        "resumed_from_step": start_step,
        "attempts": attempts.attempts,
        "steps_redone": attempts.steps_redone,
        "samples_seen": engine.samples_seen,
        "final_loss": last["loss"],
        "samples_per_s": samples_per_s,
        "train_flops_per_sample": flops,
        "tflops": samples_per_s * flops / 1e12,
        "mfu": samples_per_s * flops / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "monitor_curve": monitor_curve,
        "monitor_s": monitor_s,
        "monitor_share": monitor_s / loop_s if monitor is not None and loop_s > 0 else None,
        "wall_s": time.perf_counter() - t_start,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "loss_curve": loss_curve,
        "data": data_summary,
        "peak_rss_mib": memory,
    }


def pretrain_stream(cfg: RunConfig, plan: StreamPlan, ctx: DistContext, *, steps: int, num_classes: int,
                    mean: list[float], std: list[float], position: dict[str, Any] | None = None,
                    start_epoch: int = 0) -> ShardStream | DeviceDecodedStream:
    """Stage one's batches as `pretrain.data` describes them, on ``ctx``'s rank.

    Crop and flip per sample on PIL, normalise per batch (pipeline/data/augment.py: ~8x faster);
    or, with ``decode: device``, the workers only draw the crops and JPEGs are decoded on the device.
    """
    d = cfg.pretrain.data
    transform = SampleAugment(d.img_size, d.in_chans, augment=d.augment, scale=(d.min_scale, 1.0))
    on_device = d.decode == "device"
    stream = build_shard_loader(
        plan, rank=ctx.rank, world_size=ctx.world_size, batch_size=d.batch_size, num_workers=d.num_workers,
        steps=steps, shuffle_buffer=d.shuffle_buffer, transform=transform, image_key=d.image_key,
        batch_transform=None if on_device else BatchNormalize(mean, std, d.in_chans),
        label_key=d.label_key, seed=cfg.pretrain.seed, num_classes=num_classes, position=position,
        pin_memory=ctx.device.type == "cuda", start_epoch=start_epoch, decode=d.decode,
    )
    if on_device:
        return DeviceDecodedStream(stream, DeviceDecoder(d.img_size, d.in_chans, mean, std, ctx.device))
    return stream


def peak_flops(cfg: RunConfig, ctx: DistContext) -> float:
    """The MFU denominator in FLOP/s: configured, else measured on CUDA; 0 (no MFU) on CPU."""
    if cfg.engine.peak_tflops:
        return cfg.engine.peak_tflops * 1e12
    if ctx.device.type == "cuda":
        return measure_matmul_flops(ctx.device, torch.bfloat16, seconds=1.0)
    return 0.0


def build_monitor(cfg: RunConfig, ctx: DistContext, img_size: int, in_chans: int, mean: list[float],
                  std: list[float]) -> DownstreamMonitor | None:
    """The downstream kNN monitor on rank 0 when `pretrain.monitor_every` asks for it."""
    p = cfg.pretrain
    if not p.monitor_every or not ctx.is_main:
        return None
    targets = [(t.name or Path(str(t.cfg.finetune.data.source)).name or str(t.cfg.finetune.data.source),
                t.cfg.finetune.data) for t in suite_targets(cfg)]
    from pipeline.monitor import DownstreamMonitor  # sklearn: imported only when monitoring (~1.3 s)

    return DownstreamMonitor(targets, img_size=img_size,
                             in_chans=in_chans, mean=mean, std=std, shots=p.monitor_shots,
                             queries=p.monitor_queries, seed=p.seed)


def _cycle(loader: Any) -> Iterator[Any]:
    """Endless batches from an epoch-based loader, reshuffling each epoch."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def target_settings(cfg: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Resolution, channels and normalisation of stage two: the config's, else the checkpoint's."""
    d = cfg.finetune.data
    return {
        "img_size": d.img_size or int(meta["img_size"]),
        "in_chans": d.in_chans or int(meta["in_chans"]),
        "mean": list(d.mean) or list(meta["mean"]),
        "std": list(d.std) or list(meta["std"]),
    }


def target_stage(stage: str, cfg: RunConfig, reporter: Reporter, ctx: DistContext,
                 tracker: NullTracker) -> dict[str, Any]:
    f, d = cfg.finetune, cfg.finetune.data
    kind = stage_kind(stage)  # `stage` may be a suite target's label: its directory and progress name
    t_start = time.perf_counter()
    state, meta = load_checkpoint(fetch_checkpoint(f.init_from))
    settings = target_settings(cfg, meta)
    train_ds, test_ds, class_names = load_target(
        d.source, train_split=d.train_split, test_split=d.test_split,
        image_column=d.image_column, label_column=d.label_column,
    )
    tf_train = build_transform(settings["img_size"], settings["in_chans"], train=True, mean=settings["mean"],
                               std=settings["std"], augment=d.augment, scale=(d.min_scale, 1.0), hflip=0.0)
    tf_eval = build_transform(settings["img_size"], settings["in_chans"], train=False,
                              mean=settings["mean"], std=settings["std"])
    strategy = f.strategy if kind == "finetune" else "scratch"
    runs = []
    progress = Progress(stage, total=f.steps * len(f.seeds), enabled=ctx.is_main)  # one bar for all seeds
    for index, seed in enumerate(f.seeds):
        train_loader, test_loader = build_target_loaders(
            train_ds, test_ds, transform_train=tf_train, transform_eval=tf_eval, batch_size=d.batch_size,
            num_workers=d.num_workers, rank=ctx.rank, world_size=ctx.world_size, seed=seed,
            shots_per_class=d.shots_per_class, image_column=d.image_column, label_column=d.label_column,
            pin_memory=ctx.device.type == "cuda",  # page-locked batches: the engine's copies are non-blocking
        )
        run = _train_one_seed(stage, strategy, cfg, ctx, tracker, state, meta, settings, len(class_names),
                              seed, index, train_loader, test_loader, progress)
        runs.append(run)
    progress.close()
    log_mean_curve(tracker, runs, first_step=len(f.seeds) * (f.steps + 1))
    accs = [r["test_accuracy"] for r in runs]
    reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    memory = gather_peak_rss()
    reporter.report({"test_accuracy": statistics.fmean(accs)})
    return {
        "init_from": f.init_from if kind == "finetune" else None,
        "architecture": meta["name"],
        "strategy": strategy,
        "shots_per_class": d.shots_per_class,
        "num_classes": len(class_names),
        "train_size": runs[0]["train_size"],
        "test_size": runs[0]["test_size"],
        "steps": f.steps,
        "seeds": list(f.seeds),
        "test_accuracy": statistics.fmean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "target_accuracy": f.target_accuracy,
        "steps_to_target": statistics.fmean(reached) if len(reached) == len(runs) else None,
        "reached_target": f"{len(reached)}/{len(runs)}",
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
        "world_size": ctx.world_size,
        "peak_rss_mib": memory,
        **settings,
    }


def _train_one_seed(stage: str, strategy: str, cfg: RunConfig, ctx: DistContext, tracker: NullTracker,
                    state: dict[str, torch.Tensor], meta: dict[str, Any], settings: dict[str, Any],
                    num_classes: int, seed: int, index: int, train_loader: Any, test_loader: Any,
                    progress: Progress) -> dict[str, Any]:
    f = cfg.finetune
    torch.manual_seed(seed)
    model = create_model(meta["name"], num_classes=num_classes, in_chans=settings["in_chans"], **meta["kwargs"])
    model.to(ctx.device)  # before the optimiser: fused AdamW is chosen only for CUDA-resident params
    transfer = {"loaded": [], "reinitialised": [], "adapted": []}
    if strategy != "scratch":
        keep = f.partial_blocks if strategy == "partial" else None
        transfer = load_backbone(model, state, keep_blocks=keep, meta=meta)

    lr = f.optim.lr if strategy != "scratch" or not cfg.scratch.lr else cfg.scratch.lr
    # Phases: (steps, which params train, lr multiplier, layer decay).
    layer_decay = f.optim.layer_decay if strategy in ("full", "partial", "head_then_all") else 1.0
    if strategy == "linear_probe":
        phases = [(f.steps, "head", 1.0, 1.0)]
    elif strategy == "head_then_all":
        head_steps = f.head_steps or max(1, f.steps // 4)
        phases = [(head_steps, "head", 1.0, 1.0), (f.steps - head_steps, "all", f.all_lr_scale, layer_decay)]
    else:
        phases = [(f.steps, "all", 1.0, layer_decay)]

    curve: list[list[float]] = []
    step0 = index * (f.steps + 1)  # one monotonic W&B step axis across seeds
    engine: Engine | None = None

    def evaluate(step: int) -> None:
        assert engine is not None
        metrics = engine.evaluate(test_loader)
        curve.append([step, metrics["accuracy"]])
        tracker.log(seed_metrics(seed, step, test_accuracy=metrics["accuracy"], test_loss=metrics["loss"]),
                    step=step0 + step)

    done = 0
    t0 = time.perf_counter()
    for phase_steps, trainable, lr_mult, decay in phases:
        apply_freeze(model, trainable)
        groups = param_groups(model, lr=lr * lr_mult, weight_decay=f.optim.weight_decay, layer_decay=decay)
        optimizer = build_optimizer(groups, name=f.optim.name, lr=lr * lr_mult, betas=tuple(f.optim.betas),
                                    momentum=f.optim.momentum)
        scheduler = build_scheduler(optimizer, warmup_steps=min(f.optim.warmup_steps, phase_steps),
                                    total_steps=phase_steps, schedule=f.optim.schedule,
                                    min_lr_ratio=f.optim.min_lr_ratio)
        engine = Engine(model, optimizer, scheduler, ctx, precision=cfg.engine.precision,
                        grad_accum_steps=cfg.engine.grad_accum_steps, clip_grad_norm=f.optim.clip_grad_norm,
                        channels_last=cfg.engine.channels_last, compile=cfg.engine.compile,
                        log_every=cfg.engine.log_every)
        if trainable == "head" and f.freeze_bn:
            engine.train_mode_hook = set_backbone_eval
        if done == 0:
            evaluate(0)

        def on_step(step: int, stats: StepStats | None, offset: int = done) -> None:
            if stats is not None:
                tracker.log(seed_metrics(seed, offset + step, train_loss=stats.loss, lr=stats.lr,
                                         samples_per_s=stats.samples_per_s), step=step0 + offset + step)
                progress.update(index * f.steps + offset + step, loss=stats.loss, lr=stats.lr,
                                samples_per_s=stats.samples_per_s)
            if (offset + step) % f.eval_every == 0 or offset + step == f.steps:
                evaluate(offset + step)

        engine.fit(_cycle(train_loader), start_step=0, end_step=phase_steps, on_step=on_step)
        done += phase_steps
    wall = time.perf_counter() - t0

    if ctx.is_main:
        out = stage_dir(cfg, stage) / f"seed_{seed}"
        save_checkpoint(out, f.steps, model, {
            **model_meta(model, num_classes=num_classes, in_chans=settings["in_chans"],
                         img_size=settings["img_size"], mean=settings["mean"], std=settings["std"]),
            "stage": stage_kind(stage), "strategy": strategy, "seed": seed,
            "init_from": f.init_from if strategy != "scratch" else None,
        }, keep=1)
    reached = next((int(s) for s, acc in curve if acc >= f.target_accuracy), None)
    return {
        "seed": seed,
        "test_accuracy": curve[-1][1],
        "best_test_accuracy": max(acc for _, acc in curve),
        "steps_to_target": reached,
        "curve": curve,
        "train_size": int(len(train_loader.dataset)),
        "test_size": int(len(test_loader.dataset)),
        "transferred_tensors": len(transfer["loaded"]),
        "reinitialised_tensors": len(transfer["reinitialised"]),
        "adapted_tensors": transfer["adapted"],
        "wall_s": wall,
    }

