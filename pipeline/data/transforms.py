"""Image transforms (torchvision.transforms.v2) shared by both stages.

Every pipeline maps a PIL image of any mode to a normalised float tensor
``[in_chans, img_size, img_size]``. Transforms are plain torchvision objects, so they
pickle into spawn/forkserver loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2


def match_channels(values: Sequence[float], in_chans: int, *, name: str = "values") -> list[float]:
    """Return per-channel statistics of length ``in_chans``.

    A checkpoint's or data set's mean/std may have been computed for another channel count:
    3 values for a 1-channel model are averaged (the grey image of RGB data has roughly the
    mean of the channel means; averaging the stds is an approximation), 1 value for a
    3-channel model is repeated. Any other mismatch is an error.
    """
    vals = [float(v) for v in values]
    if len(vals) == in_chans:
        return vals
    if len(vals) == 3 and in_chans == 1:
        return [sum(vals) / 3.0]
    if len(vals) == 1:
        return vals * in_chans
    raise ValueError(f"{name} has {len(vals)} values, cannot match in_chans={in_chans} (give 1, 3 or {in_chans} values)")


def check_image_args(img_size: int, in_chans: int, crop_pct: float = 1.0) -> None:
    """The arguments every image pipeline here shares, checked once."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")


class StandardizeImage:
    """Each image to zero mean and unit variance over its own pixels (per-image standardisation):
    no dataset statistics needed, and a target's brightness and contrast stop mattering."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / x.std().clamp_min(self.eps)


def build_transform(
    img_size: int,
    in_chans: int,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    crop_pct: float = 1.0,
    crop: str = "resized",
    normalize: str = "dataset",
    jitter: float = 0.0,
) -> v2.Compose:
    """Build the PIL -> normalised tensor pipeline.

    Args:
        img_size: output height and width.
        in_chans: 1 (the image is converted to mode "L") or 3 (mode "RGB").
        train: training pipeline (random crop + flip when ``augment``) or evaluation pipeline.
        mean: per-channel mean in [0, 1] units; length 1, 3 or ``in_chans`` (see `match_channels`).
        std: per-channel std, same rules as ``mean``.
        augment: with ``train``, apply RandomResizedCrop(scale, ratio) and a horizontal flip;
            without it a training pipeline is the evaluation one.
        scale: RandomResizedCrop area range; (0.35, 1) keeps most of a fractal in view.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability (0 disables the flip).
        crop_pct: evaluation resizes the short side to ``img_size / crop_pct`` and centre-crops;
            1.0 keeps the whole image (the embedded data is already framed).
        crop: training crop with ``augment``: ``resized`` (RandomResizedCrop(scale, ratio)) or
            ``pad`` (resize, reflect-pad by an eighth of ``img_size``, random crop back: shifts
            only, the classic small-image augmentation).
        normalize: ``dataset`` ((x - mean) / std with the given statistics) or ``image`` (each
            image standardised by its own mean and std; ``mean``/``std`` are then unused).
        jitter: with ``train`` and ``augment``, brightness and contrast factors drawn from
            ``[1 - jitter, 1 + jitter]`` (``ColorJitter``); 0 disables it.
    """
    if crop not in ("resized", "pad"):
        raise ValueError(f"crop must be resized or pad, got {crop!r}")
    if normalize not in ("dataset", "image"):
        raise ValueError(f"normalize must be dataset or image, got {normalize!r}")
    check_image_args(img_size, in_chans, crop_pct)
    mean_c = match_channels(mean, in_chans, name="mean")
    std_c = match_channels(std, in_chans, name="std")
    if any(s <= 0 for s in std_c):
        raise ValueError(f"std must be positive, got {std_c}")

    # Mode conversion on the PIL image first: cheap, and it handles every PIL mode (P, RGBA, I;16, ...).
    steps: list = [v2.Grayscale(num_output_channels=1) if in_chans == 1 else v2.RGB(), v2.ToImage()]
    if train and augment and crop == "pad":
        pad = max(1, img_size // 8)
        steps += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size),  # the evaluation framing
                  v2.RandomCrop(img_size, padding=pad, padding_mode="reflect")]
    elif train and augment:
        steps.append(v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio, antialias=True))
    if train and augment:
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
        if jitter > 0:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
    else:
        steps += [v2.Resize(int(round(img_size / crop_pct)), antialias=True), v2.CenterCrop(img_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(StandardizeImage() if normalize == "image" else v2.Normalize(mean=mean_c, std=std_c))
    return v2.Compose(steps)


#: Transforms whose output depends on the image alone (no random draw): the leading run of these in
#: a pipeline can be computed once per image and kept (`split_fixed_prefix`).
_FIXED = (v2.Grayscale, v2.RGB, v2.ToImage, v2.Resize, v2.CenterCrop)


def split_fixed_prefix(transform: Callable) -> tuple[Callable | None, Callable]:
    """``(fixed, rest)`` with ``rest(fixed(x)) == transform(x)``: ``fixed`` is the leading run of
    deterministic steps of a ``v2.Compose`` (mode conversion, resize, centre crop), which draw no
    random numbers, so keeping their output per image changes neither results nor the random
    stream; None when there is none (or ``transform`` is not a Compose)."""
    if not isinstance(transform, v2.Compose):
        return None, transform
    steps = list(transform.transforms)
    n = 0
    while n < len(steps) and isinstance(steps[n], _FIXED):
        n += 1
    return (v2.Compose(steps[:n]), v2.Compose(steps[n:])) if n else (None, transform)
