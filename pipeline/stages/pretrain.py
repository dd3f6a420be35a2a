"""Stage one: stream webdataset shards into the architecture, checkpoint it, resume exactly.

`pretrain()` reads top to bottom: set up, resume, train (checkpointing and monitoring from the
engine's step hook), summarise. What a checkpoint carries besides the weights is `TrainState`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from architectures import create_model
from pipeline import stopping
from pipeline.checkpoint import capture_rng_state, load_checkpoint, load_train_state, restore_rng_state, save_checkpoint
from pipeline.config import RunConfig
from pipeline.data.augment import BatchNormalize, SampleAugment, ViewAugment
from pipeline.data.device_decode import DeviceDecodedStream, DeviceDecoder
from pipeline.data.shards import ShardStream, StreamPlan, build_shard_loader, plan_from_config
from pipeline.distributed import DistContext, gather_peak_rss
from pipeline.engine import Engine, StepStats
from pipeline.flops import measure_matmul_flops, train_flops_per_sample
from pipeline.inputs import pretrain_meta, pretrain_num_classes, shard_normalisation, stage_dir, stream_label_key
from pipeline.objectives import Objective, build_objective, objective_param_groups, view_augment
from pipeline.launch.base import Reporter
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.progress import Progress
from pipeline.results import PretrainResult
from pipeline.resume import AttemptLog, check_resumable
from pipeline.suite import suite_targets
from pipeline.tracking import NullTracker, step_metrics

if TYPE_CHECKING:
    from pipeline.monitor import DownstreamMonitor


@dataclass
class TrainState:
    """Everything stage one resumes besides the weights, as `train_state.pt` stores it
    (plain tensors and primitives: it loads with `weights_only=True`)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    samples_seen: int = 0
    loss_curve: list[list[float]] = field(default_factory=list)
    data_position: dict[str, Any] | None = None
    """Every rank's loader position: a resumed stream continues exactly where this one was."""
    objective: Objective | None = None
    """The objective's own weights (a projection head) are saved here: stage-one state, never the model."""

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": capture_rng_state(), "samples_seen": self.samples_seen, "loss_curve": self.loss_curve,
                 "data_position": self.data_position}
        if self.objective is not None:
            state["objective"] = self.objective.extra_state()  # {} for a supervised run
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(state["rng"])
            if self.objective is not None:  # a head, a teacher: an error names what is missing
                self.objective.load_extra_state(state.get("objective", {}))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.loss_curve = list(state.get("loss_curve", []))
        self.data_position = state.get("data_position")


class StageOne:
    """Stage one's model, optimiser, stream and bookkeeping on one rank."""

    def __init__(self, cfg: RunConfig, reporter: Reporter, ctx: DistContext, tracker: NullTracker) -> None:
        p, d = cfg.pretrain, cfg.pretrain.data
        self.cfg, self.reporter, self.ctx, self.tracker = cfg, reporter, ctx, tracker
        self.plan = plan_from_config(d)  # shard lists of all sources, their _info.json indexes, fetch options
        self.num_classes = pretrain_num_classes(cfg, self.plan.info)
        self.mean, self.std = shard_normalisation(cfg, self.plan.info)
        torch.manual_seed(p.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)
        self.model = create_model(p.model.name, num_classes=self.num_classes, in_chans=d.in_chans, **p.model.kwargs)
        # The trained module: the backbone (what is checkpointed and handed on) inside the objective.
        self.objective = build_objective(p, self.model)
        self.objective.to(ctx.device)  # before the optimiser: fused AdamW is chosen only for CUDA-resident params
        self.meta = pretrain_meta(cfg, self.model, self.num_classes, self.mean, self.std)
        self.meta["weights"] = self.objective.weights  # which weights the checkpoint holds: model, ema, teacher
        optimizer = build_optimizer(
            objective_param_groups(self.objective, lr=p.optim.lr, weight_decay=p.optim.weight_decay),
            name=p.optim.name, lr=p.optim.lr, betas=tuple(p.optim.betas), momentum=p.optim.momentum)
        scheduler = build_scheduler(optimizer, warmup_steps=min(p.optim.warmup_steps, p.steps), total_steps=p.steps,
                                    schedule=p.optim.schedule, min_lr_ratio=p.optim.min_lr_ratio)
        self.state = TrainState(optimizer, scheduler, objective=self.objective)
        # Per sample: every view is a forward and backward (the projection head's FLOPs are negligible).
        self.flops = train_flops_per_sample(self.model, d.in_chans, d.img_size) * self.objective.views
        self.peak = peak_flops(cfg, ctx)
        self.monitor = build_monitor(cfg, ctx, d.img_size, d.in_chans, self.mean, self.std)
        self.monitor_curve: list[list[Any]] = []
        self.last_checkpoint: str | None = None
        self.checkpoint_s: list[list[float]] = []
        self.last_loss = float("nan")

    def resume(self) -> None:
        """Load the checkpoint the launcher says to resume from, if any (it must be this run's)."""
        path = self.reporter.resume_checkpoint()
        if path is None:
            return
        weights, meta = load_checkpoint(path)  # refuses a folder without its commit marker
        check_resumable(meta, self.meta, self.cfg.name)
        self.model.load_state_dict(weights)
        self.state.load_state_dict(load_train_state(path) or {})
        self.state.step = int(meta["step"])

    def build_engine(self) -> Engine:
        c, p = self.cfg.engine, self.cfg.pretrain
        engine = Engine(self.objective, self.state.optimizer, self.state.scheduler, self.ctx, precision=c.precision,
                        grad_accum_steps=c.grad_accum_steps, clip_grad_norm=p.optim.clip_grad_norm,
                        channels_last=c.channels_last, compile=c.compile, log_every=c.log_every,
                        flops_per_sample=self.flops, loss=self.objective.loss,
                        prepare_batch=self.objective.prepare_batch)
        engine.samples_seen = self.state.samples_seen
        return engine

    def run_monitor(self, step: int) -> None:
        if self.monitor is None:
            return
        scores = self.monitor(self.objective.handed_on(), self.ctx.device)
        self.monitor_curve.append([step, scores])
        self.tracker.log({f"pretrain/monitor_knn/{name}": acc for name, acc in scores.items()}, step=step)

    def log(self, step: int, stats: StepStats, batches: Any, progress: Progress) -> None:
        self.last_loss = stats.loss
        self.state.loss_curve.append([step, stats.loss])
        self.tracker.log({**step_metrics("pretrain", stats), **batches.metrics("pretrain")}, step=step)
        progress.update(step, loss=stats.loss, lr=stats.lr, samples_per_s=stats.samples_per_s)
        if self.peak:
            self.tracker.log({"pretrain/mfu": stats.tflops * 1e12 / self.peak}, step=step)

    def checkpoint(self, step: int, batches: Any, engine: Engine, ckpt_root: Any) -> None:
        """Commit a checkpoint on rank 0 and report it (every rank reports: a barrier under Ray)."""
        p, path, t0 = self.cfg.pretrain, None, time.perf_counter()
        self.state.data_position = batches.gather_state()  # a collective: every rank's position, on rank 0
        self.state.samples_seen, self.state.step = engine.samples_seen, step
        if self.ctx.is_main:
            path = save_checkpoint(ckpt_root, step, self.objective.handed_on(), self.meta, self.state.state_dict(),
                                   keep=p.keep_checkpoints if self.reporter.prunes_local else None)
            self.last_checkpoint = str(path)
            if step == p.steps and self.cfg.tracking.log_checkpoint:
                self.tracker.log_checkpoint(path)  # before report: under Ray that deletes the folder
        self.reporter.report({"step": step, "loss": self.last_loss}, path)
        self.checkpoint_s.append([step, time.perf_counter() - t0])  # what the step loop waited for it


def pretrain(cfg: RunConfig, reporter: Reporter, ctx: DistContext, tracker: NullTracker) -> dict[str, Any]:
    p, t_start = cfg.pretrain, time.perf_counter()
    run = StageOne(cfg, reporter, ctx, tracker)
    run.resume()
    start_step, samples_before = run.state.step, run.state.samples_seen
    attempts = AttemptLog(stage_dir(cfg, "pretrain"), enabled=ctx.is_main)
    attempts.begin(resumed_from_step=start_step, world_size=ctx.world_size)
    engine = run.build_engine()
    remaining = p.steps - start_step
    batches = pretrain_stream(
        cfg, run.plan, ctx, steps=max(1, remaining) * cfg.engine.grad_accum_steps, num_classes=run.num_classes,
        mean=run.mean, std=run.std, position=run.state.data_position,  # exactly where the checkpoint's stream was
        start_epoch=start_step,  # without a usable position: fresh shard orders, not the first batches again
    )
    ckpt_root = reporter.checkpoint_root(stage_dir(cfg, "pretrain") / "checkpoints")
    progress = Progress("pretrain", total=p.steps, initial=start_step, enabled=ctx.is_main)

    def on_step(step: int, stats: StepStats | None) -> None:
        run.objective.after_step(step, p.steps)  # before anything reads the weights of this step
        attempts.reached(step)
        if stats is not None:
            run.log(step, stats, batches, progress)
        if p.monitor_every and (step % p.monitor_every == 0 or step == p.steps):
            run.run_monitor(step)
        saved = step == p.steps or bool(p.checkpoint_every and step % p.checkpoint_every == 0)
        if saved:
            run.checkpoint(step, batches, engine, ckpt_root)
        notice, reason = reporter.notice(step)
        notice = stopping.agree(notice, ctx.world_size)
        if notice != stopping.NONE and not saved:
            run.checkpoint(step, batches, engine, ckpt_root)  # just in time, before the scheduler's kill
        if notice == stopping.STOP and step < p.steps:
            raise stopping.StageStopped(step, reason or "a stop request on another rank", run.last_checkpoint)

    t_loop = time.perf_counter()
    if remaining > 0:
        if start_step == 0:
            run.run_monitor(0)  # the random-init baseline of the curve
        t_loop = time.perf_counter()
        with stopping.listening():
            engine.fit(batches, start_step=start_step, end_step=p.steps, on_step=on_step)
    progress.close()
    loop_s = time.perf_counter() - t_loop
    trained = engine.samples_seen - samples_before
    monitor_s = run.monitor.seconds if run.monitor is not None else 0.0
    samples_per_s = trained / max(loop_s - monitor_s, 1e-9) if trained else 0.0
    return PretrainResult(
        checkpoint=run.last_checkpoint, model=p.model.name, objective=p.objective, weights=run.objective.weights,
        num_params=sum(t.numel() for t in run.model.parameters()), num_classes=run.num_classes, steps=p.steps,
        resumed_from_step=start_step, attempts=attempts.attempts, steps_redone=attempts.steps_redone,
        world_sizes=attempts.world_sizes,
        samples_seen=engine.samples_seen, final_loss=run.last_loss, samples_per_s=samples_per_s,
        train_flops_per_sample=run.flops, tflops=samples_per_s * run.flops / 1e12,
        mfu=samples_per_s * run.flops / run.peak if run.peak else None,
        peak_tflops=run.peak / 1e12 if run.peak else None, monitor_curve=run.monitor_curve, monitor_s=monitor_s,
        monitor_share=monitor_s / loop_s if run.monitor is not None and loop_s > 0 else None,
        wall_s=time.perf_counter() - t_start, world_size=ctx.world_size, device=str(ctx.device),
        loss_curve=run.state.loss_curve, checkpoint_s=run.checkpoint_s,
        data=batches.summary(estimate=ctx.is_main),  # a collective: counts over workers and ranks
        peak_rss_mib=gather_peak_rss(),  # a collective too
    ).to_dict()


def pretrain_stream(cfg: RunConfig, plan: StreamPlan, ctx: DistContext, *, steps: int, num_classes: int,
                    mean: list[float], std: list[float], position: dict[str, Any] | None = None,
                    start_epoch: int = 0) -> ShardStream | DeviceDecodedStream:
    """Stage one's batches as `pretrain.data` describes them, on ``ctx``'s rank.

    Crop and flip per sample on PIL, normalise per batch (pipeline/data/augment.py: ~8x faster);
    or, with ``decode: device``, the workers only draw the crops and JPEGs are decoded on the device.
    """
    p, d = cfg.pretrain, cfg.pretrain.data
    transform: SampleAugment | ViewAugment
    if p.labeled:
        transform = SampleAugment(d.img_size, d.in_chans, augment=d.augment, scale=(d.min_scale, 1.0),
                                  auto_augment=d.auto_augment)
    else:  # each sample becomes the objective's views: batches of [B, V, C, H, W]
        transform = view_augment(p, d.img_size, d.in_chans)
    on_device = d.decode == "device"
    stream = build_shard_loader(
        plan, rank=ctx.rank, world_size=ctx.world_size, batch_size=d.batch_size, num_workers=d.num_workers,
        steps=steps, shuffle_buffer=d.shuffle_buffer, transform=transform, image_key=d.image_key,
        batch_transform=None if on_device else BatchNormalize(mean, std, d.in_chans),
        label_key=stream_label_key(cfg), seed=cfg.pretrain.seed, num_classes=num_classes, position=position,
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
    from pipeline.monitor import DownstreamMonitor  # sklearn: imported only when monitoring (~1.3 s)

    targets = [(t.name or Path(str(t.cfg.finetune.data.source)).name or str(t.cfg.finetune.data.source),
                t.cfg.finetune.data) for t in suite_targets(cfg)]
    return DownstreamMonitor(targets, img_size=img_size, in_chans=in_chans, mean=mean, std=std,
                             shots=p.monitor_shots, queries=p.monitor_queries, seed=p.seed)
