"""Parameter groups (weight-decay split, layer-wise LR decay), optimiser and LR schedule.

Every group carries ``lr_scale``; its ``lr`` is ``base_lr * lr_scale`` and the LambdaLR schedule
multiplies that by one shared factor, so warmup/cosine and layer-wise decay compose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from architectures import param_in_prefix
from pipeline.distributed import unwrap_model


def _block_index(name: str, blocks: Sequence[str]) -> int:
    for index, prefix in enumerate(blocks):
        if param_in_prefix(name, prefix):
            return index
    raise ValueError(
        f"parameter {name!r} belongs to no transfer_blocks() entry ({list(blocks)}) and is not in the head; "
        "layer-wise LR decay needs every parameter placed"
    )


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimiser groups for the trainable parameters of a contract-following model.

    No weight decay for parameters with ndim <= 1 (biases, norm scales) or named in
    ``model.no_weight_decay()``. With ``layer_decay < 1`` block i of n (``transfer_blocks()``
    order) gets ``lr * layer_decay ** (n - i)`` and the head ``lr``: early, general layers move
    least. Frozen parameters (requires_grad=False) are left out. Params are given as
    ``(name, tensor)``, so the optimiser's state_dict records ``param_names``.
    """
    model = unwrap_model(model)
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    head = getattr(model, "head_prefix", None)
    if not head:
        raise ValueError(f"{type(model).__name__} has no head_prefix; it does not follow the model contract")
    no_decay_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    blocks = list(model.transfer_blocks()) if layer_decay != 1.0 else []
    depth = len(blocks)

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Without decay every param shares depth `depth` (scale 1), so no block lookup is needed.
        layer = depth if (not blocks or param_in_prefix(name, head)) else _block_index(name, blocks)
        decay = param.ndim > 1 and name not in no_decay_names
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (depth - layer)
            groups[key] = {
                "params": [],
                "name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append((name, param))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    return [groups[key] for key in sorted(groups)]


def _all_on_cuda(groups: Sequence[dict[str, Any]]) -> bool:
    params = [p[1] if isinstance(p, tuple) else p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def build_optimizer(
    groups: Sequence[dict[str, Any]],
    name: Literal["adamw", "sgd"] = "adamw",
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    fused: bool | None = None,
) -> Optimizer:
    """AdamW or SGD (momentum) over ``groups``; each group's own lr and weight_decay win over defaults.

    The fused kernels are used only when every parameter lives on CUDA (``fused=None`` picks them
    there, ``False`` never); elsewhere torch's default (foreach where supported) applies.
    """
    use_fused = fused is not False and _all_on_cuda(groups)
    kernel: dict[str, Any] = {"fused": True} if use_fused else {}
    groups = [dict(group) for group in groups]  # the optimiser mutates its groups; keep the caller's intact
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, **kernel)
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=momentum, **kernel)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adamw' or 'sgd'")


@dataclass
class LrFactor:
    """Multiplier of every group's base lr at a scheduler step: linear warmup, then cosine or constant.

    A callable object (not a closure) so LambdaLR.state_dict saves its fields and a resumed
    scheduler gets the same curve.
    """

    warmup_steps: int
    total_steps: int
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first step already learns; the factor reaches 1 on the last warmup step.
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["cosine", "constant"] = "cosine",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Step-based LambdaLR: each group's lr = base_lr * lr_scale * LrFactor(step).

    Call ``scheduler.step()`` once per optimiser step.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'constant'")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in 0..total_steps ({total_steps}), got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, LrFactor(warmup_steps, total_steps, schedule, min_lr_ratio))
