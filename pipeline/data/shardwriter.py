"""Convert a labelled image set into webdataset shards with an ``_info.json`` index.

Sources:
- a ``save_to_disk`` directory of HF ``datasets`` (a ``DatasetDict``: ``split`` picks one; or a
  single ``Dataset``);
- an image folder: ``DIR/<class>/*.jpg`` or ``DIR/<split>/<class>/*.jpg`` (class index = sorted
  class names; an HF imagefolder with a ``metadata.csv``/``.jsonl`` goes through ``datasets``);
- a Hub name (``org/name``), streamed from the Hub when online.

Each sample becomes ``<key>.<jpg|png|webp|...>`` (the original encoded bytes; re-encoded as PNG
only when they are not JPEG/PNG/WebP or ``image_format`` asks for it) and ``<key>.cls`` (the
class index as text). A shard closes at ``max_count`` samples or before it would pass
``max_size`` bytes (give or take tar's 10 KiB record padding). Shards are written as ``*.tar.tmp`` and renamed when complete, and
``_progress.json`` records finished shards, so an interrupted conversion continues where it
stopped (same arguments) and gives the very bytes an uninterrupted one gives. ``_info.json``
(classes, samples per shard, mean/std of the first ``stats_samples`` images) is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("transferline.data")

INFO_NAME = "_info.json"
PROGRESS_NAME = "_progress.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_TAR_BLOCK = 512


def parse_size(text: str | int) -> int:
    """``"512M"`` / ``"1.5G"`` / ``"300k"`` / ``"1000"`` -> bytes (0 = no limit)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    number = s[:-1] if scale > 1 else s
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 500M, 1G, 1048576)") from None


# --------------------------------------------------------------------------- sources -> (bytes, label)


class _Source:
    """A sequence of ``(encoded image bytes | PIL image, label)`` with class names; resumable at an index."""

    def __init__(self, items: Callable[[int], Iterator[tuple[Any, int]]], length: int | None, classes: list[str],
                 description: str) -> None:
        self.items, self.length, self.classes, self.description = items, length, classes, description


def _folder_source(root: Path) -> _Source:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"{root}: no images under <class>/ subdirectories ({', '.join(IMAGE_EXTENSIONS)})")

    def items(start: int) -> Iterator[tuple[Any, int]]:
        for path, label in files[start:]:
            yield path.read_bytes(), label

    return _Source(items, len(files), classes, f"image folder {root}")


def _hf_source(ds: Any, image_column: str, label_column: str, where: str) -> _Source:
    import datasets

    for role, column in (("image column", image_column), ("label column", label_column)):
        if column not in (ds.column_names or []):
            raise ValueError(f"{where} has no {role} {column!r}; columns: {ds.column_names}")
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        to_index: Callable[[Any], int] = int
    elif isinstance(ds, datasets.Dataset):
        values = sorted(ds.unique(label_column))
        if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
            classes, to_index = [str(v) for v in values], int
        else:
            classes = [str(v) for v in values]
            lookup = {v: i for i, v in enumerate(values)}
            to_index = lookup.__getitem__
    else:
        raise ValueError(f"{where}: a streamed label column must be a ClassLabel, got {feature}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # the original encoded bytes

    def items(start: int) -> Iterator[tuple[Any, int]]:
        part = ds.select(range(start, len(ds))) if isinstance(ds, datasets.Dataset) else ds.skip(start)
        for row in part:
            image = row[image_column]
            if isinstance(image, dict):
                image = image.get("bytes") or Path(image["path"]).read_bytes()
            yield image, to_index(row[label_column])

    length = len(ds) if isinstance(ds, datasets.Dataset) else None
    return _Source(items, length, classes, where)


def open_source(source: str, *, split: str = "train", image_column: str = "image",
                label_column: str = "label") -> _Source:
    """The images and labels of ``source`` (see the module docstring)."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(path))
            if split not in dd:
                raise ValueError(f"{source}: no split {split!r}; splits: {list(dd)}")
            return _hf_source(dd[split], image_column, label_column, f"{source} [{split}]")
        if (path / "state.json").is_file():
            return _hf_source(datasets.load_from_disk(str(path)), image_column, label_column, source)
        if any(path.glob("metadata.*")) or any(path.glob("*/metadata.*")):
            dd = datasets.load_dataset("imagefolder", data_dir=str(path))
            if split not in dd:
                raise ValueError(f"{source}: no split {split!r}; splits: {list(dd)}")
            return _hf_source(dd[split], image_column, label_column, f"imagefolder {source} [{split}]")
        if (path / split).is_dir() and any(p.is_dir() for p in (path / split).iterdir()):
            return _folder_source(path / split)
        return _folder_source(path)
    if path.exists():
        raise ValueError(f"{source} is a file; give a save_to_disk directory, an image folder or a Hub name")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        raise ValueError(f"{source!r} is not a local directory and the Hub is off (HF_HUB_OFFLINE)")
    import datasets

    ds = datasets.load_dataset(source, split=split, streaming=True)
    return _hf_source(ds, image_column, label_column, f"hub {source} [{split}]")


# --------------------------------------------------------------------------- encoding and tar writing


def encode_image(image: Any, image_format: str) -> tuple[bytes, str]:
    """``(bytes, extension)`` for a sample: the original bytes when their format is kept, else PNG/JPEG."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or ""
            if image_format == "keep" and fmt in _KEEP_FORMATS:
                return data, _KEEP_FORMATS[fmt]
            pil = probe.copy()
    else:
        pil = image
    buf = io.BytesIO()
    if image_format == "jpg":
        pil.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    pil.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _tar_size(*sizes: int) -> int:
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in sizes)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o444
    tar.addfile(member, io.BytesIO(data))


class _Stats:
    """Per-channel mean/std (RGB, [0, 1]) of the first ``limit`` images."""

    def __init__(self, limit: int) -> None:
        self.limit, self.n = limit, 0
        self.sum = np.zeros(3)
        self.sq = np.zeros(3)
        self.pixels = 0

    def add(self, data: bytes) -> None:
        if self.n >= self.limit:
            return
        self.n += 1
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        self.sum += arr.sum(0)
        self.sq += (arr * arr).sum(0)
        self.pixels += arr.shape[0]

    def result(self) -> dict[str, Any]:
        if not self.pixels:
            return {}
        mean = self.sum / self.pixels
        std = np.sqrt(np.maximum(self.sq / self.pixels - mean * mean, 0.0))
        return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
                "stats_samples": self.n}


# --------------------------------------------------------------------------- the conversion


def write_shards(
    source: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    max_count: int = 10000,
    max_size: int | str = 0,
    prefix: str = "shard",
    image_format: str = "keep",
    stats_samples: int = 1000,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Convert ``source`` into ``out_dir/<prefix>-000000.tar ...`` plus ``_info.json``; return the info.

    Args:
        source: a save_to_disk directory, an image folder, or a Hub name (see the module docstring).
        split: the split to convert (DatasetDicts, ``DIR/<split>/<class>`` folders, the Hub).
        image_column, label_column: HF dataset columns.
        max_count: samples per shard at most.
        max_size: bytes per shard at most (``"1G"``, ``"500M"``; 0: no limit); a single sample
            larger than this gets a shard of its own.
        prefix: shard file name prefix.
        image_format: ``keep`` (original JPEG/PNG/WebP bytes, else PNG), ``png`` or ``jpg`` (re-encoded).
        stats_samples: images decoded for ``mean``/``std`` in the index (0: none).
        on_shard: called with each finished shard's entry (progress reporting).

    The returned info has ``throughput`` (samples/s, MB/s) and ``resumed_at`` (samples that an
    earlier, interrupted run had already written). Re-running a finished conversion returns its info.
    """
    max_size = parse_size(max_size)
    if max_count < 1 or max_size < 0:
        raise ValueError(f"need max_count >= 1 and max_size >= 0, got {max_count}, {max_size}")
    if image_format not in ("keep", "png", "jpg"):
        raise ValueError(f"image_format must be keep, png or jpg, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(source), "split": split, "image_column": image_column, "label_column": label_column,
                "max_count": max_count, "max_size": max_size, "prefix": prefix, "image_format": image_format,
                "stats_samples": stats_samples}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if (out / INFO_NAME).is_file():
        info = json.loads((out / INFO_NAME).read_text())
        if info.get("fingerprint") == fingerprint:
            log.info("%s already holds this conversion", out)
            return {**info, "urls": str(out.resolve() / info["pattern"]), "resumed_at": info["num_samples"],
                    "throughput": None}
        raise ValueError(f"{out} holds another conversion ({INFO_NAME}); remove it or choose another --out")

    progress = {"fingerprint": fingerprint, "shards": [], "next": 0, "stats": None}
    if (out / PROGRESS_NAME).is_file():
        progress = json.loads((out / PROGRESS_NAME).read_text())
        if progress.get("fingerprint") != fingerprint:
            raise ValueError(f"{out} holds an unfinished conversion with other settings; remove it or choose another --out")
    for stale in out.glob("*.tar.tmp"):
        stale.unlink()  # a shard an interrupted run did not finish

    src = open_source(str(source), split=split, image_column=image_column, label_column=label_column)
    resumed_at = int(progress["next"])
    stats = _Stats(stats_samples)
    if progress.get("stats"):
        stats.n, stats.pixels = progress["stats"]["n"], progress["stats"]["pixels"]
        stats.sum, stats.sq = np.array(progress["stats"]["sum"]), np.array(progress["stats"]["sq"])
    t0 = time.perf_counter()
    written_bytes = written = 0
    index = resumed_at
    exts: set[str] = set(progress.get("exts") or [])
    tar: tarfile.TarFile | None = None
    current: dict[str, Any] = {}

    def close_shard() -> None:
        nonlocal tar, written_bytes
        assert tar is not None
        tar.close()
        tmp = out / (current["url"] + ".tmp")
        os.replace(tmp, out / current["url"])
        current["bytes"] = (out / current["url"]).stat().st_size
        written_bytes += current["bytes"]
        progress["shards"].append(dict(current))
        progress["next"] = index
        progress["exts"] = sorted(exts)
        progress["stats"] = {"n": stats.n, "pixels": stats.pixels, "sum": stats.sum.tolist(), "sq": stats.sq.tolist()}
        tmp_progress = out / (PROGRESS_NAME + ".tmp")
        tmp_progress.write_text(json.dumps(progress))
        os.replace(tmp_progress, out / PROGRESS_NAME)  # the shard counts as written only from here on
        tar = None
        if on_shard is not None:
            on_shard(dict(current))

    for image, label in src.items(resumed_at):
        data, ext = encode_image(image, image_format)
        cls = str(label).encode()
        size = _tar_size(len(data), len(cls))
        if tar is not None and (current["num_samples"] >= max_count
                                or (max_size and current["size"] + size + 2 * _TAR_BLOCK > max_size)):
            close_shard()
        if tar is None:
            name = f"{prefix}-{len(progress['shards']):06d}.tar"
            current = {"url": name, "num_samples": 0, "size": 0, "first": index}
            tar = tarfile.open(out / (name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        key = f"{index:09d}"
        _add(tar, f"{key}.{ext}", data)
        exts.add(ext)
        _add(tar, f"{key}.cls", cls)
        stats.add(data)
        current["num_samples"] += 1
        current["size"] += size
        index += 1
        written += 1
    if tar is not None:
        close_shard()
    elapsed = time.perf_counter() - t0
    shards = [{"url": s["url"], "num_samples": s["num_samples"], "bytes": s["bytes"]} for s in progress["shards"]]
    if not shards:
        raise ValueError(f"{src.description}: no samples to write")
    info = {
        "num_classes": len(src.classes),
        "classes": src.classes,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "pattern": f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar",
        "image_key": ";".join(sorted(progress.get("exts") or [])),
        "label_key": "cls",
        **stats.result(),
        "source": src.description,
        "fingerprint": fingerprint,
        "generator": "transferline data shards",
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    (out / PROGRESS_NAME).unlink()
    throughput = {"samples": written, "seconds": round(elapsed, 3),
                  "samples_per_s": round(written / elapsed, 1) if elapsed > 0 else None,
                  "mb_per_s": round(written_bytes / elapsed / 1e6, 2) if elapsed > 0 else None}
    return {**info, "urls": str(out.resolve() / info["pattern"]), "resumed_at": resumed_at, "throughput": throughput}
