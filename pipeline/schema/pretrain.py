"""Stage one's config: the webdataset stream and the pretraining run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipeline.schema._base import MISSING, MixConfig, ModelConfig, OptimConfig, check, check_norm

AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")


@dataclass
class ShardSourceConfig:
    urls: str = MISSING
    """Shard URLs of this source, brace-expanded (same schemes as `pretrain.data.urls`)."""
    weight: float = 1.0
    """Sampling weight: each sample comes from this source with probability weight / sum of weights."""

    def validate(self, prefix: str) -> None:
        check(bool(self.urls), f"{prefix}.urls", "must name the shards")
        check(self.weight > 0, f"{prefix}.weight", f"must be > 0, got {self.weight}")


@dataclass
class ShardDataConfig:
    urls: Optional[str] = MISSING
    """webdataset shard URLs with brace expansion: local paths, file:, http(s)://, hf://datasets/ORG/NAME/...,
    s3:// or gs:// (via the aws / gcloud CLIs), e.g. `data/fractals/fractals-{000000..000019}.tar`."""
    sources: list[ShardSourceConfig] = field(default_factory=list)
    """Instead of `urls`: several shard sets mixed by weight, e.g. `[{urls: a-{0..9}.tar, weight: 3}, {urls: ...}]`."""
    resampled: bool = False
    """Draw shards with replacement, independently per loader worker, instead of splitting them by rank and
    worker (for very large or mixed corpora; needs only one shard per source)."""
    shard_errors: str = "skip"
    """A shard that cannot be read after `retries` (unreachable, HTTP error, not a tar): `skip` counts it and
    goes on, `raise` stops the run naming the URL. Bad samples inside a shard are always skipped and counted."""
    retries: int = 3
    """Retries per shard for transient failures (connection errors, timeouts, HTTP 5xx/429, a cut transfer)."""
    retry_delay: float = 1.0
    """Seconds before the first retry, doubled for each further one (at most 30 s)."""
    timeout: float = 30.0
    """Seconds without progress (connecting or reading) after which a shard request counts as failed."""
    allow_pipe: bool = False
    """Allow `pipe:CMD` shard URLs, which run CMD in a shell; refused otherwise."""
    samples_per_shard: int = 0
    """Samples per shard for shards without an `_info.json` index (sizes an epoch in the summary); 0 counts
    the first shard to estimate it."""
    num_classes: int = 0
    """Classes in the pretraining labels; 0 reads `num_classes` from the shards' `_info.json`."""
    img_size: int = 32
    """Training resolution (square)."""
    in_chans: int = 3
    """Input channels the model is built with (1 = grayscale, 3 = RGB)."""
    batch_size: int = 128
    """Batch size per worker (rank)."""
    num_workers: int = 1
    """Loader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 2000
    """Samples held in the shuffle buffer of each loader worker."""
    image_key: str = "png;jpg;jpeg;webp"
    """Sample keys holding the image, `;`-separated alternatives."""
    label_key: str = "cls"
    """Sample key holding the integer label (`supervised` only: a label-free objective never reads it, so
    unlabeled and image-text shards, `jpg` + `txt`/`json`, stream as they are)."""
    mean: list[float] = field(default_factory=list)
    """Normalisation mean per channel; empty reads `_info.json`, else ImageNet's."""
    std: list[float] = field(default_factory=list)
    """Normalisation std per channel; empty reads `_info.json`, else ImageNet's."""
    augment: bool = True
    """Random resized crop + horizontal flip while training."""
    min_scale: float = 0.35
    """Smallest area fraction kept by the random resized crop."""
    auto_augment: str = "none"
    """`supervised`: a random photometric/geometric op per sample after the crop, torchvision v2's
    `trivialaugment` (TrivialAugmentWide, Müller & Hutter 2021) or `randaugment` (2 ops at magnitude 9,
    Cubuk et al. 2020); `none` = crop and flip only."""
    decode: str = "worker"
    """Where images are decoded: `worker` (loader workers, PIL) or `device` (JPEGs decoded in batches on the
    training device, nvJPEG on CUDA, cropped and resized there; loader workers only read headers and draw
    the crops, and still decode other formats). `device` pays off at high resolution on a GPU."""

    def validate(self, prefix: str) -> None:
        check(bool(self.urls) or bool(self.sources), f"{prefix}.urls", "must name the shards")
        check(not (self.urls and self.sources), f"{prefix}.sources",
              f"give {prefix}.urls or {prefix}.sources, not both")
        for i, src in enumerate(self.sources):
            src.validate(f"{prefix}.sources[{i}]")
        check(self.shard_errors in ("skip", "raise"), f"{prefix}.shard_errors",
              f"must be skip or raise, got {self.shard_errors!r}")
        check(self.decode in ("worker", "device"), f"{prefix}.decode",
              f"must be worker or device, got {self.decode!r}")
        check(self.retries >= 0, f"{prefix}.retries", f"must be >= 0, got {self.retries}")
        check(self.retry_delay >= 0, f"{prefix}.retry_delay", f"must be >= 0, got {self.retry_delay}")
        check(self.timeout > 0, f"{prefix}.timeout", f"must be > 0, got {self.timeout}")
        check(self.samples_per_shard >= 0, f"{prefix}.samples_per_shard",
              f"must be >= 0, got {self.samples_per_shard}")
        check(self.num_classes >= 0, f"{prefix}.num_classes", f"must be >= 0, got {self.num_classes}")
        check(self.img_size >= 8, f"{prefix}.img_size", f"must be >= 8, got {self.img_size}")
        check(self.in_chans in (1, 3), f"{prefix}.in_chans", f"must be 1 or 3, got {self.in_chans}")
        check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        check(0 < self.min_scale <= 1, f"{prefix}.min_scale", f"must be in (0, 1], got {self.min_scale}")
        check(self.auto_augment in AUTO_AUGMENTS, f"{prefix}.auto_augment",
              f"must be one of {', '.join(AUTO_AUGMENTS)}, got {self.auto_augment!r}")
        check(self.auto_augment == "none" or self.decode == "worker", f"{prefix}.auto_augment",
              f"runs on PIL in the loader workers: needs {prefix}.decode: worker, got {self.decode!r}")
        check_norm(self.mean, self.std, prefix)


OBJECTIVES = ("supervised", "simclr", "dino")


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (Polyak averaging; timm's `ModelEma`), updated after
    every step; the checkpoint's `meta.json` says which weights it holds (`weights: ema` or `model`)."""
    decay: float = 0.0
    """EMA decay per step, warmed up as min(decay, (1 + step) / (10 + step)) so short runs are not stuck
    near the initial weights; 0 = off. 0.99-0.999 for runs of a few hundred to a few thousand steps."""
    hand_on: str = "ema"
    """Weights checkpointed for stage two (and scored by the monitor): `ema` or `model` (the trained ones;
    the EMA is then stage-one state only)."""

    def validate(self, prefix: str) -> None:
        check(0 <= self.decay < 1, f"{prefix}.decay", f"must be in [0, 1), got {self.decay}")
        check(self.hand_on in ("ema", "model"), f"{prefix}.hand_on", f"must be ema or model, got {self.hand_on!r}")


@dataclass
class ViewsConfig:
    """How a label-free objective draws each view of a sample (in the loader workers, torchvision v2 on PIL).
    Defaults: SimCLR's (Chen et al., 2020) CIFAR recipe; blur and solarisation are BYOL's extras, off at 32 px."""
    min_scale: float = 0.08
    """Smallest area fraction kept by each view's random resized crop (`simclr`; `dino` has its own scales)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    jitter: float = 0.4
    """Colour jitter strength: brightness, contrast and saturation by this much, hue by a quarter of it."""
    jitter_p: float = 0.8
    """Probability that a view is colour-jittered."""
    grayscale_p: float = 0.2
    """Probability that a view is turned grey (RGB only)."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur (kernel ~1/10 of the image, sigma 0.1-2)."""
    solarize_p: float = 0.0
    """Probability of solarisation (pixels above 128 inverted)."""

    def validate(self, prefix: str) -> None:
        check(0 < self.min_scale <= 1, f"{prefix}.min_scale", f"must be in (0, 1], got {self.min_scale}")
        check(0 <= self.jitter <= 1, f"{prefix}.jitter", f"must be in [0, 1], got {self.jitter}")
        for key in ("hflip", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, key)
            check(0 <= value <= 1, f"{prefix}.{key}", f"must be a probability in [0, 1], got {value}")


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al., ICML 2020): two views per sample, an MLP projection head, the NT-Xent loss over
    the global batch (every rank's views are the negatives). The head is stage-one state, never transferred."""
    temperature: float = 0.2
    """Softmax temperature of NT-Xent (0.5 in the paper's CIFAR runs, 0.1-0.2 with larger batches)."""
    proj_hidden: int = 512
    """Hidden width of the projection head (Linear-BN-ReLU-Linear)."""
    proj_dim: int = 128
    """Output width of the projection head."""

    def validate(self, prefix: str) -> None:
        check(self.temperature > 0, f"{prefix}.temperature", f"must be > 0, got {self.temperature}")
        check(self.proj_hidden >= 1, f"{prefix}.proj_hidden", f"must be >= 1, got {self.proj_hidden}")
        check(self.proj_dim >= 1, f"{prefix}.proj_dim", f"must be >= 1, got {self.proj_dim}")


@dataclass
class DINOConfig:
    """DINO (Caron et al., ICCV 2021): a student matches an EMA teacher's centred, sharpened output
    across views (2 global crops for the teacher; the student sees those and `local_crops` small ones).
    The teacher, its head and the centre are stage-one state; `hand_on` says which backbone stage two gets."""
    out_dim: int = 1024
    """Prototypes of the DINO head (65,536 in the paper, for ImageNet)."""
    hidden: int = 512
    """Hidden width of the head's 3-layer MLP."""
    bottleneck: int = 128
    """Width of the L2-normalised bottleneck before the weight-normalised last layer."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    teacher_temp: float = 0.04
    """Teacher softmax temperature (sharpening)."""
    center_momentum: float = 0.9
    """EMA momentum of the centre subtracted from the teacher's output (against collapse)."""
    momentum: float = 0.996
    """Teacher EMA momentum at step 0, raised to 1 on a cosine over `pretrain.steps`."""
    global_min_scale: float = 0.4
    """Smallest area fraction of the 2 global crops (their largest is the whole image)."""
    local_crops: int = 2
    """Small crops per sample for the student only (drawn at `data.img_size`, like the global ones)."""
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    """Area range of the local crops."""
    hand_on: str = "teacher"
    """Backbone checkpointed for stage two: `teacher` (the EMA, as the paper evaluates) or `student`."""

    def validate(self, prefix: str) -> None:
        for key in ("out_dim", "hidden", "bottleneck"):
            check(getattr(self, key) >= 1, f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("student_temp", "teacher_temp"):
            check(getattr(self, key) > 0, f"{prefix}.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("center_momentum", "momentum"):
            check(0 <= getattr(self, key) < 1, f"{prefix}.{key}", f"must be in [0, 1), got {getattr(self, key)}")
        check(0 < self.global_min_scale <= 1, f"{prefix}.global_min_scale",
              f"must be in (0, 1], got {self.global_min_scale}")
        check(self.local_crops >= 0, f"{prefix}.local_crops", f"must be >= 0, got {self.local_crops}")
        check(len(self.local_scale) == 2 and 0 < self.local_scale[0] <= self.local_scale[1] <= 1,
              f"{prefix}.local_scale", f"must be [low, high] with 0 < low <= high <= 1, got {list(self.local_scale)}")
        check(self.hand_on in ("teacher", "student"), f"{prefix}.hand_on",
              f"must be teacher or student, got {self.hand_on!r}")


@dataclass
class PretrainConfig:
    enabled: bool = True
    """Run stage one (`run` only; set false with `finetune.init_from` to reuse a checkpoint)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture being pretrained."""
    data: ShardDataConfig = field(default_factory=ShardDataConfig)
    """The webdataset stream."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=50))
    """Optimiser and schedule."""
    objective: str = "supervised"
    """What stage one learns from: `supervised` (cross-entropy on `data.label_key`), or, label-free (any image
    stream; labels and text ignored), `simclr` (contrastive, two views per sample) or `dino`
    (self-distillation from an EMA teacher, 2 global + `dino.local_crops` views per sample)."""
    label_smoothing: float = 0.0
    """`supervised`: the share of each target spread over the other classes (Szegedy et al., 2016); 0 = off."""
    mix: MixConfig = field(default_factory=MixConfig)
    """`supervised`: MixUp / CutMix of each batch."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """An EMA of the weights, and whether stage two gets it (`supervised`, `simclr`; `dino` has its teacher)."""
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    """The `simclr` objective's loss and projection head."""
    dino: DINOConfig = field(default_factory=DINOConfig)
    """The `dino` objective's head, teacher and crops."""
    views: ViewsConfig = field(default_factory=ViewsConfig)
    """View augmentation of label-free objectives (replaces `data.augment` / `data.min_scale` for them)."""
    steps: int = 1000
    """Optimiser steps; every rank runs exactly this many."""
    checkpoint_every: int = 0
    """Save (and report) a checkpoint every N steps; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Committed checkpoints kept on disk; older ones are deleted."""
    monitor_every: int = 0
    """Every N steps rank 0 records kNN accuracy of the target(s) on the current features; 0 = off."""
    monitor_shots: int = 10
    """Monitor: training images per class kept as the kNN memory."""
    monitor_queries: int = 200
    """Monitor: fixed test images scored each time."""
    seed: int = 0
    """Seed for init, shard order and augmentation."""

    @property
    def labeled(self) -> bool:
        """Whether the objective reads class labels (only then do shards need `label_key`)."""
        return self.objective == "supervised"

    def validate(self, prefix: str, *, has_target: bool) -> None:
        """`has_target`: stage two names a dataset (or a suite) the monitor can score."""
        self.model.validate(f"{prefix}.model")
        check(self.objective in OBJECTIVES, f"{prefix}.objective",
              f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        check(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing",
              f"must be in [0, 1), got {self.label_smoothing}")
        self.mix.validate(f"{prefix}.mix")
        self.ema.validate(f"{prefix}.ema")
        if not self.labeled:  # these read or mix labels; label-free objectives draw views from pretrain.views
            check(not self.mix.enabled, f"{prefix}.mix", f"{self.objective} reads no labels to mix: set "
                  f"{prefix}.mix.mixup_alpha and cutmix_alpha to 0 (its views come from {prefix}.views)")
            check(self.data.auto_augment == "none", f"{prefix}.data.auto_augment",
                  f"{self.objective} draws its views from {prefix}.views: set it to none")
        check(self.objective != "dino" or not self.ema.decay, f"{prefix}.ema.decay",
              f"dino's teacher is an EMA of the weights already ({prefix}.dino.momentum, {prefix}.dino.hand_on): "
              "set it to 0")
        self.simclr.validate(f"{prefix}.simclr")
        self.dino.validate(f"{prefix}.dino")
        self.views.validate(f"{prefix}.views")
        check(self.steps >= 1, f"{prefix}.steps", f"must be >= 1, got {self.steps}")
        check(self.checkpoint_every >= 0, f"{prefix}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(self.monitor_every >= 0, f"{prefix}.monitor_every", f"must be >= 0, got {self.monitor_every}")
        check(self.monitor_shots >= 1, f"{prefix}.monitor_shots", f"must be >= 1, got {self.monitor_shots}")
        check(self.monitor_queries >= 1, f"{prefix}.monitor_queries", f"must be >= 1, got {self.monitor_queries}")
        if self.monitor_every:
            check(has_target, f"{prefix}.monitor_every",
                  "the monitor scores finetune.data.source (or finetune.targets), which is not set")
        self.data.validate(f"{prefix}.data")
        check(self.labeled or self.data.decode == "worker", f"{prefix}.data.decode",
              f"{self.objective} draws its views in the loader workers: decode must be worker, got {self.data.decode!r}")
        self.optim.validate(f"{prefix}.optim")
