"""Stage two: fine-tune from stage one's checkpoint on a small target, once per seed.

A strategy is a plan of `Phase`s (`plan_phases`); the scratch baseline is the same code with
the `scratch` plan and no weights loaded. One batch stream runs through all phases of a seed,
so a later phase continues the sample order instead of replaying the first epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.nn import functional as F

from pipeline.checkpoint import load_checkpoint, model_meta, save_checkpoint
from pipeline.config import FinetuneConfig, RunConfig, TargetDataConfig
from pipeline.data.target import build_target_loaders
from pipeline.data.transforms import build_transform
from pipeline.distributed import DistContext, gather_peak_rss
from pipeline.engine import Engine, StepStats
from pipeline.inputs import TargetSettings, load_target_data, model_from_meta, stage_dir
from pipeline.launch.base import Reporter
from pipeline.objectives import BatchMix
from pipeline.optim import AnchorDecay, build_optimizer, build_scheduler, param_groups
from pipeline.progress import Progress
from pipeline.results import SeedResult, TargetResult
from pipeline.stages.auto import FoldRunner, choose, choose_recipe, with_candidate
from pipeline.storage import fetch_checkpoint
from pipeline.suite import stage_kind
from pipeline.tracking import NullTracker, log_mean_curve, seed_metrics
from pipeline.transfer import apply_freeze, load_backbone, set_backbone_eval


@dataclass(frozen=True)
class Phase:
    """A stretch of fine-tuning with one set of trainable parameters and one LR schedule."""
    steps: int
    trainable: str
    """`head` (the backbone frozen, kept in eval mode when `finetune.freeze_bn`) or `all`."""
    lr_scale: float = 1.0
    layer_decay: float = 1.0


def plan_phases(strategy: str, f: FinetuneConfig) -> list[Phase]:
    """The phases of `strategy` over `f.steps` steps; layer decay applies where the backbone trains
    from pretrained weights (never to scratch)."""
    decay = f.optim.layer_decay
    if strategy == "linear_probe":
        return [Phase(f.steps, "head", f.head_lr_scale)]
    if strategy == "head_then_all":
        head_steps = f.head_steps or max(1, f.steps // 4)
        return [Phase(head_steps, "head", f.head_lr_scale), Phase(f.steps - head_steps, "all", f.all_lr_scale, decay)]
    if strategy in ("full", "partial"):
        return [Phase(f.steps, "all", 1.0, decay)]
    if strategy == "scratch":
        return [Phase(f.steps, "all")]
    raise ValueError(f"finetune.strategy: unknown strategy {strategy!r}")


def endless_batches(loader: Any) -> Iterator[Any]:
    """Batches from an epoch-based loader without end, reshuffling each epoch (DistributedSampler
    needs `set_epoch`; the seeded RandomSampler reshuffles by itself)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class SeedRun:
    """One seed of a target stage: the model, its phases, its evaluation curve."""

    def __init__(self, stage: str, strategy: str, cfg: RunConfig, ctx: DistContext, tracker: NullTracker,
                 settings: TargetSettings, seed: int, index: int) -> None:
        self.stage, self.strategy, self.cfg, self.ctx, self.tracker = stage, strategy, cfg, ctx, tracker
        self.settings, self.seed, self.index = settings, seed, index
        self.step0 = index * (cfg.finetune.steps + 1)  # one monotonic W&B step axis across seeds
        self.curve: list[list[float]] = []

    def build_model(self, state: dict[str, torch.Tensor] | None, meta: dict[str, Any], num_classes: int) -> dict:
        f = self.cfg.finetune
        torch.manual_seed(self.seed)
        self.model = model_from_meta(meta, num_classes=num_classes, in_chans=self.settings.in_chans)
        self.model.to(self.ctx.device)  # before the optimiser: fused AdamW is chosen only for CUDA params
        m = f.mix
        # Seeded by the run's seed: a seed's fine-tune and its scratch baseline mix the same pairs.
        self.mix = BatchMix(num_classes, mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                            seed=self.seed) if m.enabled else None
        self.mix_calls = 0  # one count across a seed's phases: head_then_all's second phase mixes anew
        if state is None:
            self.loaded: list[str] = []
            return {"loaded": [], "reinitialised": [], "adapted": []}
        report = load_backbone(self.model, state, meta=meta, shrink=f.shrink, perturb=f.perturb,
                               keep_blocks=f.partial_blocks if self.strategy == "partial" else None)
        self.loaded = report["loaded"]
        return report

    def engine_for(self, phase: Phase) -> Engine:
        f, c = self.cfg.finetune, self.cfg.engine
        lr = (self.cfg.scratch.lr or f.optim.lr if self.strategy == "scratch" else f.optim.lr) * phase.lr_scale
        apply_freeze(self.model, phase.trainable)
        # L2-SP: what came from the checkpoint decays toward its start (the phase's start: after
        # head_then_all's head phase the backbone is still the checkpoint's), the rest toward zero.
        groups = param_groups(self.model, lr=lr, weight_decay=f.optim.weight_decay, layer_decay=phase.layer_decay,
                              anchored=self.loaded, anchor=f.l2sp)
        optimizer = build_optimizer(groups, name=f.optim.name, lr=lr, betas=tuple(f.optim.betas),
                                    momentum=f.optim.momentum)
        AnchorDecay(optimizer)
        scheduler = build_scheduler(optimizer, warmup_steps=min(f.optim.warmup_steps, phase.steps),
                                    total_steps=phase.steps, schedule=f.optim.schedule,
                                    min_lr_ratio=f.optim.min_lr_ratio)
        engine = Engine(self.model, optimizer, scheduler, self.ctx, precision=c.precision,
                        grad_accum_steps=c.grad_accum_steps, clip_grad_norm=f.optim.clip_grad_norm,
                        channels_last=c.channels_last, compile=c.compile, log_every=c.log_every,
                        loss=functools.partial(F.cross_entropy, label_smoothing=f.label_smoothing),
                        prepare_batch=self.mix_batch if self.mix is not None else None)
        if phase.trainable == "head" and f.freeze_bn:
            engine.train_mode_hook = set_backbone_eval
        return engine

    def mix_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.mix_calls += 1
        return self.mix(images, labels, self.mix_calls)

    def evaluate(self, engine: Engine, test_loader: Any, step: int) -> None:
        metrics = engine.evaluate(test_loader)
        self.curve.append([step, metrics["accuracy"]])
        self.tracker.log(seed_metrics(self.seed, step, test_accuracy=metrics["accuracy"], test_loss=metrics["loss"]),
                         step=self.step0 + step)

    def train(self, train_loader: Any, test_loader: Any, progress: Progress) -> None:
        f, done = self.cfg.finetune, 0
        batches = endless_batches(train_loader)  # one stream through every phase
        for phase in plan_phases(self.strategy, f):
            engine = self.engine_for(phase)
            if done == 0:
                self.evaluate(engine, test_loader, 0)

            def on_step(step: int, stats: StepStats | None, engine: Engine = engine, offset: int = done) -> None:
                at = offset + step
                if stats is not None:
                    self.tracker.log(seed_metrics(self.seed, at, train_loss=stats.loss, lr=stats.lr,
                                                  samples_per_s=stats.samples_per_s), step=self.step0 + at)
                    progress.update(self.index * f.steps + at, loss=stats.loss, lr=stats.lr,
                                    samples_per_s=stats.samples_per_s)
                if at % f.eval_every == 0 or at == f.steps:
                    self.evaluate(engine, test_loader, at)

            engine.fit(batches, start_step=0, end_step=phase.steps, on_step=on_step)
            done += phase.steps

    def save(self, num_classes: int) -> None:
        f, s = self.cfg.finetune, self.settings
        if not self.ctx.is_main:
            return
        save_checkpoint(stage_dir(self.cfg, self.stage) / f"seed_{self.seed}", f.steps, self.model, {
            **model_meta(self.model, num_classes=num_classes, in_chans=s.in_chans, img_size=s.img_size,
                         mean=s.mean, std=s.std),
            "stage": stage_kind(self.stage), "strategy": self.strategy, "seed": self.seed,
            "init_from": f.init_from if self.strategy != "scratch" else None,
        }, keep=1)


def train_one_seed(run: SeedRun, state: dict[str, torch.Tensor] | None, meta: dict[str, Any], num_classes: int,
                   train_loader: Any, test_loader: Any, progress: Progress) -> dict[str, Any]:
    transfer = run.build_model(state, meta, num_classes)
    t0 = time.perf_counter()
    run.train(train_loader, test_loader, progress)
    wall = time.perf_counter() - t0
    run.save(num_classes)
    target = run.cfg.finetune.target_accuracy
    return SeedResult(
        seed=run.seed, test_accuracy=run.curve[-1][1], best_test_accuracy=max(acc for _, acc in run.curve),
        steps_to_target=next((int(s) for s, acc in run.curve if acc >= target), None), curve=run.curve,
        train_size=int(len(train_loader.dataset)), test_size=int(len(test_loader.dataset)),
        transferred_tensors=len(transfer["loaded"]), reinitialised_tensors=len(transfer["reinitialised"]),
        adapted_tensors=transfer["adapted"], wall_s=wall,
    ).to_dict()


def seed_loaders(d: TargetDataConfig, s: TargetSettings, train_ds: Any, test_ds: Any, seed: int,
                 ctx: DistContext) -> tuple[Any, Any]:
    """One seed's k-shot training loader (augmented) and the test loader, as `finetune.data` says."""
    norm = "image" if s.normalize == "image" else "dataset"
    tf_train = build_transform(s.img_size, s.in_chans, train=True, mean=s.mean, std=s.std, augment=d.augment,
                               scale=(d.min_scale, 1.0), hflip=d.hflip, crop=d.crop, normalize=norm,
                               jitter=d.jitter)
    tf_eval = build_transform(s.img_size, s.in_chans, train=False, mean=s.mean, std=s.std, normalize=norm)
    return build_target_loaders(
        train_ds, test_ds, transform_train=tf_train, transform_eval=tf_eval, batch_size=d.batch_size,
        num_workers=d.num_workers, rank=ctx.rank, world_size=ctx.world_size, seed=seed,
        shots_per_class=d.shots_per_class, image_column=d.image_column, label_column=d.label_column,
        pin_memory=ctx.device.type == "cuda",  # page-locked batches: the engine's copies are non-blocking
        equal_batches=True,
    )


def fold_runner(stage: str, ctx: DistContext, settings: TargetSettings, state: dict[str, torch.Tensor],
                 meta: dict[str, Any], num_classes: int) -> FoldRunner:
    """How cross-validation (`auto`, and `assess` against scratch) scores a candidate on one fold:
    fine-tune (or, for `scratch`, train from a random init) on the fold's training part, evaluate
    on its held-out part; nothing is logged or saved."""
    def run_fold(cfg: RunConfig, train_part: Any, held_out: Any, seed: int) -> float:
        d = dataclasses.replace(cfg.finetune.data, shots_per_class=0)
        train_loader, held_loader = seed_loaders(d, settings, train_part, held_out, seed, ctx)
        run = SeedRun(stage, cfg.finetune.strategy, cfg, ctx, NullTracker(), settings, seed, index=0)
        run.build_model(None if cfg.finetune.strategy == "scratch" else state, meta, num_classes)
        run.train(train_loader, held_loader, Progress(stage, total=cfg.finetune.steps, enabled=False))
        return run.curve[-1][1]
    return run_fold


def target_stage(stage: str, cfg: RunConfig, reporter: Reporter, ctx: DistContext,
                 tracker: NullTracker) -> dict[str, Any]:
    """`finetune` or `scratch` on one target (`stage` may be a suite target's label)."""
    f, d = cfg.finetune, cfg.finetune.data
    kind, t_start = stage_kind(stage), time.perf_counter()
    state, meta = load_checkpoint(fetch_checkpoint(f.init_from))
    train_ds, test_ds, class_names = load_target_data(d)
    settings = TargetSettings.resolve(cfg, meta, train_ds)
    strategy = f.strategy if kind == "finetune" else "scratch"
    runs = []
    progress = Progress(stage, total=f.steps * len(f.seeds), enabled=ctx.is_main)  # one bar for all seeds
    for index, seed in enumerate(f.seeds):
        def settings_of(c: RunConfig, seed: int = seed) -> TargetSettings:
            base = settings if c is cfg else TargetSettings.resolve(c, meta, train_ds)  # a recipe's own
            return base.for_seed(c.finetune.data, train_ds, class_names, seed)

        def runner_for(c: RunConfig) -> FoldRunner:
            return fold_runner(stage, ctx, settings_of(c), state, meta, len(class_names))

        # Cross-validated on this seed's shots, then trained on all of them: the data recipe,
        # then the strategy under it.
        seed_cfg, recipe, search = cfg, None, None
        if d.recipe == "auto":
            seed_cfg, recipe = choose_recipe(cfg, train_ds, class_names, seed, strategy, runner_for)
        seed_settings = settings_of(seed_cfg)
        if strategy == "auto":
            choice, search = choose(seed_cfg, seed_cfg.finetune.data, train_ds, class_names, seed,
                                    runner_for(seed_cfg))
            seed_cfg = with_candidate(seed_cfg, choice)
        train_loader, test_loader = seed_loaders(seed_cfg.finetune.data, seed_settings, train_ds, test_ds, seed, ctx)
        run = SeedRun(stage, seed_cfg.finetune.strategy if search else strategy, seed_cfg, ctx, tracker,
                      seed_settings, seed, index)
        result = train_one_seed(run, None if strategy == "scratch" else state, meta, len(class_names),
                                train_loader, test_loader, progress)
        runs.append(result | ({"auto": search} if search else {}) | ({"recipe": recipe} if recipe else {}))
    progress.close()
    log_mean_curve(tracker, runs, first_step=len(f.seeds) * (f.steps + 1))
    accs = [r["test_accuracy"] for r in runs]
    reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    memory = gather_peak_rss()
    reporter.report({"test_accuracy": statistics.fmean(accs)})
    return TargetResult(
        init_from=f.init_from if kind == "finetune" else None, architecture=meta["name"], strategy=strategy,
        shots_per_class=d.shots_per_class, num_classes=len(class_names), train_size=runs[0]["train_size"],
        test_size=runs[0]["test_size"], steps=f.steps, seeds=list(f.seeds), test_accuracy=statistics.fmean(accs),
        test_accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, target_accuracy=f.target_accuracy,
        steps_to_target=statistics.fmean(reached) if len(reached) == len(runs) else None,
        reached_target=f"{len(reached)}/{len(runs)}", runs=runs, wall_s=time.perf_counter() - t_start,
        world_size=ctx.world_size, peak_rss_mib=memory, **settings.as_dict(),
    ).to_dict()
