"""StrataNet: convolution strata first, attention strata last — the project's own architecture.

Why this shape. Early layers of vision networks learn local features (edges, colour blobs,
textures) that look alike whatever the training data, so they transfer well from synthetic
pretraining images to a small target set. Convolutions are the right tool there: local,
weight-shared and data-efficient. Late layers combine those parts into whole-object evidence;
self-attention over the (now few) tokens lets any part talk to any other part in one step.
So the network is built as strata: `conv_stages` convolutional stages at high resolution,
then attention stages at low resolution, with a 2x downsampling conv between stages.

Design choices:
- Conditional positional encoding (a residual depthwise 3x3 conv before every attention
  block, as in CPVT) gives tokens position information computed from their neighbourhood,
  so there is no position table tied to one input size: any size >= 16 px works.
- Norms in the conv strata: `conv_norm`. `batch` (BatchNorm, the default of `hybrid_tiny`)
  trains far better from few images: from scratch on 5 shots per class it scored +5.5 points
  on digits, +9.8 on photographed textures and +1.2 on photo patches over `layer`
  (LayerNorm, batch-size independent; the default of `hybrid_base`), measured with
  `scripts/bench_transfer.py`-style runs (3 seeds). The attention strata always use LayerNorm.
- Head: global mean pooling + LayerNorm + linear. Chosen over a learned attention-pooling
  query because the pooled feature has no parameters tied to the pretraining classes: a
  frozen backbone (linear probe) gives the new task the same unbiased summary of every
  token, and the result is independent of token count. The LayerNorm earns its place: without it
  (`head_norm=none`) stage two lost 2-14 points on every bench target (README).

Variants: `hybrid_tiny` (CPU demo at 32 px, 0.19M params; all strata convolutional, since
at 32 px the last stage sees only 4x4 tokens: see its factory) and `hybrid_base` (224 px on GPUs,
~28M params, 4.2 GMACs at 224 px — ResNet-50 class). Kwargs: dims, depths, conv_stages, num_heads,
mlp_ratio, conv_kernel, stem_stride, drop_path_rate, drop_rate, conv_norm, down_norm, head_norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from ._contract import TransferModel
from ._layers import Attention, DropPath, LayerNorm2d, Mlp, drop_path_schedule, init_transformer_style
from ._registry import register_model

__all__ = ["StrataNet", "hybrid_base", "hybrid_tiny"]


class ConvBlock(nn.Module):
    """Local-feature block: depthwise kxk conv, then a per-pixel MLP (ConvNeXt layout).

    The depthwise conv mixes space and the MLP mixes channels; separating them keeps the
    block cheap at high resolution, where the conv strata run.
    """

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float, drop_path: float, norm: str = "layer") -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = _norm2d(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # channels last: Linear acts on C
        y = self.mlp(y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


def _norm2d(kind: str, dim: int) -> nn.Module:
    """Channel norm of an NCHW map in the conv strata: `layer` (per pixel) or `batch`."""
    if kind == "layer":
        return LayerNorm2d(dim)
    if kind == "batch":
        return nn.BatchNorm2d(dim)
    raise ValueError(f"norm must be layer or batch, got {kind!r}")


class AttentionBlock(nn.Module):
    """Global-combination block: conditional positional encoding, then a pre-norm transformer layer."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos(x)  # position from the neighbourhood, valid at any resolution
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        t = t + self.drop_path(self.attn(self.norm1(t)))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    """Optional 2x downsampling into `dim` channels, then a sequence of blocks."""

    def __init__(self, in_dim: int, dim: int, downsample: bool, blocks: list[nn.Module], norm: str = "layer") -> None:
        super().__init__()
        if downsample:
            # Overlapping 3x3/2 conv (not 2x2/2) so odd sizes keep every pixel.
            self.downsample: nn.Module = nn.Sequential(
                _norm2d(norm, in_dim), nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class StrataNet(TransferModel):
    """Conv stages then attention stages; see the module docstring for the reasoning.

    Args:
        num_classes: classifier outputs; 0 builds no classifier (features only).
        in_chans: input image channels.
        dims: channels of each stage.
        depths: blocks in each stage.
        conv_stages: how many leading stages are convolutional; the rest use attention.
            0 gives an all-attention net, len(dims) an all-conv one (useful ablations).
        num_heads: attention heads, one int for every attention stage or one per attention stage.
        mlp_ratio: MLP hidden width relative to the stage width, in every block.
        conv_kernel: depthwise kernel size of the conv blocks.
        stem_stride: 1, 2 or 4 — downsampling of the two-conv stem (4 for 224 px, 2 for 32 px;
            at 2 the first conv runs at full resolution and the second strides).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over depth).
        drop_rate: dropout on the pooled features before the classifier.
        conv_norm: `batch` or `layer`: the norm of the stem and the conv blocks.
        down_norm: `batch` or `layer`: the norm before each downsampling conv.
        head_norm: `layer`, `batch` or `none`: the norm of the pooled feature vector.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        dims: Sequence[int],
        depths: Sequence[int],
        conv_stages: int,
        num_heads: int | Sequence[int],
        mlp_ratio: float = 4.0,
        conv_kernel: int = 7,
        stem_stride: int = 4,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        conv_norm: str = "layer",
        down_norm: str = "layer",
        head_norm: str = "layer",
    ) -> None:
        super().__init__()
        dims, depths = tuple(dims), tuple(depths)
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims {dims} and depths {depths} must be non-empty and of equal length")
        if not 0 <= conv_stages <= len(dims):
            raise ValueError(f"conv_stages must be in [0, {len(dims)}], got {conv_stages}")
        n_attn = len(dims) - conv_stages
        heads = (num_heads,) * n_attn if isinstance(num_heads, int) else tuple(num_heads)
        if len(heads) != n_attn:
            raise ValueError(f"num_heads {num_heads} must give one value per attention stage ({n_attn})")
        # The first conv sees every pixel (fine texture survives); the second downsamples.
        stem_strides = {1: (1, 1), 2: (1, 2), 4: (2, 2)}
        if stem_stride not in stem_strides:
            raise ValueError(f"stem_stride must be one of {sorted(stem_strides)}, got {stem_stride}")
        if conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd to keep the map size, got {conv_kernel}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.drop_rate = drop_rate
        self.input_conv_name = "stem.0.weight"

        s1, s2 = stem_strides[stem_stride]
        stem_dim = max(dims[0] // 2, 8)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 3, stride=s1, padding=1),
            _norm2d(conv_norm, stem_dim),
            nn.GELU(),
            nn.Conv2d(stem_dim, dims[0], 3, stride=s2, padding=1),
            _norm2d(conv_norm, dims[0]),  # start the residual stream at unit scale
        )

        dpr = drop_path_schedule(drop_path_rate, depths)
        stages: list[Stage] = []
        for i, dim in enumerate(dims):
            if i < conv_stages:
                blocks: list[nn.Module] = [ConvBlock(dim, conv_kernel, mlp_ratio, r, conv_norm) for r in dpr[i]]
            else:
                h = heads[i - conv_stages]
                blocks = [AttentionBlock(dim, h, mlp_ratio, r) for r in dpr[i]]
            stages.append(Stage(dims[i - 1] if i else dims[0], dim, downsample=i > 0, blocks=blocks, norm=down_norm))
        self.stages = nn.Sequential(*stages)
        # Normalises the pooled vector (not each token): heads and linear probes get
        # unit-scale features whatever the number of tokens.
        heads_norms = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d, "none": lambda _: nn.Identity()}
        if head_norm not in heads_norms:
            raise ValueError(f"head_norm must be one of {sorted(heads_norms)}, got {head_norm!r}")
        self.norm = heads_norms[head_norm](self.num_features)

        self.apply(init_transformer_style)
        self.head = self._make_head(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> map [B, num_features, h, w], h = H / (stem_stride * 2**(stages-1))."""
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        if pre_logits:
            return x
        return self.head(F.dropout(x, self.drop_rate, self.training))

    def transfer_blocks(self) -> list[str]:
        blocks = ["stem"]
        for i, stage in enumerate(self.stages):
            if not isinstance(stage.downsample, nn.Identity):
                blocks.append(f"stages.{i}.downsample")
            blocks += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
        # head_norm=none leaves the pooled norm without parameters: no block then (every block owns some).
        return [*blocks, "norm"] if any(True for _ in self.norm.parameters()) else blocks


def _build(defaults: dict[str, Any], num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> StrataNet:
    resolved = {**defaults, **kwargs}
    model = StrataNet(num_classes, in_chans, **resolved)
    model.resolved_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}
    return model


@register_model
def hybrid_tiny(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
    """CPU demo size for 32 px inputs: stem /2, then conv strata at 16, 8 and 4 px."""
    # Sized for ~40 ms per forward+backward of 64 images on one CPU core. The 3x3
    # depthwise kernel is deliberate: CPU depthwise kernels are ~5-10x slower at 5x5 and up.
    # All three stages are convolutional: at 32 px the last stage has only 4x4 tokens, and an
    # attention stratum there lost to a conv one at the same widths, from scratch and after
    # pretraining (README, "StrataNet's strata at 32 px"); it is also 19-27% slower per step.
    defaults = dict(
        dims=(16, 48, 96),
        depths=(1, 1, 2),
        conv_stages=3,
        num_heads=3,
        mlp_ratio=3.0,
        conv_kernel=3,
        stem_stride=2,
        conv_norm="batch",  # few-image training: see the module docstring
    )
    return _build(defaults, num_classes, in_chans, kwargs)


@register_model
def hybrid_base(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> StrataNet:
    """GPU size for 224 px inputs: stem /4, conv at 56 and 28 px, attention at 14 and 7 px."""
    defaults = dict(
        dims=(96, 192, 384, 768),
        depths=(2, 3, 5, 2),
        conv_stages=2,
        num_heads=(6, 12),
        mlp_ratio=4.0,
        conv_kernel=7,
        stem_stride=4,
    )
    return _build(defaults, num_classes, in_chans, kwargs)
