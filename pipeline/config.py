"""Typed run configuration: dataclasses, YAML + dotlist loading, validation, saving.

The only module that imports omegaconf. Every field carries a docstring; `???` marks what a
user must give. Every error is a `ConfigError` whose message starts with the full key
(`pretrain.optim.lr: ...`) and is raised before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

STAGES = ("pretrain", "finetune", "scratch")
STRATEGIES = ("linear_probe", "full", "head_then_all", "partial")
# Ray Train storage: a path ("" scheme, local or NFS) or an object store pyarrow reaches.
STORAGE_SCHEMES = ("", "file", "s3", "gs")


class ConfigError(ValueError):
    """A configuration problem; the message names the full key."""


@dataclass
class ModelConfig:
    name: str = "hybrid_tiny"
    """Registry name (see `transferline models`) or an import path `package.module:factory`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model factory (depths, dims, drop_path_rate, ...)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimiser: `adamw` or `sgd`."""
    lr: float = 1e-3
    """Peak learning rate (per worker batch; not rescaled by world size)."""
    weight_decay: float = 0.05
    """Decoupled weight decay; norms, biases and `no_weight_decay()` params take none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to `lr`."""
    schedule: str = "cosine"
    """After warm-up: `cosine` (to `min_lr_ratio * lr`) or `constant`."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr` for the cosine schedule."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: block i of n trains at lr * layer_decay**(n - i); 1.0 disables."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ShardSourceConfig:
    urls: str = MISSING
    """Shard URLs of this source, brace-expanded (same schemes as `pretrain.data.urls`)."""
    weight: float = 1.0
    """Sampling weight: each sample comes from this source with probability weight / sum of weights."""


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
    """Sample key holding the integer label."""
    mean: list[float] = field(default_factory=list)
    """Normalisation mean per channel; empty reads `_info.json`, else ImageNet's."""
    std: list[float] = field(default_factory=list)
    """Normalisation std per channel; empty reads `_info.json`, else ImageNet's."""
    augment: bool = True
    """Random resized crop + horizontal flip while training."""
    min_scale: float = 0.35
    """Smallest area fraction kept by the random resized crop."""
    decode: str = "worker"
    """Where images are decoded: `worker` (loader workers, PIL) or `device` (JPEGs decoded in batches on the
    training device, nvJPEG on CUDA, cropped and resized there; loader workers only read headers and draw
    the crops, and still decode other formats). `device` pays off at high resolution on a GPU."""


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
    """Fine-tuning resolution; 0 uses the checkpoint's."""
    in_chans: int = 0
    """Input channels; 0 uses the checkpoint's (1<->3 are adapted from the checkpoint's stem)."""
    mean: list[float] = field(default_factory=list)
    """Normalisation mean; empty uses the checkpoint's (as pretrained weights expect)."""
    std: list[float] = field(default_factory=list)
    """Normalisation std; empty uses the checkpoint's."""
    batch_size: int = 64
    """Batch size per worker."""
    num_workers: int = 0
    """Loader worker processes per rank."""
    augment: bool = True
    """Random resized crop while training (no flips: digits and text are not symmetric)."""
    min_scale: float = 0.6
    """Smallest area fraction kept by the random resized crop."""


@dataclass
class TargetConfig:
    name: str = ""
    """Name in results, directories and W&B run ids; empty = the source directory's name."""
    data: TargetDataConfig = field(default_factory=TargetDataConfig)
    """This target's dataset, split, shots and preprocessing (same keys as `finetune.data`)."""
    strategy: str = ""
    """Transfer strategy for this target; empty = `finetune.strategy`."""


@dataclass
class FinetuneConfig:
    enabled: bool = True
    """Run stage two."""
    init_from: str = ""
    """Checkpoint directory to start from; empty in `run` means stage one's checkpoint."""
    strategy: str = "full"
    """`linear_probe` (frozen backbone, new head), `full`, `head_then_all` (head, then all at a
    lower LR) or `partial` (first `partial_blocks` blocks transferred, the rest re-initialised)."""
    partial_blocks: int = 0
    """`partial`: how many leading blocks of `model.transfer_blocks()` keep their weights."""
    head_steps: int = 0
    """`head_then_all`: steps of the head-only phase; 0 means a quarter of `steps`."""
    all_lr_scale: float = 0.1
    """`head_then_all`: LR multiplier for the all-layers phase."""
    freeze_bn: bool = True
    """Keep frozen layers in eval mode so their normalisation statistics are untouched."""
    steps: int = 300
    """Optimiser steps per seed."""
    eval_every: int = 25
    """Evaluate on the test split every N steps (and at step 0 and the end)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One fine-tune per seed (k-shot subset, head init, order); results report mean and spread."""
    target_accuracy: float = 0.9
    """Report the steps needed to first reach this test accuracy."""
    assess: bool = True
    """Before the report, score the checkpoint's frozen features (kNN, ridge probe, LogME) against a
    random backbone on the training images fine-tuning used: the prediction beside the result."""
    data: TargetDataConfig = field(default_factory=TargetDataConfig)
    """The target dataset (the single-target form; leave unset when `targets` is given)."""
    targets: list[TargetConfig] = field(default_factory=list)
    """A transfer suite: several targets fine-tuned from the same stage-one checkpoint, each with
    its own from-scratch baseline; replaces `data`. Every other `finetune` key applies to all."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=10)
    )
    """Optimiser and schedule for stage two."""


@dataclass
class ScratchConfig:
    enabled: bool = True
    """Train the same architecture from random init on the same target data (the baseline)."""
    lr: float = 0.0
    """Peak LR for the baseline; 0 uses `finetune.optim.lr`. Everything else matches stage two."""


@dataclass
class LauncherConfig:
    kind: str = "ray"
    """`ray`: one Ray Train TorchTrainer per stage; `local`: in-process on one device."""
    num_workers: int = 2
    """Ray Train workers (ranks) per stage."""
    use_gpu: Optional[bool] = None
    """One GPU per worker; null = when the cluster has GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Ray worker."""
    address: str = ""
    """Ray cluster address; empty starts a private local Ray on 127.0.0.1."""
    storage_path: str = ""
    """Where Ray Train stores checkpoints: a local or NFS path, `s3://bucket/prefix` or
    `gs://bucket/prefix`; empty = `<output_dir>/ray`. A run on more than one node needs shared
    storage (NFS or an object store); a node-local path is refused there."""


@dataclass
class FailureConfig:
    max_failures: int = 2
    """Ray restarts of a stage's worker group after a failure (a dead worker or node, an
    error); each restart resumes from the last reported checkpoint. 0 fails at once, -1
    retries forever. Maps to Ray Train's `FailureConfig(max_failures)`."""


@dataclass
class EngineConfig:
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    precision: str = "auto"
    """`auto` (bf16 autocast on CUDA, fp32 on CPU), `bf16` or `fp32`."""
    channels_last: Optional[bool] = None
    """Channels-last memory format; null = on CUDA only."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    log_every: int = 10
    """Report training metrics every N steps."""
    threads: int = 0
    """torch intra-op threads per worker; 0 leaves torch's default."""
    peak_tflops: float = 0.0
    """Device peak for MFU; 0 = measure the dense bf16 matmul rate on CUDA at start (no MFU on CPU)."""


@dataclass
class TrackingConfig:
    mode: str = "offline"
    """Weights & Biases: `offline` (files under the run dir; `wandb sync` later), `online`
    (needs WANDB_API_KEY) or `disabled`."""
    project: str = "transferline"
    """W&B project."""
    entity: str = ""
    """W&B entity (team or user); empty = the account default."""
    timeout_s: float = 60.0
    """Seconds W&B may take to start a run (and, online, to answer the driver's check) before
    the run falls back to offline; tracking never stops training."""
    log_checkpoint: bool = True
    """Log stage one's final checkpoint as a W&B `model` artifact (stage two records it as input)."""


@dataclass
class RunConfig:
    name: str = "transferline"
    """Run name: the output directory and the W&B group."""
    output_dir: str = "runs/${name}"
    """Where checkpoints, results, summary.json, report.md and curves.png go."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """How stages are launched."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Device, precision and loop options shared by all stages."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Stage one: pretraining on webdataset shards."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Stage two: fine-tuning on the target dataset."""
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    """The from-scratch baseline on the same target data."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    failure: FailureConfig = field(default_factory=FailureConfig)
    """What happens when a worker dies: restarts from the last checkpoint (Ray launcher)."""


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "<root>"
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{key}: {msg} (in {source})")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, command: str = "run"
) -> RunConfig:
    """YAML file + dotlist overrides -> validated `RunConfig` for `command` (run|pretrain|finetune)."""
    cfg = _schema()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"<config>: file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come from the yaml parser, not omegaconf
            first = " ".join(str(e).split())
            raise ConfigError(f"<config>: {path} is not valid YAML: {first}") from None
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _wrap(e, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value (got {item!r})")
        try:
            cfg = _apply_override(cfg, item)
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override {item!r}") from None
        except yaml.YAMLError as e:  # the value is parsed as YAML: unbalanced brackets, stray braces
            first = " ".join(str(e).split())
            raise ConfigError(f"{item.split('=', 1)[0]}: the value is not valid YAML ({first}); "
                              "quote values with braces, e.g. 'key=\"a-{0..3}.tar\"'") from None
    return _finalise(cfg, command)


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """`key=value` merged into `cfg`; a key through a list (`finetune.targets.1.data.shots_per_class`)
    is set in place, as a dotlist merge cannot index lists."""
    key, value = item.split("=", 1)
    node = OmegaConf.select(cfg, key.rsplit(".", 1)[0], throw_on_missing=False) if "." in key else None
    parts = key.split(".")
    through_list = any(p.isdigit() for p in parts[:-1]) or (node is not None and OmegaConf.is_list(node))
    if not through_list:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
    OmegaConf.update(cfg, key, parsed, merge=True)
    return cfg


def config_from_dict(data: dict[str, Any], *, command: str = "run") -> RunConfig:
    """Rebuild a validated config from `to_dict` output (how configs travel to Ray workers)."""
    try:
        cfg = OmegaConf.merge(_schema(), OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise _wrap(e, "dict") from None
    return _finalise(cfg, command)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, resolved dict of a config (JSON/YAML-serialisable)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: RunConfig | Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, with any secret that slipped into it redacted
    (secrets belong in the environment; workers get the live config, not this file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    from pipeline.redact import redact_secrets

    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(redact_secrets(to_dict(cfg)))))
    tmp.replace(path)
    return path


def stages_for(command: str, cfg: RunConfig) -> list[str]:
    """Stages a command runs, in order."""
    if command == "pretrain":
        return ["pretrain"]
    if command == "finetune":
        return ["finetune"] + (["scratch"] if cfg.scratch.enabled else [])
    stages = []
    if cfg.pretrain.enabled:
        stages.append("pretrain")
    if cfg.finetune.enabled:
        stages.append("finetune")
    if cfg.scratch.enabled and cfg.finetune.enabled:
        stages.append("scratch")
    return stages


def _finalise(cfg: DictConfig, command: str) -> RunConfig:
    if command not in ("run", "pretrain", "finetune"):
        raise ConfigError(f"<command>: unknown command {command!r}")
    # `???` values are required only for the stages this command runs.
    pretrain_on = command == "pretrain" or (command == "run" and cfg.pretrain.enabled)
    finetune_on = command == "finetune" or (command == "run" and cfg.finetune.enabled)
    needed = {"pretrain.": pretrain_on, "finetune.": finetune_on}
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if key == "pretrain.data.urls" and cfg.pretrain.data.sources:  # the weighted sources replace it
            OmegaConf.update(cfg, key, None, merge=False)
        elif key == "finetune.data.source" and cfg.finetune.targets:  # a suite replaces finetune.data
            OmegaConf.update(cfg, key, None, merge=False)
        elif any(key.startswith(p) and not on for p, on in needed.items()):
            OmegaConf.update(cfg, key, None, merge=False)
        else:
            raise ConfigError(f"{key}: required value is missing (`???`); set it in the YAML or as {key}=...")
    try:
        obj: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _wrap(e, "config") from None
    validate(obj, command)
    return obj


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _validate_optim(o: OptimConfig, prefix: str) -> None:
    _check(o.name in ("adamw", "sgd"), f"{prefix}.name", f"must be adamw or sgd, got {o.name!r}")
    _check(o.lr > 0, f"{prefix}.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(len(o.betas) == 2, f"{prefix}.betas", f"needs two values, got {list(o.betas)}")
    _check(o.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.schedule in ("cosine", "constant"), f"{prefix}.schedule",
           f"must be cosine or constant, got {o.schedule!r}")
    _check(0 <= o.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(0 < o.layer_decay <= 1, f"{prefix}.layer_decay", f"must be in (0, 1], got {o.layer_decay}")
    _check(o.clip_grad_norm >= 0, f"{prefix}.clip_grad_norm", f"must be >= 0, got {o.clip_grad_norm}")


def _validate_norm(mean: list[float], std: list[float], prefix: str) -> None:
    _check(len(mean) == len(std), f"{prefix}.mean",
           f"mean and std need the same length, got {len(mean)} and {len(std)}")
    _check(all(s > 0 for s in std), f"{prefix}.std", f"values must be > 0, got {list(std)}")


def validate(cfg: RunConfig, command: str = "run") -> None:
    """Semantic checks the schema cannot express; each names the full key."""
    _check(bool(cfg.name) and "/" not in cfg.name, "name", f"must be a non-empty name without '/', got {cfg.name!r}")
    la = cfg.launcher
    _check(la.kind in ("ray", "local"), "launcher.kind", f"must be ray or local, got {la.kind!r}")
    _check(la.num_workers >= 1, "launcher.num_workers", f"must be >= 1, got {la.num_workers}")
    _check(la.cpus_per_worker > 0, "launcher.cpus_per_worker", f"must be > 0, got {la.cpus_per_worker}")
    scheme = la.storage_path.split("://", 1)[0].lower() if "://" in la.storage_path else ""
    _check(scheme in STORAGE_SCHEMES, "launcher.storage_path",
           f"must be a local/NFS path or a {', '.join(s + '://' for s in STORAGE_SCHEMES if s)} URI, "
           f"got {la.storage_path!r}")
    _check(cfg.failure.max_failures >= -1, "failure.max_failures",
           f"must be >= 0, or -1 to retry forever, got {cfg.failure.max_failures}")
    en = cfg.engine
    _check(en.device in ("auto", "cpu", "cuda"), "engine.device", f"must be auto, cpu or cuda, got {en.device!r}")
    _check(en.precision in ("auto", "bf16", "fp32"), "engine.precision",
           f"must be auto, bf16 or fp32, got {en.precision!r}")
    _check(en.grad_accum_steps >= 1, "engine.grad_accum_steps", f"must be >= 1, got {en.grad_accum_steps}")
    _check(en.log_every >= 1, "engine.log_every", f"must be >= 1, got {en.log_every}")
    _check(en.threads >= 0, "engine.threads", f"must be >= 0, got {en.threads}")
    _check(en.peak_tflops >= 0, "engine.peak_tflops", f"must be >= 0, got {en.peak_tflops}")
    _check(cfg.tracking.mode in ("offline", "online", "disabled"), "tracking.mode",
           f"must be offline, online or disabled, got {cfg.tracking.mode!r}")
    _check(cfg.tracking.timeout_s > 0, "tracking.timeout_s", f"must be > 0, got {cfg.tracking.timeout_s}")
    if cfg.finetune.init_from.startswith("wandb:") and command != "pretrain":
        _check(cfg.tracking.mode == "online", "finetune.init_from",
               f"{cfg.finetune.init_from} is a W&B artifact: it needs tracking.mode=online "
               f"(got {cfg.tracking.mode})")
    stages = stages_for(command, cfg)
    _check(bool(stages), "<stages>", "nothing to run: pretrain and finetune are both disabled")

    if "pretrain" in stages:
        p = cfg.pretrain
        _check(bool(p.model.name), "pretrain.model.name", "must name a model")
        _check(p.steps >= 1, "pretrain.steps", f"must be >= 1, got {p.steps}")
        _check(p.checkpoint_every >= 0, "pretrain.checkpoint_every", f"must be >= 0, got {p.checkpoint_every}")
        _check(p.keep_checkpoints >= 1, "pretrain.keep_checkpoints", f"must be >= 1, got {p.keep_checkpoints}")
        _check(p.monitor_every >= 0, "pretrain.monitor_every", f"must be >= 0, got {p.monitor_every}")
        _check(p.monitor_shots >= 1, "pretrain.monitor_shots", f"must be >= 1, got {p.monitor_shots}")
        _check(p.monitor_queries >= 1, "pretrain.monitor_queries", f"must be >= 1, got {p.monitor_queries}")
        if p.monitor_every:
            _check(bool(cfg.finetune.data.source) or bool(cfg.finetune.targets), "pretrain.monitor_every",
                   "the monitor scores finetune.data.source (or finetune.targets), which is not set")
        d = p.data
        _check(bool(d.urls) or bool(d.sources), "pretrain.data.urls", "must name the shards")
        _check(not (d.urls and d.sources), "pretrain.data.sources",
               "give pretrain.data.urls or pretrain.data.sources, not both")
        for i, src in enumerate(d.sources):
            _check(bool(src.urls), f"pretrain.data.sources[{i}].urls", "must name the shards")
            _check(src.weight > 0, f"pretrain.data.sources[{i}].weight", f"must be > 0, got {src.weight}")
        _check(d.shard_errors in ("skip", "raise"), "pretrain.data.shard_errors",
               f"must be skip or raise, got {d.shard_errors!r}")
        _check(d.decode in ("worker", "device"), "pretrain.data.decode",
               f"must be worker or device, got {d.decode!r}")
        _check(d.retries >= 0, "pretrain.data.retries", f"must be >= 0, got {d.retries}")
        _check(d.retry_delay >= 0, "pretrain.data.retry_delay", f"must be >= 0, got {d.retry_delay}")
        _check(d.timeout > 0, "pretrain.data.timeout", f"must be > 0, got {d.timeout}")
        _check(d.samples_per_shard >= 0, "pretrain.data.samples_per_shard", f"must be >= 0, got {d.samples_per_shard}")
        _check(d.num_classes >= 0, "pretrain.data.num_classes", f"must be >= 0, got {d.num_classes}")
        _check(d.img_size >= 8, "pretrain.data.img_size", f"must be >= 8, got {d.img_size}")
        _check(d.in_chans in (1, 3), "pretrain.data.in_chans", f"must be 1 or 3, got {d.in_chans}")
        _check(d.batch_size >= 1, "pretrain.data.batch_size", f"must be >= 1, got {d.batch_size}")
        _check(d.num_workers >= 0, "pretrain.data.num_workers", f"must be >= 0, got {d.num_workers}")
        _check(d.shuffle_buffer >= 0, "pretrain.data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
        _check(0 < d.min_scale <= 1, "pretrain.data.min_scale", f"must be in (0, 1], got {d.min_scale}")
        _validate_norm(d.mean, d.std, "pretrain.data")
        _validate_optim(p.optim, "pretrain.optim")

    if "finetune" in stages:
        f = cfg.finetune
        _check(f.strategy in STRATEGIES, "finetune.strategy", f"must be one of {', '.join(STRATEGIES)}, got {f.strategy!r}")
        strategies = [f.strategy] + [t.strategy or f.strategy for t in f.targets]
        if command == "finetune" or "pretrain" not in stages:
            _check(bool(f.init_from), "finetune.init_from",
                   "required when stage one does not run: the checkpoint directory to start from")
        _check(f.steps >= 1, "finetune.steps", f"must be >= 1, got {f.steps}")
        _check(f.eval_every >= 1, "finetune.eval_every", f"must be >= 1, got {f.eval_every}")
        _check(len(f.seeds) >= 1, "finetune.seeds", "needs at least one seed")
        _check(len(set(f.seeds)) == len(f.seeds), "finetune.seeds", f"must be distinct, got {list(f.seeds)}")
        _check(0 < f.target_accuracy <= 1, "finetune.target_accuracy", f"must be in (0, 1], got {f.target_accuracy}")
        _check(f.partial_blocks >= 0, "finetune.partial_blocks", f"must be >= 0, got {f.partial_blocks}")
        if "partial" in strategies:
            _check(f.partial_blocks >= 1, "finetune.partial_blocks", "strategy=partial needs partial_blocks >= 1")
        _check(0 <= f.head_steps < f.steps, "finetune.head_steps",
               f"must be in [0, finetune.steps={f.steps}), got {f.head_steps}")
        _check(0 < f.all_lr_scale <= 1, "finetune.all_lr_scale", f"must be in (0, 1], got {f.all_lr_scale}")
        if f.targets:
            _check(not f.data.source, "finetune.data.source",
                   "give finetune.data (one target) or finetune.targets (a suite), not both")
            _validate_targets(f.targets)
        else:
            _validate_target_data(f.data, "finetune.data")
        _validate_optim(f.optim, "finetune.optim")
    if "scratch" in stages:
        _check(cfg.scratch.lr >= 0, "scratch.lr", f"must be >= 0, got {cfg.scratch.lr}")


_TARGET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def target_name(t: TargetConfig) -> str:
    """A suite target's name: `name`, else the last part of its source (directory or hub name)."""
    return t.name or Path(str(t.data.source or "").rstrip("/")).name


def _validate_targets(targets: list[TargetConfig]) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(targets):
        prefix = f"finetune.targets[{i}]"
        _validate_target_data(t.data, f"{prefix}.data")
        _check(t.strategy == "" or t.strategy in STRATEGIES, f"{prefix}.strategy",
               f"must be empty (finetune.strategy) or one of {', '.join(STRATEGIES)}, got {t.strategy!r}")
        name = target_name(t)
        _check(bool(_TARGET_NAME.match(name)), f"{prefix}.name",
               f"must be letters, digits, '_', '.' or '-' (it names directories and W&B runs), got {name!r}"
               + ("" if t.name else f" (from data.source; set {prefix}.name)"))
        _check(name not in seen, f"{prefix}.name",
               f"{name!r} is also the name of finetune.targets[{seen.get(name)}]; give each target its own name")
        seen[name] = i


def _validate_target_data(d: TargetDataConfig, prefix: str) -> None:
    _check(bool(d.source), f"{prefix}.source", "must name the target dataset")
    _check(d.shots_per_class >= 0, f"{prefix}.shots_per_class", f"must be >= 0, got {d.shots_per_class}")
    _check(d.img_size == 0 or d.img_size >= 8, f"{prefix}.img_size", f"must be 0 or >= 8, got {d.img_size}")
    _check(d.in_chans in (0, 1, 3), f"{prefix}.in_chans", f"must be 0, 1 or 3, got {d.in_chans}")
    _check(d.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(0 < d.min_scale <= 1, f"{prefix}.min_scale", f"must be in (0, 1], got {d.min_scale}")
    _validate_norm(d.mean, d.std, prefix)


def replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace re-exported so callers need not import dataclasses for configs."""
    return dataclasses.replace(obj, **changes)
