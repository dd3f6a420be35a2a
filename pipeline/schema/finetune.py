"""Stage two's config: the target dataset(s), the transfer strategy, and the scratch baseline."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.schema._base import MISSING, MixConfig, OptimConfig, check, check_norm

STRATEGIES = ("linear_probe", "full", "head_then_all", "partial", "auto")
AUTO_CANDIDATES = ("linear_probe", "full", "head_then_all", "partial")
NORMALIZE = ("checkpoint", "target", "image")
_TARGET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TargetDataConfig:
    source: Optional[str] = MISSING
    """HF dataset: a `save_to_disk` directory, an imagefolder directory, or a hub name (online)."""
    train_split: str = "train"
    """Split used for training (k-shot subsets are drawn from it)."""
    test_split: str = "test"
    """Split used for evaluation."""
    image_column: str = "image"
    """Column holding the images."""
    label_column: str = "label"
    """Column holding integer labels."""
    shots_per_class: int = 0
    """Training images per class (a stratified subset drawn per seed); 0 uses the whole split."""
    img_size: int = 0
    """Fine-tuning resolution; 0 uses the target's own (the median short side of its training
    images), raised to the checkpoint's and capped at twice it."""
    in_chans: int = 0
    """Input channels; 0 uses the checkpoint's (1<->3 are adapted from the checkpoint's stem)."""
    normalize: str = "checkpoint"
    """Input normalisation: `checkpoint` (the pretraining corpus' mean/std, or `mean`/`std` when
    given), `target` (per-channel mean/std of the training images each seed uses, so the target
    reaches the backbone as standardised as the corpus did) or `image` (each image standardised
    by its own mean and std)."""
    mean: list[float] = field(default_factory=list)
    """Normalisation mean with `normalize: checkpoint`; empty uses the checkpoint's."""
    std: list[float] = field(default_factory=list)
    """Normalisation std with `normalize: checkpoint`; empty uses the checkpoint's."""
    batch_size: int = 64
    """Batch size per worker; a training set no larger trains in full batches, a larger one in
    equal batches (the ragged last batch of an epoch is dropped; every epoch reshuffles)."""
    num_workers: int = 0
    """Loader worker processes per rank."""
    augment: bool = True
    """Random crops (and `hflip`) while training."""
    crop: str = "pad"
    """Training crop: `pad` (reflect-pad by an eighth of the size, random crop back: shifts only,
    the classic small-image augmentation) or `resized` (random resized crop down to `min_scale`
    of the area: zooms, which cost 7 points on 5-shot textures in scripts/bench_transfer.py)."""
    min_scale: float = 0.6
    """Smallest area fraction kept by `crop: resized`."""
    hflip: float = 0.0
    """Horizontal flip probability while training. 0 by default: digits and text are not mirror
    symmetric (0.5 cost 8 points on 5-shot digits); 0.5 helps where classes are (textures +1.5,
    photographs +3 in scripts/bench_transfer.py)."""
    jitter: float = 0.0
    """Brightness and contrast jitter while training: each factor drawn from [1 - jitter,
    1 + jitter] (torchvision v2 `ColorJitter`); 0 disables it. Off by default: 0.4 cost 5-shot
    `surfaces` 7-10 points and did not help `textures` in scripts/bench_transfer.py."""

    recipe: str = "fixed"
    """`fixed`: `normalize` and `hflip` as set here. `auto`: per seed, cross-validation on the
    training shots picks them among `finetune.auto.recipes` (the folds and fold budget of
    `finetune.auto`), for this stage's own strategy (the scratch baseline picks its own); what is
    right is the target's: flips and per-image standardisation cost digits and colour
    photographs points and give texture photographs 6 (scripts/bench_transfer.py)."""

    def validate(self, prefix: str) -> None:
        check(bool(self.source), f"{prefix}.source", "must name the target dataset")
        check(self.recipe in ("fixed", "auto"), f"{prefix}.recipe", f"must be fixed or auto, got {self.recipe!r}")
        check(self.shots_per_class >= 0, f"{prefix}.shots_per_class", f"must be >= 0, got {self.shots_per_class}")
        check(self.img_size == 0 or self.img_size >= 8, f"{prefix}.img_size",
              f"must be 0 or >= 8, got {self.img_size}")
        check(self.in_chans in (0, 1, 3), f"{prefix}.in_chans", f"must be 0, 1 or 3, got {self.in_chans}")
        check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        check(0 < self.min_scale <= 1, f"{prefix}.min_scale", f"must be in (0, 1], got {self.min_scale}")
        check(self.normalize in NORMALIZE, f"{prefix}.normalize",
              f"must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        check(self.normalize == "checkpoint" or not (self.mean or self.std), f"{prefix}.mean",
              f"mean/std are the statistics of normalize: checkpoint; with normalize: {self.normalize} they would "
              "be ignored: drop them or set normalize: checkpoint")
        check(self.crop in ("resized", "pad"), f"{prefix}.crop", f"must be resized or pad, got {self.crop!r}")
        check(0 <= self.hflip <= 1, f"{prefix}.hflip", f"must be in [0, 1], got {self.hflip}")
        check(0 <= self.jitter < 1, f"{prefix}.jitter", f"must be in [0, 1), got {self.jitter}")
        check_norm(self.mean, self.std, prefix)


@dataclass
class TargetConfig:
    name: str = ""
    """Name in results, directories and W&B run ids; empty = the source directory's name."""
    data: TargetDataConfig = field(default_factory=TargetDataConfig)
    """This target's dataset, split, shots and preprocessing (same keys as `finetune.data`)."""
    strategy: str = ""
    """Transfer strategy for this target; empty = `finetune.strategy`."""

    def validate(self, prefix: str) -> None:
        """Checks of this target alone; `FinetuneConfig` checks that names are unique."""
        self.data.validate(f"{prefix}.data")
        check(self.strategy == "" or self.strategy in STRATEGIES, f"{prefix}.strategy",
              f"must be empty (finetune.strategy) or one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        name = target_name(self)
        check(bool(_TARGET_NAME.match(name)), f"{prefix}.name",
              f"must be letters, digits, '_', '.' or '-' (it names directories and W&B runs), got {name!r}"
              + ("" if self.name else f" (from data.source; set {prefix}.name)"))


def target_name(t: TargetConfig) -> str:
    """A suite target's name: `name`, else the last part of its source (directory or hub name)."""
    return t.name or Path(str(t.data.source or "").rstrip("/")).name


@dataclass
class AutoConfig:
    """`strategy: auto`: per target and seed, k-fold cross-validation on the training shots picks
    the strategy (and layer decay), which then trains on all the shots."""
    candidates: list[str] = field(default_factory=lambda: ["full", "linear_probe", "head_then_all"])
    """Strategies to choose among (`partial` uses `finetune.partial_blocks`). The first, with the
    first of `layer_decays`, is the default: kept unless another clears the fold noise (`confidence`)."""
    layer_decays: list[float] = field(default_factory=lambda: [1.0, 0.7])
    """Layer decays tried with each candidate that trains the backbone (1.0: none)."""
    folds: int = 3
    """Cross-validation folds (fewer when a class has fewer shots; at least 2)."""
    steps: int = 0
    """Steps of each fold's fine-tune; 0 uses half of `finetune.steps` (the search's budget is
    folds x candidates x decays x steps, on top of the final fine-tune)."""
    recipes: list[str] = field(default_factory=lambda: ["checkpoint", "checkpoint+hflip", "image", "image+hflip"])
    """Data recipes `finetune.data.recipe: auto` chooses among: a `normalize` value, with
    `+hflip` for horizontal flips at p = 0.5 (its budget: folds x recipes x steps per seed). The
    first is the default, as for `candidates`."""
    confidence: float = 0.9
    """Both searches keep their default (the first option) unless another's gain over it, paired
    fold by fold, has a two-sided t-interval at this confidence entirely above zero (0: the best
    mean wins outright), its spread taken as at least one held-out image. The held-out shots are
    few, so most differences are noise."""

    def validate(self, prefix: str, partial_blocks: int) -> None:
        check(len(self.recipes) >= 1, f"{prefix}.recipes", "needs at least one recipe")
        for r in self.recipes:
            norm, _, flip = r.partition("+")
            check(norm in NORMALIZE and flip in ("", "hflip"), f"{prefix}.recipes",
                  f"each must be one of {', '.join(NORMALIZE)}, optionally with +hflip; got {r!r}")
        check(len(self.candidates) >= 1, f"{prefix}.candidates", "needs at least one strategy")
        for c in self.candidates:
            check(c in AUTO_CANDIDATES, f"{prefix}.candidates",
                  f"must be among {', '.join(AUTO_CANDIDATES)}, got {c!r}")
        check("partial" not in self.candidates or partial_blocks >= 1, f"{prefix}.candidates",
              "partial needs finetune.partial_blocks >= 1")
        check(len(self.layer_decays) >= 1 and all(0 < d <= 1 for d in self.layer_decays), f"{prefix}.layer_decays",
              f"needs values in (0, 1], got {list(self.layer_decays)}")
        check(self.folds >= 2, f"{prefix}.folds", f"must be >= 2, got {self.folds}")
        check(self.steps >= 0, f"{prefix}.steps", f"must be >= 0, got {self.steps}")
        check(0 <= self.confidence < 1, f"{prefix}.confidence", f"must be in [0, 1), got {self.confidence}")


@dataclass
class FinetuneConfig:
    enabled: bool = True
    """Run stage two."""
    init_from: str = ""
    """Checkpoint directory to start from; empty in `run` means stage one's checkpoint."""
    strategy: str = "full"
    """`linear_probe` (frozen backbone, new head), `full`, `head_then_all` (head, then all at a
    lower LR), `partial` (first `partial_blocks` blocks transferred, the rest re-initialised) or
    `auto` (chosen per target and seed by cross-validation on the training shots; see `auto`)."""
    auto: AutoConfig = field(default_factory=AutoConfig)
    """The search of `strategy: auto`."""
    partial_blocks: int = 0
    """`partial`: how many leading blocks of `model.transfer_blocks()` keep their weights."""
    shrink: float = 1.0
    """Shrink and perturb (Ash & Adams, NeurIPS 2020): every transferred parameter starts at
    `shrink` x its checkpoint value + `perturb` x its fresh initialisation (buffers such as
    BatchNorm's running statistics are copied as they are). 1 and 0, the defaults, copy the checkpoint
    (0.5 / 0.5 and 0.8 / 0.2 did not beat `partial` on the bench: README, "Does pretraining pay off?")."""
    perturb: float = 0.0
    """The fresh initialisation's share of shrink and perturb (see `shrink`)."""
    l2sp: float = 0.0
    """Decay toward the checkpoint instead of toward zero (L2-SP, Li et al., ICML 2018, decoupled as
    in AdamW): each step, every parameter copied from the checkpoint moves `lr x l2sp` of the way
    back to its pretrained value, and gets no ordinary weight decay; new parameters (the head,
    re-initialised blocks) decay toward zero as before. 0 = off. The scratch baseline never
    anchors (it has nothing to keep)."""
    head_steps: int = 0
    """`head_then_all`: steps of the head-only phase; 0 means a quarter of `steps`."""
    all_lr_scale: float = 0.1
    """`head_then_all`: LR multiplier for the all-layers phase."""
    head_lr_scale: float = 10.0
    """LR multiplier while only the head trains (`linear_probe`, `head_then_all`'s first phase): a
    new linear layer on frozen features takes a larger step than a whole network (10 against 1
    gained 3.3 points on average for `linear_probe` and 1.2 for `head_then_all` on the bench:
    README, "Does pretraining pay off?")."""
    label_smoothing: float = 0.0
    """The share of each training target spread over the other classes (Szegedy et al., 2016), in
    every stage-two fit (fine-tunes, the scratch baseline, cross-validation folds); 0 = off."""
    mix: MixConfig = field(default_factory=lambda: MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0))
    """MixUp / CutMix of each training batch in every stage-two fit (the scratch baseline too: both
    arms share one recipe). On by default, one of the two per batch: on scripts/bench_transfer.py's
    4 targets x k = 2, 5, 10 (3 seeds) it gained `full` 2.4 points on average (-0.2 to +6.7 per
    cell) and left scratch where it was (-0.0 on average, -3.1 to +3.0); set both alphas to 0 to
    turn it off."""
    freeze_bn: bool = True
    """Keep frozen layers in eval mode so their normalisation statistics are untouched."""
    steps: int = 800
    """Optimiser steps per seed. Long enough for a from-scratch baseline on a few hundred images to
    converge: at 200-400 it was still rising on the bench, so transfer looked better than it was."""
    eval_every: int = 25
    """Evaluate on the test split every N steps (and at step 0 and the end)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One fine-tune per seed (k-shot subset, head init, order); results report mean and spread."""
    target_accuracy: float = 0.9
    """Report the steps needed to first reach this test accuracy."""
    assess: bool = True
    """Before the report, predict fine-tuning's gain over scratch by cross-validation on the
    training shots (the folds and steps of `auto`: 2 x folds short fits) and score the
    checkpoint's frozen features (kNN, ridge probe, LogME) against a random backbone: the
    prediction beside the result."""
    data: TargetDataConfig = field(default_factory=TargetDataConfig)
    """The target dataset (the single-target form; leave unset when `targets` is given)."""
    targets: list[TargetConfig] = field(default_factory=list)
    """A transfer suite: several targets fine-tuned from the same stage-one checkpoint, each with
    its own from-scratch baseline; replaces `data`. Every other `finetune` key applies to all."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=10)
    )
    """Optimiser and schedule for stage two."""

    def validate(self, prefix: str, *, needs_init_from: bool) -> None:
        """`needs_init_from`: stage one does not run, so nothing else provides the checkpoint."""
        check(self.strategy in STRATEGIES, f"{prefix}.strategy",
              f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        strategies = [self.strategy] + [t.strategy or self.strategy for t in self.targets]
        if needs_init_from:
            check(bool(self.init_from), f"{prefix}.init_from",
                  "required when stage one does not run: the checkpoint directory to start from")
        check(self.steps >= 1, f"{prefix}.steps", f"must be >= 1, got {self.steps}")
        check(self.eval_every >= 1, f"{prefix}.eval_every", f"must be >= 1, got {self.eval_every}")
        check(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", f"must be distinct, got {list(self.seeds)}")
        check(0 < self.target_accuracy <= 1, f"{prefix}.target_accuracy",
              f"must be in (0, 1], got {self.target_accuracy}")
        check(self.partial_blocks >= 0, f"{prefix}.partial_blocks", f"must be >= 0, got {self.partial_blocks}")
        if "partial" in strategies:
            check(self.partial_blocks >= 1, f"{prefix}.partial_blocks", "strategy=partial needs partial_blocks >= 1")
        check(0 < self.shrink <= 1, f"{prefix}.shrink", f"must be in (0, 1], got {self.shrink}")
        check(0 <= self.perturb <= 1, f"{prefix}.perturb", f"must be in [0, 1], got {self.perturb}")
        check(0 <= self.l2sp and self.l2sp * self.optim.lr < 1, f"{prefix}.l2sp",
              f"must be >= 0 with l2sp x {prefix}.optim.lr below 1 (the share of the way back per step), "
              f"got {self.l2sp} x {self.optim.lr}")
        check(0 <= self.head_steps < self.steps, f"{prefix}.head_steps",
              f"must be in [0, {prefix}.steps={self.steps}), got {self.head_steps}")
        check(0 < self.all_lr_scale <= 1, f"{prefix}.all_lr_scale", f"must be in (0, 1], got {self.all_lr_scale}")
        check(self.head_lr_scale > 0, f"{prefix}.head_lr_scale", f"must be > 0, got {self.head_lr_scale}")
        check(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing",
              f"must be in [0, 1), got {self.label_smoothing}")
        self.mix.validate(f"{prefix}.mix")
        if self.targets:
            check(not self.data.source, f"{prefix}.data.source",
                  f"give {prefix}.data (one target) or {prefix}.targets (a suite), not both")
            self._validate_targets(prefix)
        else:
            self.data.validate(f"{prefix}.data")
        self.optim.validate(f"{prefix}.optim")
        datas = [t.data for t in self.targets] or [self.data]
        searched = [d for d in datas if d.recipe == "auto"]
        if "auto" in strategies or searched:
            self.auto.validate(f"{prefix}.auto", self.partial_blocks)
            shots = [d.shots_per_class for d in (datas if "auto" in strategies else searched)]
            key = f"{prefix}.auto" if "auto" in strategies else f"{prefix}.data.recipe"
            check(all(k == 0 or k >= 2 for k in shots), key,
                  f"cross-validation needs at least 2 shots per class, got shots_per_class {shots}")

    def _validate_targets(self, prefix: str) -> None:
        seen: dict[str, int] = {}
        for i, t in enumerate(self.targets):
            key = f"{prefix}.targets[{i}]"
            t.validate(key)
            name = target_name(t)
            check(name not in seen, f"{key}.name",
                  f"{name!r} is also the name of {prefix}.targets[{seen.get(name)}]; give each target its own name")
            seen[name] = i


@dataclass
class ScratchConfig:
    enabled: bool = True
    """Train the same architecture from random init on the same target data (the baseline)."""
    lr: float = 0.0
    """Peak LR for the baseline; 0 uses `finetune.optim.lr`. Everything else matches stage two."""

    def validate(self, prefix: str) -> None:
        check(self.lr >= 0, f"{prefix}.lr", f"must be >= 0, got {self.lr}")
