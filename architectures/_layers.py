"""Layers shared by the model families.

Kept deliberately small: only what more than one block or family needs, written for a
single device (parallelism, compilation and checkpointing are applied by the pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW map.

    Normalises each pixel's channel vector independently, so the statistics do not depend
    on the batch (unlike BatchNorm): tiny fine-tuning batches, eval mode and gradient
    accumulation all see the same behaviour as pretraining.
    """

    def forward(self, x: Tensor) -> Tensor:
        # F.layer_norm normalises trailing dims, so move channels last and back.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a random subset of samples.

    Regularises deep residual nets (Huang et al., 2016); the surviving branches are
    rescaled so the expected output matches eval mode.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two-layer feed-forward network on the last dimension (token/channel mixing MLP)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over tokens [B, N, C].

    Uses `F.scaled_dot_product_attention`, which picks a fused kernel (flash /
    memory-efficient) on GPUs and a plain one on CPUs, so one module serves both.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def drop_path_schedule(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-block drop-path rates rising linearly from 0 to `drop_path_rate`, split by stage.

    Deeper blocks are dropped more often because early blocks compute features every later
    block depends on (the schedule of the stochastic-depth paper).
    """
    total = sum(depths)
    rates = torch.linspace(0.0, drop_path_rate, total).tolist() if total else []
    schedule, start = [], 0
    for depth in depths:
        schedule.append(rates[start : start + depth])
        start += depth
    return schedule


def init_transformer_style(module: nn.Module) -> None:
    """Truncated-normal(0.02) weights and zero biases for conv/linear layers, identity norms.

    The small init keeps every pre-norm residual branch close to zero at the start, so a
    freshly built network is near the identity map and trains stably without warm-up tricks.
    Used with `module.apply(...)`.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
