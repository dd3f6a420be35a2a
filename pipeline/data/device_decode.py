"""Stage one's on-device JPEG path (`pretrain.data.decode: device`).

At 224 px the loader workers spend most of their time decoding JPEGs, and a GPU decodes them far
faster (nvJPEG through ``torchvision.io.decode_jpeg(..., device="cuda")``). With this path the
work is split so that augmentation stays exactly what the worker path draws:

    loader worker:  JPEG header only (size, mode) -> crop box and flip drawn by `SampleAugment`
                    (same RNG draws, same order) -> `pack_batch`: the batch's encoded bytes in one
                    tensor, plus boxes, flips and positions
    training side:  `DeviceDecoder`: one batched decode on the device -> every crop resized in one
                    ``roi_align`` call per image size -> flips -> normalisation

Images the device path does not take (PNG, WebP, CMYK JPEGs, ...) are decoded and augmented by
the worker as before and travel beside the encoded ones. A JPEG whose header parses but whose
body does not decode is dropped from its batch and counted as ``skipped_undecodable``, like any
undecodable sample; the stream's positions, and so exact resume, are those of the worker path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from pipeline.data import position as pos
from pipeline.data.augment import BatchNormalize, SampleAugment

DECODE_MODES = ("worker", "device")
#: PIL modes of JPEGs decoded on the device; others (CMYK, ...) are decoded by the worker.
DEVICE_JPEG_MODES = ("L", "RGB")


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header was read but whose pixels were not decoded."""

    data: bytes
    size: tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class PlannedCrop:
    """An encoded JPEG with its augmentation drawn: crop ``box`` (left, top, right, bottom) and ``flip``."""

    data: bytes
    box: tuple[float, float, float, float]
    flip: bool


class DeferredAugment:
    """Worker side of the device path: `SampleAugment`'s draws for an `EncodedJpeg`, its full
    work for any image the worker decoded. Picklable, like `SampleAugment`."""

    def __init__(self, augment: SampleAugment) -> None:
        self.augment = augment

    def __call__(self, image: Any) -> torch.Tensor | PlannedCrop:
        if isinstance(image, EncodedJpeg):
            box = self.augment.box(image.size)
            return PlannedCrop(image.data, box, self.augment.flip())
        return self.augment(image)


def pack_batch(items: Sequence[torch.Tensor | PlannedCrop]) -> dict[str, torch.Tensor]:
    """A batch of planned crops and ready uint8 images as a few tensors (cheap to pass between
    processes and to pin): the JPEG bytes concatenated, with lengths, boxes, flips and positions."""
    jpeg_index = [i for i, item in enumerate(items) if isinstance(item, PlannedCrop)]
    ready_index = [i for i, item in enumerate(items) if not isinstance(item, PlannedCrop)]
    crops = [items[i] for i in jpeg_index]
    data = b"".join(c.data for c in crops)  # type: ignore[union-attr]
    ready = [items[i] for i in ready_index]
    return {
        "data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
        "lengths": torch.tensor([len(c.data) for c in crops], dtype=torch.int64),  # type: ignore[union-attr]
        "jpeg_index": torch.tensor(jpeg_index, dtype=torch.int64),
        "boxes": torch.tensor([c.box for c in crops], dtype=torch.float32).reshape(-1, 4),  # type: ignore[union-attr]
        "flip": torch.tensor([c.flip for c in crops], dtype=torch.bool),  # type: ignore[union-attr]
        "ready": torch.stack(ready) if ready else torch.empty(0, dtype=torch.uint8),  # type: ignore[arg-type]
        "ready_index": torch.tensor(ready_index, dtype=torch.int64),
    }


class DeviceDecoder:
    """Training side: a packed batch -> normalised float images ``[B', C, S, S]`` on ``device``.

    ``B'`` is the batch size less the JPEGs that failed to decode (counted in ``dropped``).
    """

    def __init__(self, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str) -> None:
        self.img_size, self.in_chans = img_size, in_chans
        self.device = torch.device(device)
        self.mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        self.normalize = BatchNormalize(mean, std, in_chans).to(self.device)
        self.dropped = 0

    def _decode(self, chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode on the device in one call; when that fails, image by image, so one bad body costs
        only itself (None)."""
        if not chunks:
            return []
        try:
            return list(decode_jpeg(chunks, mode=self.mode, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for chunk in chunks:
                try:
                    out.append(decode_jpeg(chunk, mode=self.mode, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _resize_crops(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """Every image's crop box resized to ``img_size``: one ``roi_align`` per distinct image size
        (bilinear, averaging ceil(crop / size) samples per output pixel, so downscaling is antialiased)."""
        size = self.img_size
        out = torch.empty(len(images), self.in_chans, size, size, device=self.device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(i)
        for members in by_shape.values():
            stack = torch.stack([images[i] for i in members]).float()
            rois = torch.cat([torch.arange(len(members), device=self.device, dtype=torch.float32)[:, None],
                              boxes[members].to(self.device)], dim=1)
            out[members] = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0,
                                     sampling_ratio=-1, aligned=True)
        return out

    def __call__(self, packed: Mapping[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        jpeg_index, ready_index = packed["jpeg_index"], packed["ready_index"]
        total = len(jpeg_index) + len(ready_index)
        chunks = list(torch.split(packed["data"], packed["lengths"].tolist())) if len(jpeg_index) else []
        decoded = self._decode(chunks)
        good = [i for i, image in enumerate(decoded) if image is not None]
        batch = torch.empty(total, self.in_chans, self.img_size, self.img_size, device=self.device)
        keep = torch.ones(total, dtype=torch.bool)
        if good:
            crops = self._resize_crops([decoded[i] for i in good], packed["boxes"][good])  # type: ignore[misc]
            flip = packed["flip"][good].to(self.device)
            crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
            batch[jpeg_index[good].to(self.device)] = crops
        if len(ready_index):
            batch[ready_index.to(self.device)] = packed["ready"].to(self.device, non_blocking=True).float()
        failed = [i for i, image in enumerate(decoded) if image is None]
        if failed:
            keep[jpeg_index[failed]] = False
            self.dropped += len(failed)
            batch, labels = batch[keep.to(self.device)], labels[keep]
        return self.normalize(batch), labels


class DeviceDecodedStream:
    """A `ShardStream` of packed batches, decoded by ``decoder`` as the training loop takes them.

    Everything else (positions, counters, summary) is the stream's; JPEGs the device could not
    decode are added to its counters as undecodable samples, so they persist in checkpoints.
    """

    def __init__(self, stream: Any, decoder: DeviceDecoder) -> None:
        self.stream, self.decoder = stream, decoder

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for packed, labels in self.stream:
            before = self.decoder.dropped
            images, labels = self.decoder(packed, labels)
            if self.decoder.dropped != before:
                n = self.decoder.dropped - before
                pos.add_counters(self.stream.carried, {"skipped_undecodable": n, "skipped_samples": n,
                                                       "samples_used": -n})
            yield images, labels

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
