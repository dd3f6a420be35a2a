"""A small model that follows the architectures/ contract, so pipeline tests need no registry.

Conv stem, three blocks (the first with BatchNorm, so linear-probe tests see running stats),
a norm and a linear head named ``head``. ``width`` changes every backbone shape, which makes a
second instance a convenient "incompatible checkpoint".
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNBlock(nn.Module):
    """Conv + BatchNorm + ReLU: the block whose buffers a linear probe must not update."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResBlock(nn.Module):
    """Residual conv block with a per-channel layer scale (4-D, excluded via no_weight_decay)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((1, width, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * torch.relu(self.conv(self.norm(x)))


class TinyNet(nn.Module):
    """Contract-following test model: stem -> blocks.0..2 -> norm -> head."""

    head_prefix = "head."
    input_conv_name = "stem.weight"

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = width
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(ConvBNBlock(width), ResBlock(width), ResBlock(width))
        self.norm = nn.GroupNorm(1, width)
        self.head: nn.Module = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {"name": "tiny_test", "kwargs": {"width": width}}

    def transfer_blocks(self) -> list[str]:
        return ["stem", "blocks.0", "blocks.1", "blocks.2", "norm"]

    def no_weight_decay(self) -> set[str]:
        return {f"blocks.{i}.gamma" for i in (1, 2)}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = feats.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def tiny_model(num_classes: int = 10, in_chans: int = 3, width: int = 8, seed: int = 0) -> TinyNet:
    """Build a TinyNet with a fixed seed, so two calls give identical weights."""
    torch.manual_seed(seed)
    return TinyNet(num_classes=num_classes, in_chans=in_chans, width=width)
