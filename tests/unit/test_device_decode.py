"""`pretrain.data.decode: device`: JPEGs decoded in the training process (nvJPEG on CUDA; here the
CPU, through the same code), with the very crops and flips the worker path draws."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.augment import BatchNormalize, SampleAugment
from pipeline.data.device_decode import (
    DeferredAugment,
    DeviceDecodedStream,
    DeviceDecoder,
    EncodedJpeg,
    PlannedCrop,
    pack_batch,
)
from pipeline.data.shards import build_shard_loader
from tests.unit._shard_fixtures import png, write_shard

REPO = Path(__file__).resolve().parents[2]
SIZE = 24


def smooth(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth, asymmetric image: interpolation differs little between paths, a wrong crop or flip a lot."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    return image.convert(mode)


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def worker_path(images: list[Image.Image], augment: SampleAugment, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([augment(Image.open(io.BytesIO(jpeg(im)))) for im in images]).float() / 255


def device_path(images: list[Image.Image], augment: SampleAugment, seed: int, in_chans: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    deferred = DeferredAugment(augment)
    items = []
    for im in images:
        data = jpeg(im)
        items.append(deferred(EncodedJpeg(data, Image.open(io.BytesIO(data)).size)))
    decoder = DeviceDecoder(augment.img_size, in_chans, [0.0], [1.0], "cpu")
    out, labels = decoder(pack_batch(items), torch.arange(len(items)))
    assert labels.tolist() == list(range(len(items))) and decoder.dropped == 0
    return out


@pytest.mark.parametrize("augment", [True, False])
def test_device_path_draws_the_worker_paths_crops_and_flips(augment):
    images = [smooth(i, 40 + 8 * (i % 3), 32 + 4 * (i % 2)) for i in range(12)]  # three sizes: grouped decode
    aug = SampleAugment(SIZE, 3, augment=augment, scale=(0.3, 1.0), hflip=0.5)
    ref, got = worker_path(images, aug, seed=3), device_path(images, aug, seed=3)
    assert got.shape == ref.shape == (12, 3, SIZE, SIZE)
    per_image = (got - ref).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.03, per_image  # PIL bilinear vs roi_align: a few grey levels
    # The comparison has teeth: another seed draws other crops, and they differ far more.
    other = device_path(images, aug, seed=4) if augment else device_path([im.rotate(180) for im in images], aug, 3)
    assert (other - ref).abs().mean(dim=(1, 2, 3)).min() > 2 * per_image.max()


def test_grayscale_model_reads_colour_jpegs_as_grey():
    images = [smooth(i, 36, 36) for i in range(4)]
    aug = SampleAugment(SIZE, 1, augment=True)
    ref, got = worker_path(images, aug, seed=0), device_path(images, aug, seed=0, in_chans=1)
    assert got.shape == (4, 1, SIZE, SIZE)
    assert (got - ref).abs().mean() < 0.03


def test_ready_images_and_undecodable_bodies_in_one_batch():
    aug = SampleAugment(SIZE, 3, augment=False)
    good = jpeg(smooth(0, 32, 32))
    truncated = jpeg(smooth(1, 64, 64))[:300]  # the header parses, the body is cut
    ready = aug(Image.open(io.BytesIO(png(5, 16))))  # a PNG: the worker decoded and cropped it
    items = [PlannedCrop(good, aug.box((32, 32)), False), ready, PlannedCrop(truncated, aug.box((64, 64)), False)]
    decoder = DeviceDecoder(SIZE, 3, [0.5], [0.25], "cpu")
    images, labels = decoder(pack_batch(items), torch.tensor([7, 8, 9]))
    assert labels.tolist() == [7, 8] and decoder.dropped == 1
    norm = BatchNormalize([0.5], [0.25], 3)
    assert torch.allclose(images[1], norm(ready[None])[0])
    assert (images[0] - norm(worker_path([smooth(0, 32, 32)], aug, 0) * 255)[0]).abs().mean() < 0.1


def _stream(urls: str, decode: str, **kw):
    aug = SampleAugment(SIZE, 3, augment=True)
    loader = build_shard_loader(urls, rank=0, world_size=1, batch_size=6, num_workers=0, steps=4,
                                shuffle_buffer=8, transform=aug, seed=1, num_classes=10,
                                batch_transform=None if decode == "device" else BatchNormalize([0.5], [0.25], 3),
                                decode=decode, **kw)
    if decode == "device":
        return DeviceDecodedStream(loader, DeviceDecoder(SIZE, 3, [0.5], [0.25], "cpu"))
    return loader


def test_stream_with_device_decode_matches_the_worker_stream(tmp_path):
    """Same samples in the same order, same crops; JPEG bodies that fail on the device are counted
    with the worker's undecodable samples; PNGs and CMYK JPEGs go through the worker."""
    samples = []
    for j in range(26):
        data = jpeg(smooth(j, 40, 40))
        if j == 3:
            data = png(j, 40)
        elif j == 5:
            data = jpeg(smooth(j, 40, 40, mode="CMYK"))
        elif j == 9:
            data = b"<html>403</html>"  # not an image at all: the worker skips it
        samples.append({"__key__": f"k{j:03d}", "jpg": data, "cls": str(j % 10).encode()})
    write_shard(tmp_path / "d-000.tar", samples)
    urls = str(tmp_path / "d-000.tar")

    ref = _stream(urls, "worker")
    got = _stream(urls, "device")
    for (ri, rl), (gi, gl) in zip(ref, got):
        assert ref.last_keys == got.last_keys
        assert torch.equal(rl, gl)
        assert (ri - gi).abs().mean() < 0.15  # normalised units (std 0.25): ~1 % of the range
    summary = got.summary()
    assert summary["skipped_by_reason"]["undecodable"] == 1 and summary["samples_used"] == 24


def test_body_that_fails_on_the_device_is_dropped_and_counted(tmp_path):
    samples = [{"__key__": f"k{j:03d}", "jpg": jpeg(smooth(j, 40, 40)), "cls": b"1"} for j in range(24)]
    samples[2]["jpg"] = samples[2]["jpg"][: len(samples[2]["jpg"]) * 3 // 4]  # cut body: only the device notices
    write_shard(tmp_path / "t-000.tar", samples)
    stream = _stream(str(tmp_path / "t-000.tar"), "device")
    sizes = [len(labels) for _, labels in stream]
    assert sorted(sizes) == [5, 6, 6, 6]
    summary = stream.summary()
    assert summary["skipped_by_reason"]["undecodable"] == 1
    assert summary["skipped_samples"] == 1 and summary["samples_used"] == 23
    assert stream.state_dict()["carried"]["skipped_undecodable"] == 1  # kept in checkpoints


def test_device_decode_needs_the_sample_augment(tmp_path):
    write_shard(tmp_path / "x-000.tar", [{"__key__": "a", "jpg": jpeg(smooth(0, 8, 8)), "cls": b"0"}])
    with pytest.raises(ValueError, match="SampleAugment"):
        build_shard_loader(str(tmp_path / "x-000.tar"), rank=0, world_size=1, batch_size=1, num_workers=0,
                           steps=1, shuffle_buffer=0, transform=lambda im: im, decode="device")
    with pytest.raises(ValueError, match="decode must be one of"):
        build_shard_loader(str(tmp_path / "x-000.tar"), rank=0, world_size=1, batch_size=1, num_workers=0,
                           steps=1, shuffle_buffer=0, transform=SampleAugment(8, 3), decode="gpu")


def test_config_names_a_bad_decode_value():
    with pytest.raises(ConfigError, match=r"pretrain\.data\.decode: must be worker or device, got 'gpu'"):
        load_config(REPO / "configs" / "demo.yaml", ["pretrain.data.decode=gpu"], command="pretrain")
