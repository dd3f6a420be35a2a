"""ResNet with BasicBlocks (He et al., 2016): the well-understood reference to compare StrataNet with.

`resnet18` is the ImageNet layout (7x7/2 stem + max-pool, widths 64..512). `resnet_tiny`
uses a 3x3 stride-1 stem without max-pool, as is usual for 32 px images, where an ImageNet
stem would shrink the map to 8x8 before the first block. BatchNorm is kept because it is
part of the reference design; the last BN of every residual branch starts at zero so each
block starts as the identity (Goyal et al., 2017), which makes training from scratch
robust to the learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torch.nn import functional as F

from ._contract import TransferModel
from ._layers import DropPath, drop_path_schedule
from ._registry import register_model

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet_tiny"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projected when the shape changes)."""

    def __init__(self, in_dim: int, dim: int, stride: int, drop_path: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, dim, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path)
        if stride != 1 or in_dim != dim:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_dim, dim, 1, stride=stride, bias=False), nn.BatchNorm2d(dim)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(self.shortcut(x) + self.drop_path(y))


class ResNet(TransferModel):
    """BasicBlock ResNet.

    Args:
        num_classes: classifier outputs; 0 builds no classifier (features only).
        in_chans: input image channels.
        widths: channels of each stage; every stage after the first halves the resolution.
        depths: blocks in each stage.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "small" (3x3/1 conv, for ~32 px).
        stem_width: stem output channels (default: widths[0]).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over depth).
        drop_rate: dropout on the pooled features before the classifier.
        zero_init_residual: start each block's last BN scale at zero (block = identity).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        stem: Literal["imagenet", "small"] = "imagenet",
        stem_width: int | None = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {widths} and depths {depths} must be non-empty and of equal length")
        stem_width = stem_width or widths[0]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self.input_conv_name = "stem.0.weight"

        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        elif stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
            )
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")

        dpr = drop_path_schedule(drop_path_rate, depths)
        stages: list[nn.Sequential] = []
        in_dim = stem_width
        for i, (dim, rates) in enumerate(zip(widths, dpr, strict=True)):
            blocks = [
                BasicBlock(in_dim if j == 0 else dim, dim, stride=2 if (i > 0 and j == 0) else 1, drop_path=r)
                for j, r in enumerate(rates)
            ]
            stages.append(nn.Sequential(*blocks))
            in_dim = dim
        self.stages = nn.Sequential(*stages)

        self._init_weights(zero_init_residual)
        self.head = self._make_head(num_classes)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init for ReLU nets (fan_out, as in the reference implementation).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> final feature map [B, num_features, h, w]."""
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        return self.head(F.dropout(x, self.drop_rate, self.training))

    def transfer_blocks(self) -> list[str]:
        return ["stem"] + [
            f"stages.{i}.{j}" for i, stage in enumerate(self.stages) for j in range(len(stage))
        ]


@register_model
def resnet_tiny(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ResNet:
    """CPU demo size for 32 px inputs: small stem, one BasicBlock per stage at 32/16/8/4 px."""
    defaults: dict[str, Any] = dict(widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem="small")
    return ResNet(num_classes, in_chans, **{**defaults, **kwargs})


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ResNet:
    """The standard ResNet-18 layout for 224 px inputs (11.7M params with 1000 classes)."""
    defaults: dict[str, Any] = dict(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), stem="imagenet")
    return ResNet(num_classes, in_chans, **{**defaults, **kwargs})
