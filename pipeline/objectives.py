"""Stage one's objectives: what the model learns from each batch of the stream.

`supervised` is cross-entropy on the shards' labels. `simclr` (Chen et al., ICML 2020) needs no
label: each sample arrives as two augmented views (`pipeline/data/augment.py: ViewAugment`), the
backbone's pooled features go through a projection head, and NT-Xent pulls the two views of a
sample together against every other view in the global batch. The projection head is stage-one
state (optimised, checkpointed in `train_state.pt`, resumed); only the backbone is saved as the
model, so stage two never sees it.

An `Objective` is the `nn.Module` the engine trains (DDP wraps it whole, so the projection head's
gradients are reduced too) and a loss over its output; the backbone stays the model the stage
checkpoints, monitors and hands on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.optim import param_groups
from pipeline.schema.pretrain import PretrainConfig


class Objective(nn.Module):
    """Stage one's trainable module: ``forward(images)`` -> the output ``loss(output, labels)`` scores."""

    #: Views of each sample the stream must deliver (1: a plain ``[B, C, H, W]`` batch).
    views: int = 1

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Objective-only weights (a projection head): checkpointed and resumed, never transferred."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"the checkpoint's objective state does not fit this objective: missing {missing}, "
                             f"unexpected {unexpected}")


class Supervised(Objective):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, labels)


class SimCLR(Objective):
    views = 2

    def __init__(self, backbone: nn.Module, *, proj_hidden: int, proj_dim: int, temperature: float) -> None:
        super().__init__(backbone)
        width = int(backbone.num_features)
        self.projector = nn.Sequential(nn.Linear(width, proj_hidden), nn.BatchNorm1d(proj_hidden),
                                       nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[B * 2, C, H, W]``, the two views of each sample next to each other."""
        features = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return self.projector(features)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nt_xent(output, self.temperature)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``z = [2N, D]`` whose rows ``2i`` and ``2i + 1`` are two views of one sample.

    Under a process group every rank's views are the negatives (gathered with autograd, so each
    rank's gradient flows back through its own rows); the loss is this rank's mean over its rows.
    """
    z = F.normalize(z.float(), dim=1)
    offset, everyone = 0, z
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather  # differentiable

        everyone = torch.cat(all_gather(z))
        offset = dist.get_rank() * z.shape[0]
    logits = z @ everyone.T / temperature
    rows = torch.arange(z.shape[0], device=z.device)
    logits[rows, offset + rows] = float("-inf")  # a view is not its own positive nor negative
    positives = offset + (rows ^ 1)  # 0<->1, 2<->3, ...
    return F.cross_entropy(logits, positives)


def objective_param_groups(objective: Objective, *, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The backbone's optimiser groups (`param_groups`, names as a bare model has them, so a supervised
    run's optimiser state is what it always was), plus the objective's own weights (decay on matrices only)."""
    groups = param_groups(objective.backbone, lr=lr, weight_decay=weight_decay)
    extra = [(n, t) for n, t in objective.named_parameters() if not n.startswith("backbone.") and t.requires_grad]
    for decay in (True, False):
        params = [(n, t) for n, t in extra if (t.ndim > 1) == decay]
        if params:
            groups.append({"params": params, "name": f"objective_{'decay' if decay else 'no_decay'}", "lr": lr,
                           "lr_scale": 1.0, "weight_decay": weight_decay if decay else 0.0})
    return groups


def build_objective(p: PretrainConfig, backbone: nn.Module) -> Objective:
    """The configured objective around ``backbone``."""
    if p.objective == "supervised":
        return Supervised(backbone)
    if p.objective == "simclr":
        s = p.simclr
        return SimCLR(backbone, proj_hidden=s.proj_hidden, proj_dim=s.proj_dim, temperature=s.temperature)
    raise ValueError(f"pretrain.objective: unknown objective {p.objective!r}")


def objective_views(p: PretrainConfig) -> int:
    """Views per sample the configured objective trains on."""
    return SimCLR.views if p.objective == "simclr" else 1
