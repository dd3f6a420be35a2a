"""Stage-two data: small labelled image sets through HF ``datasets``, k-shot subsets, loaders.

A target source is one of
- a ``save_to_disk`` directory (``dataset_dict.json`` at its top),
- an imagefolder directory (``train/<class>/*.png``, ``test/<class>/*.png``),
- a Hugging Face Hub name (``load_dataset(name)``; refused when offline).
The training split is sampled with a ``DistributedSampler`` across ranks; the test split is
cut into disjoint strided shards (no padding) so the caller can sum correct/total over ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset

from pipeline.data.transforms import build_transform, split_fixed_prefix
from pipeline.data.workers import worker_init

_TRUE = {"1", "on", "yes", "true"}


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _looks_like_path(source: str) -> bool:
    """Hub names are "name" or "owner/name"; a rooted, dotted or home-based string is a path, and
    so is "a/b" when the directory "a" exists here (a mistyped local target, not a hub name)."""
    if source.startswith(("/", "./", "../", "~")) or source in (".", ".."):
        return True
    parent = Path(source).parent
    return parent != Path(".") and parent.is_dir()


def _load_source(source: str, cache_dir: str | None):
    """The DatasetDict behind a source string (see the module docstring)."""
    import datasets

    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        if (path / "state.json").is_file():
            raise ValueError(
                f"target {source!r} is a saved single Dataset without splits; save a DatasetDict "
                f"(e.g. DatasetDict({{'train': ..., 'test': ...}}).save_to_disk(...)) instead"
            )
        if not any(p.is_dir() for p in path.iterdir()):
            raise ValueError(
                f"target {source!r} is neither a save_to_disk directory (no dataset_dict.json) nor an "
                f"imagefolder directory (no split/class subdirectories)"
            )
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised with the source named
            raise ValueError(f"target {source!r}: cannot read it as an imagefolder directory: {exc}") from exc
    if path.exists() or _looks_like_path(source):
        raise FileNotFoundError(f"target {source!r}: no such directory (a local target must be a directory)")
    if _offline():
        raise ValueError(
            f"target {source!r} is not a local directory and the Hub is off (HF_DATASETS_OFFLINE / "
            f"HF_HUB_OFFLINE is set); give a save_to_disk or imagefolder directory"
        )
    try:
        return datasets.load_dataset(source, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; name the source
        raise ValueError(f"target {source!r}: not a local directory, and loading it from the Hub failed: {exc}") from exc


def load_target(
    source: str,
    *,
    train_split: str = "train",
    test_split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
) -> tuple[Any, Any, list[str]]:
    """Load a target data set: ``(train_ds, test_ds, class_names)``.

    ``class_names`` come from the label column's ``ClassLabel`` feature when present. Otherwise
    they are the sorted unique labels of both splits, and the label column is cast to a
    ``ClassLabel`` with those names (so labels become indices ``0..n-1``; integer labels that
    already are ``0..n-1`` keep their values).

    Raises:
        FileNotFoundError: a path-like source that does not exist.
        ValueError: unreadable source, hub refused/failed, missing split or column (the messages
            name the source and the available splits/columns).
    """
    import datasets

    dd = _load_source(source, cache_dir)
    splits = list(dd.keys())
    for split in (train_split, test_split):
        if split not in dd:
            raise ValueError(f"target {source!r} has no split {split!r}; available splits: {splits}")
    train_ds, test_ds = dd[train_split], dd[test_split]
    for split, ds in ((train_split, train_ds), (test_split, test_ds)):
        for role, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in ds.column_names:
                folders = _class_folders(source, split)
                if role == "label_column" and folders is not None and len(folders) < 2:
                    raise ValueError(f"target {source!r} is an image folder with {len(folders)} class folder(s) "
                                     f"under {split}/ ({', '.join(folders) or 'none'}): a classifier needs at "
                                     "least two, one folder per class")
                raise ValueError(
                    f"target {source!r} split {split!r} has no {role} {column!r}; "
                    f"available columns: {ds.column_names}"
                )

    feature = train_ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return train_ds, test_ds, list(feature.names)

    values = sorted(set(train_ds[label_column]) | set(test_ds[label_column]))
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if values == list(range(len(values))):
            return train_ds, test_ds, [str(v) for v in values]
        # Sparse integer labels: via strings, so each value maps to its rank in `values`.
        train_ds = train_ds.cast_column(label_column, datasets.Value("string"))
        test_ds = test_ds.cast_column(label_column, datasets.Value("string"))
    names = [str(v) for v in values]
    label = datasets.ClassLabel(names=names)
    return train_ds.cast_column(label_column, label), test_ds.cast_column(label_column, label), names


def k_shot_indices(
    labels: Sequence[int], shots_per_class: int | None, seed: int, *, class_names: Sequence[str] | None = None
) -> list[int]:
    """Stratified, deterministic k-shot subset: ``shots_per_class`` indices of every class.

    ``shots_per_class`` 0 or None keeps every index. The result is sorted; equal inputs give equal
    outputs. A class with fewer than ``shots_per_class`` examples is an error naming it.
    """
    labels = np.asarray(labels)
    if not shots_per_class:
        return list(range(len(labels)))
    if shots_per_class < 0:
        raise ValueError(f"shots_per_class must be >= 0 or None, got {shots_per_class}")
    classes, counts = np.unique(labels, return_counts=True)
    short = [(c, n) for c, n in zip(classes.tolist(), counts.tolist()) if n < shots_per_class]
    if short:
        def name(c):
            return f"{class_names[c]!r} (label {c})" if class_names is not None else f"label {c}"
        detail = ", ".join(f"{name(c)} has {n}" for c, n in short)
        raise ValueError(f"{shots_per_class}-shot subset impossible: {detail}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=shots_per_class, replace=False) for c in classes]
    return sorted(int(i) for i in np.concatenate(chosen))


def _class_folders(source: str, split: str) -> list[str] | None:
    """Class folder names of an image folder's split (`SOURCE/SPLIT/<class>/`); None when `source`
    is not one (HF's imagefolder drops the label column when there is a single class folder)."""
    root = Path(source) / split
    if not root.is_dir() or (Path(source) / "dataset_dict.json").exists():
        return None
    return sorted(p.name for p in root.iterdir() if p.is_dir())


#: Bytes of decoded images (or transformed tensors) one data set keeps per process. Stage two
#: reads a small k-shot set for hundreds of epochs and the test set at every evaluation:
#: decoding and resizing each image again was most of its time (27 of 41 s for the demo's seed).
CACHE_BYTES = 256 * 2**20


class TorchImageDataset(Dataset):
    """Map-style torch view of an HF image data set: ``ds[i] -> (transform(image), int label)``.

    ``cache``: ``decoded`` keeps each image decoded and through the deterministic head of the
    transform (mode, resize, centre crop: `split_fixed_prefix`), so only the random rest (crop,
    flip, ...) runs every time; ``output`` keeps the transformed tensors (only for a deterministic
    transform: evaluation); both up to `CACHE_BYTES`. None reads and decodes every item.
    """

    def __init__(self, hf_ds, transform: Callable, image_column: str = "image", label_column: str = "label",
                 cache: str | None = None):
        missing = [c for c in (image_column, label_column) if c not in hf_ds.column_names]
        if missing:
            raise ValueError(f"data set has no column(s) {missing}; available columns: {hf_ds.column_names}")
        if cache not in (None, "decoded", "output"):
            raise ValueError(f"cache must be None, 'decoded' or 'output', got {cache!r}")
        # Only the two columns we use are read (and decoded) per item.
        self.ds = hf_ds.select_columns([image_column, label_column])
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.cache, self._kept, self._kept_bytes = cache, {}, 0
        # The fixed head of a training transform was most of stage two's loader time (resizing
        # 8 px digits to 32 for every draw); kept once per image, the output is bit-identical.
        self._fixed, self._rest = split_fixed_prefix(transform) if cache == "decoded" else (None, transform)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if index in self._kept:
            item, label = self._kept[index]
            return (item, label) if self.cache == "output" else (self._rest(item), label)
        row = self.ds[index]
        image, label = row[self.image_column], int(row[self.label_column])
        if self._fixed is not None:
            image = self._fixed(image)
        out = self._rest(image)
        if self.cache is not None:
            kept = out if self.cache == "output" else image
            size = kept.nbytes if isinstance(kept, torch.Tensor) else _image_bytes(kept)
            if self._kept_bytes + size <= CACHE_BYTES:
                self._kept[index] = (kept, label)
                self._kept_bytes += size
        return out, label

    @property
    def labels(self) -> list[int]:
        return [int(v) for v in self.ds[self.label_column]]


def _image_bytes(image: Any) -> int:
    width, height = getattr(image, "size", (0, 0))
    return int(width * height * len(getattr(image, "getbands", lambda: "RGB")()))


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: disjoint, complete, never padded.

    Unlike ``DistributedSampler`` it adds no duplicate samples, so per-rank correct/total counts
    summed over ranks are exact (ranks may get one batch more or less: evaluation has no
    collective inside its loop, only the final sum).
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_target_loaders(
    train_ds,
    test_ds,
    *,
    transform_train: Callable,
    transform_eval: Callable,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shots_per_class: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    eval_batch_size: int | None = None,
    mp_context: str | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    equal_batches: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders for one rank.

    The training set is the k-shot subset (``shots_per_class``, chosen with ``seed``, identical
    on every rank) of ``train_ds``. With ``world_size > 1`` it is sampled by
    ``DistributedSampler(num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
    drop_last=False)``: call ``set_loader_epoch(loader, epoch)`` before each epoch (it is a no-op
    for the single-process ``RandomSampler``, whose seeded generator already reshuffles every
    epoch). The test set is split with `ShardedEvalSampler`. ``drop_last`` drops the last
    incomplete *batch* of the train loader (for BatchNorm models and batches of one);
    ``equal_batches`` does so only when a rank has more than one batch of images (so a small set
    trains in full batches and a larger one never takes a step on a ragged remainder).
    Worker processes persist across epochs and their random augmentations are seeded from ``seed``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size>=1 and num_workers>=0; got {batch_size}, {num_workers}")
    train_set = TorchImageDataset(train_ds, transform_train, image_column, label_column, cache="decoded")
    class_names = getattr(train_ds.features[label_column], "names", None)
    indices = k_shot_indices(train_set.labels, shots_per_class, seed, class_names=class_names)
    if len(indices) < len(train_set):
        train_set = Subset(train_set, indices)
    test_set = TorchImageDataset(test_ds, transform_eval, image_column, label_column, cache="output")

    generator = torch.Generator().manual_seed(seed)
    if world_size > 1:
        train_sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
    else:
        train_sampler = RandomSampler(train_set, generator=generator)
    common = dict(
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,  # small sets, many epochs: don't respawn workers
        multiprocessing_context=mp_context if num_workers > 0 else None,
        worker_init_fn=worker_init(mp_context) if num_workers > 0 else None,
    )
    per_rank = len(train_sampler) if world_size > 1 else len(train_set)
    drop_last = drop_last or (equal_batches and per_rank > batch_size)
    train_loader = DataLoader(
        train_set, batch_size=batch_size, sampler=train_sampler, drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed + 1), **common,
    )
    # Its own generator: a loader without one draws its base seed from torch's global generator on
    # every pass, so how often stage two evaluated changed the augmentations it trained with.
    test_loader = DataLoader(
        test_set, batch_size=eval_batch_size or batch_size,
        sampler=ShardedEvalSampler(len(test_set), rank, world_size),
        generator=torch.Generator().manual_seed(seed), **common,
    )
    return train_loader, test_loader


def seed_shots(hf_ds, shots_per_class: int | None, seed: int, *, label_column: str = "label",
               class_names: Sequence[str] | None = None) -> list[int]:
    """The k-shot training indices of one seed (`k_shot_indices` over the split's labels): the
    images that seed fine-tunes on, its normalisation statistics and its cross-validation see."""
    return k_shot_indices([int(v) for v in hf_ds[label_column]], shots_per_class, seed, class_names=class_names)


def channel_stats(hf_ds, indices: Sequence[int], *, in_chans: int, img_size: int,
                  image_column: str = "image") -> tuple[list[float], list[float]]:
    """Per-channel mean and std, in [0, 1] units, of the images at ``indices`` as a model sees them
    (the evaluation pipeline: mode converted to ``in_chans``, resized, no augmentation)."""
    identity = build_transform(img_size, in_chans, train=False, mean=[0.0], std=[1.0])  # no normalisation
    images = hf_ds.select_columns([image_column]).select(list(indices))
    x = torch.stack([identity(row[image_column]) for row in images])
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)  # a constant channel must not divide by zero
    return x.mean(dim=(0, 2, 3)).tolist(), std.tolist()


def native_size(hf_ds, *, image_column: str = "image", sample: int = 64) -> int:
    """The split's own resolution: the median short side of up to ``sample`` evenly spaced images
    (PIL reads only each image's header for its size)."""
    n = len(hf_ds)
    if n == 0:
        raise ValueError("native_size: the split is empty")
    m = min(n, sample)
    picks = sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)})
    images = hf_ds.select_columns([image_column]).select(picks)
    sides = sorted(min(row[image_column].size) for row in images)
    return int(sides[len(sides) // 2])


def fine_tune_size(native: int, checkpoint: int) -> int:
    """`finetune.data.img_size: 0`: the target's own resolution, kept between the checkpoint's
    (smaller images are upsampled to the scale the backbone's filters learned) and twice it (a
    convolutional backbone runs at any size, but the cost grows with its square, and pretraining
    at one size transfers to a moderately larger one; FixRes, Touvron et al. 2019)."""
    return min(max(native, checkpoint), 2 * checkpoint)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a loader's sampler which epoch starts (reshuffles a DistributedSampler)."""
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
