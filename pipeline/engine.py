"""The training loop: train step, evaluation, AMP, accumulation, clipping, throughput.

No file I/O, no Ray, no W&B in here: the stage that owns an `Engine` decides what to do with
the metrics it returns (log, checkpoint, evaluate) through one `on_step` hook.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.distributed import DistContext, all_reduce_sum

Batch = tuple[torch.Tensor, torch.Tensor]

# Depthwise-conv weights ([C, 1, k, k]) get grads whose size-1 dim has another stride: the same
# memory layout, which DDP's reducer still reports on every backward.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


@dataclass
class StepStats:
    """Metrics of the log window that ended at `step` (averaged over ranks)."""

    step: int
    loss: float
    lr: float
    samples_per_s: float
    samples_seen: int
    tflops: float = 0.0
    """Achieved training TFLOP/s over all ranks (0 when FLOPs per sample are unknown)."""


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 on CPU, where bf16 autocast is slower here."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Engine:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ctx: DistContext,
        *,
        precision: str = "auto",
        grad_accum_steps: int = 1,
        clip_grad_norm: float = 0.0,
        channels_last: bool | None = None,
        compile: bool = False,
        log_every: int = 10,
        flops_per_sample: float = 0.0,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        prepare_batch: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None,
    ) -> None:
        self.ctx = ctx
        # (model output, labels) -> loss; cross-entropy unless stage one's objective says otherwise.
        self.loss = loss if loss is not None else F.cross_entropy
        # (images, labels) on the device -> what the forward pass and the loss see (e.g. MixUp).
        self.prepare_batch = prepare_batch
        self.flops_per_sample = flops_per_sample  # training FLOPs (fwd + bwd) of one sample
        self.model = model.to(ctx.device)
        self.channels_last = ctx.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.amp_dtype = autocast_dtype(ctx.device, precision)
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.compile = compile
        self.log_every = log_every
        self.samples_seen = 0
        # Called after model.train(): e.g. keeps a frozen backbone in eval mode (BN stats fixed).
        self.train_mode_hook: Callable[[nn.Module], None] | None = None
        self.rewrap()

    def rewrap(self) -> None:
        """(Re)apply DDP and compile; call again when the set of trainable params changes,
        because DDP fixes its gradient buckets at construction."""
        module: nn.Module = self.model
        if self.ctx.distributed and any(p.requires_grad for p in module.parameters()):
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # Gradients as views of DDP's buckets: no copy, and no layout warning for
            # depthwise-conv weights whose grads come back with other strides.
            module = DDP(module, device_ids=ids, gradient_as_bucket_view=True)
        if self.compile:
            module = torch.compile(module)
        self.module = module
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        non_blocking = self.ctx.device.type == "cuda"
        if images.dim() == 5:  # [B, V, C, H, W]: V views of each sample, trained as B * V images side by side
            images = images.flatten(0, 1)
        images = images.to(self.ctx.device, non_blocking=non_blocking)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.ctx.device, non_blocking=non_blocking)

    def train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimiser step over `grad_accum_steps` micro-batches; returns the mean loss
        (a detached device tensor: no host sync here)."""
        total = torch.zeros((), device=self.ctx.device)
        for i, (images, labels) in enumerate(micro_batches):
            images, labels = self._to_device(images, labels)
            if self.prepare_batch is not None:
                images, labels = self.prepare_batch(images, labels)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(self.module, DDP) else self.module.no_sync()
            with sync:
                with self._autocast():
                    loss = self.loss(self.module(images), labels)
                (loss / len(micro_batches)).backward()
            total += loss.detach()
            self.samples_seen += labels.shape[0] * self.ctx.world_size  # samples, not views
        if self.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / len(micro_batches)

    def fit(
        self,
        batches: Iterable[Batch],
        *,
        start_step: int,
        end_step: int,
        on_step: Callable[[int, StepStats | None], None] | None = None,
    ) -> StepStats | None:
        """Train steps `start_step+1 .. end_step`. `on_step(step, stats)` runs after each step;
        `stats` is set on log steps (every `log_every` and the last) and is the same on all ranks."""
        it: Iterator[Batch] = iter(batches)
        self.set_train_mode()
        window_loss = torch.zeros((), device=self.ctx.device)
        window_steps, window_samples = 0, 0
        t0 = time.perf_counter()
        stats: StepStats | None = None
        for step in range(start_step + 1, end_step + 1):
            micro = [next(it) for _ in range(self.grad_accum_steps)]
            window_loss += self.train_step(micro)
            window_steps += 1
            window_samples += sum(m[0].shape[0] for m in micro) * self.ctx.world_size
            stats = None
            if step % self.log_every == 0 or step == end_step:
                # One collective per log window keeps ranks in step without a sync per step.
                mean_loss = all_reduce_sum(window_loss / window_steps).item() / self.ctx.world_size
                dt = max(time.perf_counter() - t0, 1e-9)
                sps = window_samples / dt
                stats = StepStats(step, mean_loss, self.current_lr(), sps, self.samples_seen,
                                  tflops=sps * self.flops_per_sample / 1e12)
                window_loss.zero_()
                window_steps, window_samples = 0, 0
                t0 = time.perf_counter()
            if on_step is not None:
                on_step(step, stats)
        return stats

    def set_train_mode(self) -> None:
        self.model.train()
        if self.train_mode_hook is not None:
            self.train_mode_hook(self.model)

    def current_lr(self) -> float:
        """The peak-group LR (the head's under layer-wise decay)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Batch]) -> dict[str, float]:
        """Accuracy and mean loss over this rank's shard, summed over ranks. Uses the bare
        model (no DDP) so ranks with unequal shard sizes never wait on each other."""
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, device=self.ctx.device, dtype=torch.float64)
        for images, labels in loader:
            images, labels = self._to_device(images, labels)
            with self._autocast():
                logits = self.model(images)
            sums[0] += (logits.argmax(dim=1) == labels).sum()
            sums[1] += labels.numel()
            sums[2] += F.cross_entropy(logits.float(), labels, reduction="sum")
        sums = all_reduce_sum(sums)
        if was_training:
            self.set_train_mode()
        n = max(sums[1].item(), 1.0)
        return {"accuracy": sums[0].item() / n, "loss": sums[2].item() / n, "count": int(sums[1].item())}
