"""One-change variants of `hybrid_tiny` and `resnet_tiny`, for screening with `scripts/bench_transfer.py`.

Each factory is an import-path model (`arch_variants:<name>`), so one bench run compares several
variants side by side and every checkpoint rebuilds its own variant:

    PYTHONPATH=scripts .venv/bin/python scripts/bench_transfer.py --targets scenes --shots 5 \\
        --archs hybrid_tiny arch_variants:stem1 arch_variants:dense arch_variants:resnet_half_res \\
        --strategies scratch linear_probe --no-assess --pretrain-steps 50

Kwarg variants can also be run one at a time with `--override pretrain.model.kwargs.<key>=<value>`;
the structural ones (`dense`, `torch_init`, `resnet_half_res`, `stem32`) have no kwarg. README, "Where
StrataNet's scenes gap comes from" and "StrataNet against `resnet_tiny` on the noise-ground corpus",
has what they measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from architectures._layers import init_transformer_style
from architectures.hybrid import ConvBlock, StrataNet, hybrid_tiny
from architectures.resnet import ResNet, resnet_tiny


def _hybrid(**changed: Any) -> Callable[..., StrataNet]:
    def factory(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
        return hybrid_tiny(num_classes, in_chans, **{**changed, **kwargs})
    return factory


stem1 = _hybrid(stem_stride=1)  # first stage at 32 px instead of 16
wide24 = _hybrid(dims=(24, 64, 128))
stem1_four_stages = _hybrid(stem_stride=1, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), conv_stages=4)
depths122 = _hybrid(depths=(1, 2, 2))
down_batchnorm = _hybrid(down_norm="batch")


def dense(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
    """Every conv block's depthwise 3x3 made a full 3x3 conv: channels mix in space, as in a ResNet."""
    model = hybrid_tiny(num_classes, in_chans, **kwargs)
    for block in model.modules():
        if isinstance(block, ConvBlock):
            dw = block.dwconv
            block.dwconv = nn.Conv2d(dw.in_channels, dw.out_channels, dw.kernel_size, padding=dw.padding)
            init_transformer_style(block.dwconv)
    return model


def dense_batchnorm(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
    return dense(num_classes, in_chans, **{"down_norm": "batch", **kwargs})


def torch_init(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
    """PyTorch's default (Kaiming-uniform) init of every conv and linear, not truncated-normal(0.02)."""
    model = hybrid_tiny(num_classes, in_chans, **kwargs)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return model


def resnet_half_res(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ResNet:
    """`resnet_tiny` with a stride-2 stem: every stage at half its resolution (StrataNet's 16 px start)."""
    model = resnet_tiny(num_classes, in_chans, **kwargs)
    model.stem[0].stride = (2, 2)
    return model


# A narrow first stage at 32 px ahead of hybrid_tiny's own 16/8/4 px stages, the layout of the narrow
# `resnet_tiny` (8 channels at 32 px) that led StrataNet on `scenes` at equal compute.
narrow32 = _hybrid(stem_stride=1, dims=(8, 16, 48, 96), depths=(1, 1, 1, 2), conv_stages=4)


def stem32(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
    """`hybrid_tiny` with a second full 3x3 conv at 32 px in the stem, before it downsamples."""
    model = hybrid_tiny(num_classes, in_chans, **kwargs)
    width = model.stem[0].out_channels
    extra = [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU()]
    for m in extra:
        init_transformer_style(m)
    model.stem = nn.Sequential(*model.stem[:3], *extra, *model.stem[3:])
    return model
