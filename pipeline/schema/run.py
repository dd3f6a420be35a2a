"""The run's config: the tree of stage configs plus launcher, engine, tracking and failure policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipeline.schema._base import check
from pipeline.schema.finetune import FinetuneConfig, ScratchConfig
from pipeline.schema.pretrain import PretrainConfig

# Ray Train storage: a path ("" scheme, local or NFS) or an object store pyarrow reaches.
STORAGE_SCHEMES = ("", "file", "s3", "gs")


@dataclass
class LauncherConfig:
    kind: str = "ray"
    """`ray`: stage one as a Ray Train TorchTrainer, stage two as `stage_two` says, on one Ray
    start; `local`: every stage in-process on one device, one after another."""
    num_workers: int = 2
    """Ray Train workers (ranks) of stage one (and of stage two with `stage_two: trainer`); with
    `min_workers`, the most stage one uses."""
    min_workers: int = 0
    """Elastic stage one (Ray): start with as many workers as are free, at least this many and at most
    `num_workers`, and resize from the last checkpoint when workers come or go (Ray Train's
    `ScalingConfig(num_workers=(min, max))`). Each rank keeps `pretrain.data.batch_size`, so the
    global batch follows the world size; a new world size starts its stream at a fresh epoch (another
    sharding of the shards), the weights, optimiser and step continue. 0 = `num_workers`, not elastic."""
    resize_check_s: float = 60.0
    """Elastic stage one: how often Ray considers growing the worker group while it is healthy."""
    use_gpu: Optional[bool] = None
    """One GPU per worker; null = when the cluster has GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Ray worker."""
    address: str = ""
    """Ray cluster address; empty starts a private local Ray on 127.0.0.1."""
    stage_two: str = "trials"
    """Under Ray: `trials` runs every target's fine-tune, scratch baseline and `assess` as
    parallel single-process Ray tasks (`trial_cpus` / `trial_gpus` each); small targets are many
    small jobs, and data parallelism over a few shots is mostly communication. `trainer` runs
    each of them as a data-parallel TorchTrainer of `num_workers`, one after another (a large
    target)."""
    trial_cpus: float = 1.0
    """CPUs Ray reserves for one stage-two trial; its torch threads are this rounded down, at least 1,
    unless `engine.threads` says (a fraction packs more single-thread trials per core)."""
    trial_gpus: float = 0.5
    """Share of a GPU one stage-two trial reserves when the run uses GPUs (0.5: two trials per
    GPU); at most 1."""
    storage_path: str = ""
    """Where Ray Train stores checkpoints: a local or NFS path, `s3://bucket/prefix` or
    `gs://bucket/prefix`; empty = `<output_dir>/ray`. A run on more than one node needs shared
    storage (NFS or an object store); a node-local path is refused there."""
    checkpoint_upload: str = "async"
    """How stage one hands each checkpoint to `storage_path` under Ray: `async` (the step loop goes on
    while a background thread uploads it; Ray registers it once uploaded, and a failed upload stops
    the run) or `sync` (every rank waits at the checkpoint until the upload is done)."""

    def validate(self, prefix: str) -> None:
        check(self.checkpoint_upload in ("async", "sync"), f"{prefix}.checkpoint_upload",
              f"must be async or sync, got {self.checkpoint_upload!r}")
        check(self.kind in ("ray", "local"), f"{prefix}.kind", f"must be ray or local, got {self.kind!r}")
        check(self.num_workers >= 1, f"{prefix}.num_workers", f"must be >= 1, got {self.num_workers}")
        check(0 <= self.min_workers <= self.num_workers, f"{prefix}.min_workers",
              f"must be in [0, num_workers={self.num_workers}] (0 = not elastic), got {self.min_workers}")
        check(self.resize_check_s > 0, f"{prefix}.resize_check_s", f"must be > 0, got {self.resize_check_s}")
        check(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.stage_two in ("trials", "trainer"), f"{prefix}.stage_two",
              f"must be trials or trainer, got {self.stage_two!r}")
        check(self.trial_cpus > 0, f"{prefix}.trial_cpus", f"must be > 0, got {self.trial_cpus}")
        check(0 < self.trial_gpus <= 1, f"{prefix}.trial_gpus", f"must be in (0, 1], got {self.trial_gpus}")
        scheme = self.storage_path.split("://", 1)[0].lower() if "://" in self.storage_path else ""
        check(scheme in STORAGE_SCHEMES, f"{prefix}.storage_path",
              f"must be a local/NFS path or a {', '.join(s + '://' for s in STORAGE_SCHEMES if s)} URI, "
              f"got {self.storage_path!r}")


@dataclass
class FailureConfig:
    max_failures: int = 2
    """Ray restarts of a stage's worker group after a failure (a dead worker or node, an
    error); each restart resumes from the last reported checkpoint. 0 fails at once, -1
    retries forever. Maps to Ray Train's `FailureConfig(max_failures)`."""
    max_preemption_failures: int = -1
    """Ray restarts of stage one after a node of the run was preempted (drained with a notice, e.g. a
    spot reclaim), counted apart from `max_failures`; -1 = no limit (Ray's default), 0 = none.
    Maps to Ray Train's `FailureConfig(max_preemption_failures)`."""
    preemption_check_every: int = 10
    """On a Ray cluster, every N steps stage one asks Ray Train for a preemption notice
    (`ray.train.get_preemption_info`, a barrier) and, on one, commits a checkpoint at once; 0 = never.
    A SIGTERM to the driver or the local process is checked after every step whatever this is."""

    def validate(self, prefix: str) -> None:
        check(self.max_failures >= -1, f"{prefix}.max_failures",
              f"must be >= 0, or -1 to retry forever, got {self.max_failures}")
        check(self.max_preemption_failures >= -1, f"{prefix}.max_preemption_failures",
              f"must be >= 0, or -1 for no limit, got {self.max_preemption_failures}")
        check(self.preemption_check_every >= 0, f"{prefix}.preemption_check_every",
              f"must be >= 0, got {self.preemption_check_every}")


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

    def validate(self, prefix: str) -> None:
        check(self.device in ("auto", "cpu", "cuda"), f"{prefix}.device",
              f"must be auto, cpu or cuda, got {self.device!r}")
        check(self.precision in ("auto", "bf16", "fp32"), f"{prefix}.precision",
              f"must be auto, bf16 or fp32, got {self.precision!r}")
        check(self.grad_accum_steps >= 1, f"{prefix}.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        check(self.log_every >= 1, f"{prefix}.log_every", f"must be >= 1, got {self.log_every}")
        check(self.threads >= 0, f"{prefix}.threads", f"must be >= 0, got {self.threads}")
        check(self.peak_tflops >= 0, f"{prefix}.peak_tflops", f"must be >= 0, got {self.peak_tflops}")


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

    def validate(self, prefix: str) -> None:
        check(self.mode in ("offline", "online", "disabled"), f"{prefix}.mode",
              f"must be offline, online or disabled, got {self.mode!r}")
        check(self.timeout_s > 0, f"{prefix}.timeout_s", f"must be > 0, got {self.timeout_s}")


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

    def validate(self, command: str = "run") -> None:
        """Semantic checks the schema cannot express, for the stages `command` runs; each names
        the full key. Shared parts first, then each stage's own config."""
        check(bool(self.name) and "/" not in self.name, "name",
              f"must be a non-empty name without '/', got {self.name!r}")
        self.launcher.validate("launcher")
        self.failure.validate("failure")
        self.engine.validate("engine")
        self.tracking.validate("tracking")
        if self.finetune.init_from.startswith("wandb:") and command != "pretrain":
            check(self.tracking.mode == "online", "finetune.init_from",
                  f"{self.finetune.init_from} is a W&B artifact: it needs tracking.mode=online "
                  f"(got {self.tracking.mode})")
        stages = stages_for(command, self)
        check(bool(stages), "<stages>", "nothing to run: pretrain and finetune are both disabled")
        if "pretrain" in stages:
            has_target = bool(self.finetune.data.source) or bool(self.finetune.targets)
            self.pretrain.validate("pretrain", has_target=has_target)
        if "finetune" in stages:
            self.finetune.validate("finetune", needs_init_from=command == "finetune" or "pretrain" not in stages)
        if "scratch" in stages:
            self.scratch.validate("scratch")


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
