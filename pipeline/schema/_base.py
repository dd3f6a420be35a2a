"""What every part of the schema shares: the error type, the check helper, the model, optimiser
and batch-mixing configs (both stages have one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# omegaconf's marker for a value the user must give; the schema stays free of omegaconf.
MISSING: Any = "???"


class ConfigError(ValueError):
    """A configuration problem; the message names the full key."""


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_norm(mean: list[float], std: list[float], prefix: str) -> None:
    check(len(mean) == len(std), f"{prefix}.mean",
          f"mean and std need the same length, got {len(mean)} and {len(std)}")
    check(all(s > 0 for s in std), f"{prefix}.std", f"values must be > 0, got {list(std)}")


@dataclass
class ModelConfig:
    name: str = "hybrid_tiny"
    """Registry name (see `transferline models`) or an import path `package.module:factory`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model factory (depths, dims, drop_path_rate, ...)."""

    def validate(self, prefix: str) -> None:
        check(bool(self.name), f"{prefix}.name", "must name a model")


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

    def validate(self, prefix: str) -> None:
        check(self.name in ("adamw", "sgd"), f"{prefix}.name", f"must be adamw or sgd, got {self.name!r}")
        check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2, f"{prefix}.betas", f"needs two values, got {list(self.betas)}")
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.schedule in ("cosine", "constant"), f"{prefix}.schedule",
              f"must be cosine or constant, got {self.schedule!r}")
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio",
              f"must be in [0, 1], got {self.min_lr_ratio}")
        check(0 < self.layer_decay <= 1, f"{prefix}.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(self.clip_grad_norm >= 0, f"{prefix}.clip_grad_norm",
              f"must be >= 0, got {self.clip_grad_norm}")


@dataclass
class MixConfig:
    """Mix pairs of samples within each batch and their labels (torchvision v2 `MixUp`,
    Zhang et al. 2018; `CutMix`, Yun et al. 2019), on the device before the forward pass (stage
    one's `supervised` objective and stage two). With both alphas set, each batch gets one of the
    two at random. 0 = off."""
    mixup_alpha: float = 0.0
    """Beta(alpha, alpha) for MixUp's blend weight (0.2-1.0 in the papers); 0 = no MixUp."""
    cutmix_alpha: float = 0.0
    """Beta(alpha, alpha) for CutMix's pasted area (1.0 in the paper); 0 = no CutMix."""
    prob: float = 1.0
    """Probability that a batch is mixed at all."""

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def validate(self, prefix: str) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            check(getattr(self, key) >= 0, f"{prefix}.{key}", f"must be >= 0, got {getattr(self, key)}")
        check(0 <= self.prob <= 1, f"{prefix}.prob", f"must be a probability in [0, 1], got {self.prob}")
