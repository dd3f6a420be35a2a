"""Stage one's augmentations, split for speed: per sample on PIL, normalisation per batch.

`build_transform` (torchvision v2) costs about 0.3-0.6 ms per 32 px image on this project's CPU,
mostly per-call dispatch, which made the stream slower than the model it feeds. Here the same
operations run as one PIL call per sample (``Image.resize`` with a crop ``box`` does the random
resized crop, antialiased, in C), the crop box is drawn with torchvision's
``RandomResizedCrop.get_params`` algorithm from torch's RNG (so the stream's RNG state governs
it), and the uint8 batch is converted and normalised in one tensor operation:

    SampleAugment: PIL image -> uint8 tensor [C, S, S]   (mode, random resized crop, flip)
    BatchNormalize: uint8 batch [B, C, S, S] -> float32, (x / 255 - mean) / std
    ViewAugment: PIL image -> uint8 views [V, C, S, S]   (label-free objectives; a batch [B, V, C, S, S])

Both are plain picklable objects, for spawn/forkserver loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.data.transforms import check_image_args, match_channels


def random_resized_crop_box(size: tuple[int, int], scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random resized crop of an image of ``size = (width, height)``.

    torchvision's ``RandomResizedCrop.get_params`` algorithm (10 tries at a random area and
    log-uniform aspect ratio, then a centre crop at the nearest allowed ratio), with its random
    numbers drawn from torch's RNG in one call instead of six small tensor operations per try:
    that call alone cost a third of the augmentation.
    """
    width, height = size
    area = height * width
    u = torch.rand(10, 4).tolist()
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a, r, y, x in u:
        target_area = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(y * (height - h + 1)), int(x * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SampleAugment:
    """PIL image of any mode -> uint8 tensor ``[in_chans, img_size, img_size]``.

    Training (``augment``): a random resized crop (area ``scale``, aspect ``ratio``) and a
    horizontal flip with probability ``hflip``. Otherwise: resize the short side to
    ``img_size / crop_pct`` and centre-crop, as `build_transform` does for evaluation.
    """

    def __init__(self, img_size: int, in_chans: int, *, augment: bool = True,
                 scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, crop_pct: float = 1.0, auto_augment: str = "none") -> None:
        check_image_args(img_size, in_chans, crop_pct)
        self.img_size, self.mode = img_size, "L" if in_chans == 1 else "RGB"
        self.augment, self.scale, self.ratio, self.hflip, self.crop_pct = augment, scale, ratio, hflip, crop_pct
        self.auto = auto_augment_op(auto_augment) if augment else None

    def box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The crop of an image of ``size = (width, height)`` as ``(left, top, right, bottom)``: a
        random resized crop (draws from torch's RNG) when training, else the evaluation centre square."""
        if self.augment:
            top, left, h, w = random_resized_crop_box(size, self.scale, self.ratio)
            return left, top, left + w, top + h
        width, height = size
        side = min(width, height) * self.crop_pct  # the centre square an eval resize + centre crop keeps
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def flip(self) -> bool:
        """Whether to flip this sample (draws from torch's RNG only when flipping is on)."""
        return self.augment and self.hflip > 0 and torch.rand(1).item() < self.hflip

    def crop(self, image: Image.Image) -> Image.Image:
        """The cropped, resized (and maybe flipped) PIL image in the model's mode."""
        if image.mode != self.mode:
            image = image.convert(self.mode)
        size = (self.img_size, self.img_size)
        out = image.resize(size, Image.Resampling.BILINEAR, box=self.box(image.size), reducing_gap=None)
        if self.flip():
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.auto is not None:  # on the small crop: cheap, and it draws from torch's RNG like the rest
            out = self.auto(out)
        return out

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(self.crop(image))


def auto_augment_op(name: str):
    """torchvision v2's per-sample random augmentation policy ``name`` (`pretrain.data.auto_augment`), or None."""
    if name == "none":
        return None
    from torchvision.transforms import v2  # only runs that ask for it pay the import in their workers

    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=9)
    raise ValueError(f"auto_augment must be none, trivialaugment or randaugment, got {name!r}")


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image (L or RGB) -> uint8 tensor ``[C, H, W]``."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return torch.from_numpy(array.copy()).unsqueeze(0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ViewAugment:
    """PIL image -> uint8 ``[views, in_chans, img_size, img_size]``: independent views of one sample for a
    label-free objective (SimCLR's recipe: random resized crop, flip, colour jitter, grayscale, optional blur
    and solarisation). The crop is `SampleAugment`'s fast PIL path; the colour operations are torchvision v2
    on the small PIL crop. Every draw comes from torch's RNG, so the stream's RNG state governs the views."""

    def __init__(self, img_size: int, in_chans: int, *, views: int = 2, min_scale: float = 0.08,
                 hflip: float = 0.5, jitter: float = 0.4, jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p: float = 0.0, solarize_p: float = 0.0, local_views: int = 0,
                 local_scale: tuple[float, float] = (0.05, 0.4)) -> None:
        from torchvision.transforms import v2  # only label-free runs pay the import in their workers

        if views < 1 or local_views < 0:
            raise ValueError(f"need views >= 1 and local_views >= 0, got {views} and {local_views}")
        self.views, self.local_views = views, local_views
        self.crop = SampleAugment(img_size, in_chans, augment=True, scale=(min_scale, 1.0), hflip=hflip)
        # DINO's local views: small crops of the sample, after the `views` global ones. They are drawn
        # at `img_size` too (one tensor per batch); at 32 px a smaller crop would leave the backbone's
        # strides a 1x1 map.
        self.local = SampleAugment(img_size, in_chans, augment=True, scale=local_scale, hflip=hflip)
        ops: list = []
        if jitter > 0 and jitter_p > 0:
            ops.append(v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, min(0.5, jitter / 4))], p=jitter_p))
        if grayscale_p > 0 and in_chans == 3:
            ops.append(v2.RandomGrayscale(p=grayscale_p))
        if blur_p > 0:
            kernel = max(3, (img_size // 10) | 1)  # odd, about a tenth of the image (SimCLR)
            ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        if solarize_p > 0:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        self.colour = v2.Compose(ops) if ops else None

    def view(self, image: Image.Image, crop: SampleAugment | None = None) -> torch.Tensor:
        out = (crop or self.crop).crop(image)
        if self.colour is not None:
            out = self.colour(out)
        return pil_to_uint8(out)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.view(image) for _ in range(self.views)]
                           + [self.view(image, self.local) for _ in range(self.local_views)])


class BatchNormalize:
    """uint8 ``[B, C, H, W]`` (or views ``[B, V, C, H, W]``) -> float32 ``(x / 255 - mean) / std`` (1 or 3
    values matched to C)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        mean_c, std_c = match_channels(mean, in_chans, name="mean"), match_channels(std, in_chans, name="std")
        if any(s <= 0 for s in std_c):
            raise ValueError(f"std must be positive, got {std_c}")
        # (x / 255 - m) / s == x * (1 / (255 s)) - m / s: one multiply-add per element.
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std_c]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean_c, std_c)]).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, batch.float(), self.scale)

    def to(self, device: torch.device | str) -> "BatchNormalize":
        """Move the statistics to ``device`` (for batches normalised there); returns self."""
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self
