"""Stage one's objectives: what the model learns from each batch of the stream.

`supervised` is cross-entropy on the shards' labels. The label-free ones read no label: each
sample arrives as several augmented views (`pipeline/data/augment.py: ViewAugment`).
`simclr` (Chen et al., ICML 2020): the backbone's pooled features go through a projection head,
and NT-Xent pulls the two views of a sample together against every other view in the global
batch. `dino` (Caron et al., ICCV 2021): a student matches the centred, sharpened output of an
EMA teacher across 2 global and some local views. Heads, the teacher and the centre are
stage-one state (checkpointed in `train_state.pt`, resumed); only a backbone is saved as the
model (`handed_on`: DINO's teacher by default), so stage two never sees the rest.

An `Objective` is the `nn.Module` the engine trains (DDP wraps it whole, so the projection head's
gradients are reduced too) and a loss over its output; the backbone stays the model the stage
checkpoints, monitors and hands on.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.augment import ViewAugment
from pipeline.optim import param_groups
from pipeline.schema.pretrain import PretrainConfig


class Objective(nn.Module):
    """Stage one's trainable module: ``forward(images)`` -> the output ``loss(output, labels)`` scores."""

    #: Views of each sample the stream must deliver (1: a plain ``[B, C, H, W]`` batch).
    views: int = 1

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def loss(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (an EMA teacher follows the student here)."""

    def handed_on(self) -> nn.Module:
        """The backbone stage one checkpoints as the model, monitors and hands to stage two."""
        return self.backbone

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Objective-only weights (a projection head): checkpointed and resumed, never transferred."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state` saved; anything missing from it or foreign to it is an error."""
        expected = self.extra_state()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in expected]
        if missing or unexpected:
            raise ValueError(f"the checkpoint's objective state does not fit this objective: missing {missing}, "
                             f"unexpected {list(unexpected)}")


class Supervised(Objective):
    def __init__(self, backbone: nn.Module, *, label_smoothing: float = 0.0) -> None:
        super().__init__(backbone)
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, labels, label_smoothing=self.label_smoothing)


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


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer GELU MLP to an L2-normalised bottleneck, then a weight-normalised
    linear layer with its norm fixed at 1 (the paper's `norm_last_layer`) onto `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class DINO(Objective):
    """Self-distillation with no labels. The batch holds ``2 + local`` views per sample, global first;
    the teacher (an EMA of the student, no gradients) sees the 2 global views, the student every
    view, and each student view learns the teacher's output for the other views of its sample."""

    def __init__(self, backbone: nn.Module, *, out_dim: int, hidden: int, bottleneck: int, student_temp: float,
                 teacher_temp: float, center_momentum: float, momentum: float, local_crops: int,
                 hand_on: str = "teacher") -> None:
        super().__init__(backbone)
        self.head = DINOHead(int(backbone.num_features), out_dim, hidden, bottleneck)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for param in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            param.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.views = 2 + local_crops
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum, self.base_momentum, self.hand_on = center_momentum, momentum, hand_on

    @staticmethod
    def _embed(backbone: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return head(backbone.forward_head(backbone.forward_features(images), pre_logits=True))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: ``[B * V, C, H, W]``, sample-major. Returns the student's logits ``[B, V, D]`` and
        the teacher's centred, sharpened probabilities ``[B, 2, D]``; then moves the centre."""
        n = images.shape[0] // self.views
        student = self._embed(self.backbone, self.head, images).view(n, self.views, -1)
        with torch.no_grad():  # the teacher follows this module's train/eval mode like any child
            glob = images.view(n, self.views, *images.shape[1:])[:, :2].flatten(0, 1)
            teacher = self._embed(self.teacher_backbone, self.teacher_head, glob).float()
            probs = F.softmax((teacher - self.center) / self.teacher_temp, dim=-1).view(n, 2, -1)
            if self.training:
                self._update_center(teacher)
        return student, probs

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        batch = teacher.sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher.shape[0]), device=teacher.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch / count, alpha=1 - self.center_momentum)

    def loss(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        student, teacher = output
        log_p = F.log_softmax(student.float() / self.student_temp, dim=-1)  # [B, V, D]
        # Cross-entropy of every student view against each global teacher view but its own.
        cross = -torch.einsum("bgd,bvd->bgv", teacher, log_p)  # [B, 2, V]
        own = torch.zeros(2, self.views, dtype=torch.bool, device=cross.device)
        own[0, 0] = own[1, 1] = True
        return cross[:, ~own].mean()

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = 1 - (1 - self.base_momentum) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2
        for mine, theirs in ((self.teacher_backbone, self.backbone), (self.teacher_head, self.head)):
            for t, s in zip(mine.parameters(), theirs.parameters()):
                t.mul_(m).add_(s.detach(), alpha=1 - m)
            for t, s in zip(mine.buffers(), theirs.buffers()):
                t.copy_(s)  # BatchNorm statistics follow the student's

    def handed_on(self) -> nn.Module:
        return self.teacher_backbone if self.hand_on == "teacher" else self.backbone

    def extra_state(self) -> dict[str, torch.Tensor]:
        # The checkpoint's model may be the teacher: the student is stage-one state here too.
        return dict(self.state_dict())


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
        return Supervised(backbone, label_smoothing=p.label_smoothing)
    if p.objective == "simclr":
        s = p.simclr
        return SimCLR(backbone, proj_hidden=s.proj_hidden, proj_dim=s.proj_dim, temperature=s.temperature)
    if p.objective == "dino":
        d = p.dino
        return DINO(backbone, out_dim=d.out_dim, hidden=d.hidden, bottleneck=d.bottleneck,
                    student_temp=d.student_temp, teacher_temp=d.teacher_temp, center_momentum=d.center_momentum,
                    momentum=d.momentum, local_crops=d.local_crops, hand_on=d.hand_on)
    raise ValueError(f"pretrain.objective: unknown objective {p.objective!r}")


def view_augment(p: PretrainConfig, img_size: int, in_chans: int) -> ViewAugment:
    """The loader workers' per-sample transform of a label-free objective: its views of each sample."""
    v = p.views
    colour = dict(hflip=v.hflip, jitter=v.jitter, jitter_p=v.jitter_p, grayscale_p=v.grayscale_p,
                  blur_p=v.blur_p, solarize_p=v.solarize_p)
    if p.objective == "dino":
        d = p.dino
        return ViewAugment(img_size, in_chans, views=2, min_scale=d.global_min_scale, local_views=d.local_crops,
                           local_scale=(d.local_scale[0], d.local_scale[1]), **colour)
    if p.objective == "simclr":
        return ViewAugment(img_size, in_chans, views=SimCLR.views, min_scale=v.min_scale, **colour)
    raise ValueError(f"pretrain.objective: {p.objective!r} reads labels, not views")
