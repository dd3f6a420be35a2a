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
        self.ema: nn.Module | None = None
        self.ema_decay, self.hand_on_ema = 0.0, False

    def enable_ema(self, decay: float, *, hand_on: bool = True) -> None:
        """Keep an EMA of the backbone's weights (`pretrain.ema`), updated in `after_step`; ``hand_on``:
        it, not the trained weights, is what `handed_on` returns."""
        self.ema = copy.deepcopy(self.backbone)
        for param in self.ema.parameters():
            param.requires_grad_(False)
        self.ema_decay, self.hand_on_ema = decay, hand_on

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The on-device batch as the forward pass and `loss` see it (MixUp / CutMix happen here)."""
        return images, labels

    def loss(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (an EMA follows the weights here)."""
        if self.ema is not None:
            # timm's warm-up: early on the average must forget the random init quickly.
            ema_update(self.ema, self.backbone, min(self.ema_decay, (1 + step) / (10 + step)))

    def handed_on(self) -> nn.Module:
        """The backbone stage one checkpoints as the model, monitors and hands to stage two."""
        return self.ema if self.ema is not None and self.hand_on_ema else self.backbone

    @property
    def weights(self) -> str:
        """Which weights `handed_on` is, as the checkpoint's meta records it (`weights`)."""
        return "ema" if self.ema is not None and self.hand_on_ema else "model"

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Objective-only weights (a projection head, an EMA): checkpointed and resumed, never transferred.
        When the checkpoint's model is not the trained backbone (an EMA, DINO's teacher), that is too."""
        state = self.state_dict()
        if self.handed_on() is not self.backbone:
            return dict(state)
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state` saved; anything missing from it or foreign to it is an error."""
        expected = self.extra_state()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in expected]
        if missing or unexpected:
            raise ValueError(f"the checkpoint's objective state does not fit this objective: missing {missing}, "
                             f"unexpected {list(unexpected)}")


def ema_update(average: nn.Module, current: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * current`` over parameters; buffers (BatchNorm
    statistics) are copied, so the average is always evaluated with statistics that exist."""
    for a, c in zip(average.parameters(), current.parameters()):
        a.mul_(decay).add_(c.detach(), alpha=1 - decay)
    for a, c in zip(average.buffers(), current.buffers()):
        a.copy_(c)


class BatchMix:
    """MixUp / CutMix of a labelled batch (torchvision v2), one of them per batch when both are on.

    Its random numbers are drawn from a seed of (run seed, rank, call count): the count is the
    objective's `mix_calls` buffer, checkpointed with it, so a resumed run mixes exactly as an
    uninterrupted one, and the training process's own RNG is left untouched.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, prob: float, seed: int) -> None:
        from torchvision.transforms import v2

        if num_classes < 2:
            raise ValueError(f"mixing needs at least 2 classes, got {num_classes}")
        ops = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
              ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
        if not ops:
            raise ValueError("mixing needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        self.num_classes, self.prob, self.seed = num_classes, prob, seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(hash((self.seed, rank, call)) & 0x7FFF_FFFF_FFFF_FFFF)
            if torch.rand(()).item() >= self.prob:
                return images, F.one_hot(labels, self.num_classes).to(images.dtype)
            return self.op(images, labels)


class Supervised(Objective):
    def __init__(self, backbone: nn.Module, *, label_smoothing: float = 0.0, mix: BatchMix | None = None) -> None:
        super().__init__(backbone)
        self.label_smoothing, self.mix = label_smoothing, mix
        if mix is not None:
            self.register_buffer("mix_calls", torch.zeros((), dtype=torch.int64))

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None or not self.training:
            return images, labels
        self.mix_calls += 1
        return self.mix(images, labels, int(self.mix_calls))

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
            ema_update(mine, theirs, m)  # BatchNorm statistics follow the student's

    def handed_on(self) -> nn.Module:
        return self.teacher_backbone if self.hand_on == "teacher" else self.backbone

    @property
    def weights(self) -> str:
        return self.hand_on


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
    objective: Objective
    if p.objective == "supervised":
        m = p.mix
        mix = BatchMix(int(backbone.num_classes), mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha,
                       prob=m.prob, seed=p.seed) if m.enabled else None
        objective = Supervised(backbone, label_smoothing=p.label_smoothing, mix=mix)
    elif p.objective == "simclr":
        s = p.simclr
        objective = SimCLR(backbone, proj_hidden=s.proj_hidden, proj_dim=s.proj_dim, temperature=s.temperature)
    elif p.objective == "dino":
        d = p.dino
        return DINO(backbone, out_dim=d.out_dim, hidden=d.hidden, bottleneck=d.bottleneck,
                    student_temp=d.student_temp, teacher_temp=d.teacher_temp, center_momentum=d.center_momentum,
                    momentum=d.momentum, local_crops=d.local_crops, hand_on=d.hand_on)
    else:
        raise ValueError(f"pretrain.objective: unknown objective {p.objective!r}")
    if p.ema.decay:
        objective.enable_ema(p.ema.decay, hand_on=p.ema.hand_on == "ema")
    return objective


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
