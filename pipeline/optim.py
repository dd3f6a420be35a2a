"""Parameter groups (weight-decay split, layer-wise LR decay), optimiser and LR schedule.

Every group carries ``lr_scale``; its ``lr`` is ``base_lr * lr_scale`` and the LambdaLR schedule
multiplies that by one shared factor, so warmup/cosine and layer-wise decay compose.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
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


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0,
                 anchored: Collection[str] = (), anchor: float = 0.0) -> list[dict[str, Any]]:
    """Optimiser groups for the trainable parameters of a contract-following model.

    No weight decay for parameters with ndim <= 1 (biases, norm scales) or named in
    ``model.no_weight_decay()``. With ``layer_decay < 1`` block i of n (``transfer_blocks()``
    order) gets ``lr * layer_decay ** (n - i)`` and the head ``lr``: early, general layers move
    least. Parameters named in ``anchored`` (those copied from a checkpoint) get ``anchor`` as
    their group's decay toward their starting values (see :class:`AnchorDecay`) instead of any
    decay toward zero, when ``anchor > 0``. Frozen parameters (requires_grad=False) are left out.
    Params are given as ``(name, tensor)``, so the optimiser's state_dict records ``param_names``.
    """
    model = unwrap_model(model)
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if anchor < 0:
        raise ValueError(f"anchor must be >= 0, got {anchor}")
    anchored = set(anchored) if anchor > 0 else set()
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
        pinned = name in anchored
        decay = param.ndim > 1 and name not in no_decay_names and not pinned
        key = (layer, decay, pinned)
        if key not in groups:
            scale = layer_decay ** (depth - layer)
            groups[key] = {
                "params": [],
                "name": f"layer{layer}_{'anchored' if pinned else 'decay' if decay else 'no_decay'}",
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "anchor": anchor if pinned else 0.0,
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


class AnchorDecay:
    """Decoupled weight decay toward the starting point (L2-SP, Li et al., ICML 2018, in AdamW's
    decoupled form): after every optimiser step each parameter of a group with ``anchor`` > 0 moves
    ``lr * anchor`` of the way back to the value it had when this object was made, where plain
    weight decay would pull it toward zero. A fine-tune then keeps what the checkpoint learnt unless
    the target's gradients keep pushing it away.

    Attach it after building the optimiser (it registers a step post-hook); the start values are
    copied at that moment, so build it before the first step.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.start = {id(p): p.detach().clone() for group in optimizer.param_groups if group.get("anchor", 0.0) > 0
                      for p in group["params"]}
        self.handle = optimizer.register_step_post_hook(self) if self.start else None

    @torch.no_grad()
    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            pull = group["lr"] * group.get("anchor", 0.0)
            if pull <= 0:
                continue
            for p in group["params"]:
                p.sub_(p - self.start[id(p)], alpha=pull)


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
