"""Stage one's split augmentation: the same operations as `build_transform`, per sample on PIL, normalised per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.augment import BatchNormalize, SampleAugment
from pipeline.data.transforms import build_transform


def _image(mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode, chans", [("RGB", 3), ("L", 1), ("P", 3), ("RGBA", 1)])
def test_any_mode_to_uint8_of_the_asked_size_and_channels(mode, chans):
    out = SampleAugment(16, chans)(_image(mode))
    assert out.shape == (chans, 16, 16) and out.dtype == torch.uint8


def test_eval_path_matches_build_transform():
    img = _image(size=(48, 48))
    norm = BatchNormalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 3)
    ours = norm(SampleAugment(24, 3, augment=False)(img).unsqueeze(0))[0]
    ref = build_transform(24, 3, train=False, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])(img)
    # PIL's and torch's antialiased bilinear resizes differ by rounding only.
    assert (ours - ref).abs().mean() < 0.05


def test_random_crops_follow_the_torch_rng():
    img, aug = _image(), SampleAugment(16, 3, scale=(0.2, 1.0))
    torch.manual_seed(5)
    a = [aug(img) for _ in range(8)]
    torch.manual_seed(5)
    b = [aug(img) for _ in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({x.sum().item() for x in a}) > 1  # crops differ from draw to draw


def test_crop_boxes_follow_torchvision_distribution():
    from torchvision.transforms import RandomResizedCrop

    from pipeline.data.augment import random_resized_crop_box

    img = _image(size=(40, 30))
    torch.manual_seed(0)
    ours = [random_resized_crop_box((40, 30), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    ref = [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    for boxes in (ours, ref):
        assert all(0 <= t and 0 <= l and t + h <= 30 and l + w <= 40 for t, l, h, w in boxes)
    mean_area = [np.mean([h * w for _, _, h, w in b]) / 1200 for b in (ours, ref)]
    mean_left = [np.mean([l for _, l, _, _ in b]) for b in (ours, ref)]
    assert abs(mean_area[0] - mean_area[1]) < 0.03 and abs(mean_left[0] - mean_left[1]) < 0.6
    assert random_resized_crop_box((4, 400), (0.9, 1.0), (3 / 4, 4 / 3))[2:] == (5, 4)  # fallback centre crop


def test_flip_probability():
    img = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)))  # brightens to the right
    aug = SampleAugment(16, 1, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5)
    torch.manual_seed(0)
    outs = [aug(img)[0, 0] for _ in range(200)]
    flipped = sum(int(row[0] > row[-1]) for row in outs) / 200
    assert 0.35 < flipped < 0.65
    never = SampleAugment(16, 1, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert all(row[0] < row[-1] for row in (never(img)[0, 0] for _ in range(20)))


def test_batch_normalize_equals_the_formula():
    batch = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    out = BatchNormalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 3)(batch)
    ref = (batch.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    grey = BatchNormalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 1)(batch[:, :1])  # RGB stats averaged for 1 channel
    assert grey.shape == (4, 1, 5, 5)
    with pytest.raises(ValueError, match="std must be positive"):
        BatchNormalize([0.5], [0.0], 3)
