"""Small real-image targets for `scripts/bench_transfer.py`, built offline from photographs and scans
that ship inside installed packages (no download, nothing synthetic).

Each target is saved as an HF ``datasets.DatasetDict({"train", "test"})`` with ``save_to_disk``:
an ``image`` column (PIL images), a ``label`` ``ClassLabel`` column, and two provenance columns,
``source`` (which photograph) and ``box`` (``[y0, x0, y1, x1]`` of the crop in that photograph's
pixels), so anyone can check that no test image shares a pixel with a training image.
transferline loads it with ``finetune.data.source=<dir>`` (it reads only ``image`` and ``label``).

| target     | what                                                   | classes | size | mode |
|------------|--------------------------------------------------------|---------|------|------|
| `digits`   | UCI handwritten digits, 8x8 scans (`transferline data digits`) | 10 | 8  | L   |
| `textures` | which surface: patches of brick, grass, gravel (photos), a star field (Hubble deep field), printed text and chalk handwriting (photos of a page and a blackboard) | 6 | 40 | L |
| `scenes`   | which photograph: patches of 9 colour photographs (astronaut, coffee, cat, rocket, motorcycle, tissue scan, China palace, flower, Grace Hopper) | 9 | 32 | RGB |
| `surfaces` | which photograph, in grey: patches of a camera operator, the Moon, coins, a clock, a retina scan and a cell micrograph | 6 | 48 | L |

scikit-image's LFW subset (faces / not faces, 25 px) is left out on purpose: a held-out target
of the issue this bench serves is of that shape, and a suite tuned on it would not be held out.

Patches: every photograph is cut into a grid of disjoint blocks; a seeded share of the blocks
(a third, at least one) is the test region, the rest the training region, and each patch lies
inside one block, so test patches come from regions training never saw (not near-duplicates).
Nearly flat patches (pixel std < 6/255: sky, black backgrounds) are redrawn. Everything is
deterministic given ``seed``.

Sources: scikit-image's bundled ``skimage.data`` images (in the wheel, no pooch download),
scikit-learn's ``load_sample_image`` (china, flower), matplotlib's sample data (grace_hopper).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BUILD_VERSION = 2  # bump when a builder changes what it writes: cached targets are rebuilt


# ---------------------------------------------------------------------------------------------
# Photographs and scans shipped with packages
# ---------------------------------------------------------------------------------------------

def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()
    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        with cbook.get_sample_data(name) as f:  # the file object in matplotlib's mpl-data
            return np.asarray(Image.open(f).convert("RGB"))
    return load


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    # textures (used in grey)
    "brick": _skimage("brick"), "grass": _skimage("grass"), "gravel": _skimage("gravel"),
    "stars": _skimage("hubble_deep_field"), "print": _skimage("page"), "chalk": _skimage("text"),
    # scenes (colour)
    "astronaut": _skimage("astronaut"), "coffee": _skimage("coffee"), "cat": _skimage("chelsea"),
    "rocket": _skimage("rocket"), "motorcycle": _skimage("motorcycle"),
    "tissue": _skimage("immunohistochemistry"), "palace": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"), "hopper": _matplotlib("grace_hopper.jpg"),
    # surfaces (grey)
    "camera": _skimage("camera"), "moon": _skimage("moon"), "coins": _skimage("coins"),
    "clock": _skimage("clock"), "retina": _skimage("retina"), "cell": _skimage("cell"),
}


def load_photo(name: str, mode: str) -> np.ndarray:
    """A shipped photograph as uint8 ``[H, W]`` (mode "L") or ``[H, W, 3]`` (mode "RGB")."""
    arr = np.asarray(PHOTOS[name]())
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return np.asarray(img.convert(mode))


# ---------------------------------------------------------------------------------------------
# Target specifications
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchTarget:
    """Which-photograph classification of patches: one class per photograph."""
    classes: tuple[str, ...]
    mode: str            # "L" or "RGB"
    img_size: int        # output size (px)
    crop: int            # patch size in the photograph's pixels (resized to img_size)
    train_per_class: int = 60
    test_per_class: int = 30
    kind: str = field(default="patches", init=False)


@dataclass(frozen=True)
class DigitsTarget:
    """The demo's UCI digits, built by transferline itself (`transferline data digits`)."""
    img_size: int = 8
    mode: str = "L"
    classes: tuple[str, ...] = tuple(str(i) for i in range(10))
    kind: str = field(default="digits", init=False)


TARGETS: dict[str, PatchTarget | DigitsTarget] = {
    "digits": DigitsTarget(),
    "textures": PatchTarget(classes=("brick", "grass", "gravel", "stars", "print", "chalk"),
                            mode="L", img_size=40, crop=64),
    "scenes": PatchTarget(classes=("astronaut", "coffee", "cat", "rocket", "motorcycle", "tissue",
                                   "palace", "flower", "hopper"), mode="RGB", img_size=32, crop=64),
    "surfaces": PatchTarget(classes=("camera", "moon", "coins", "clock", "retina", "cell"),
                            mode="L", img_size=48, crop=80, train_per_class=50, test_per_class=25),
}


def in_chans(name: str) -> int:
    """Input channels transferline should fine-tune this target with."""
    return 3 if TARGETS[name].mode == "RGB" else 1


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

def split_blocks(height: int, width: int, crop: int, rng: np.random.Generator,
                 test_share: float = 1 / 3) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """Cut ``height x width`` into a grid of disjoint blocks at least ``crop`` px (1.4x where room
    allows) on a side, at most 4 x 5; return ``(train_blocks, test_blocks)`` as ``(y0, x0, y1, x1)``."""
    rows = max(1, min(4, height // int(1.4 * crop)))
    cols = max(1, min(5, width // int(1.4 * crop)))
    if rows * cols < 2:
        rows, cols = (2, 1) if height >= 2 * crop else (1, 2)
    if height // rows < crop or width // cols < crop:
        raise ValueError(f"a {height}x{width} photograph is too small for two {crop}-px blocks")
    ys = np.linspace(0, height, rows + 1).astype(int)
    xs = np.linspace(0, width, cols + 1).astype(int)
    blocks = [(int(ys[r]), int(xs[c]), int(ys[r + 1]), int(xs[c + 1])) for r in range(rows) for c in range(cols)]
    order = rng.permutation(len(blocks))
    n_test = max(1, int(round(len(blocks) * test_share)))
    test = [blocks[i] for i in sorted(order[:n_test])]
    train = [blocks[i] for i in sorted(order[n_test:])]
    return train, test


def sample_patches(photo: np.ndarray, blocks: list[tuple[int, int, int, int]], count: int, crop: int,
                   rng: np.random.Generator, min_std: float = 6.0, tries: int = 50) -> list[tuple[int, int, int, int]]:
    """``count`` crop boxes, each inside one of ``blocks`` (blocks drawn in turn, positions at random);
    a box whose pixels are nearly flat (std < ``min_std``) is redrawn up to ``tries`` times."""
    boxes = []
    for i in range(count):
        y0b, x0b, y1b, x1b = blocks[i % len(blocks)] if i < len(blocks) else blocks[int(rng.integers(len(blocks)))]
        for _ in range(tries):
            y = int(rng.integers(y0b, y1b - crop + 1))
            x = int(rng.integers(x0b, x1b - crop + 1))
            if photo[y:y + crop, x:x + crop].std() >= min_std:
                break
        boxes.append((y, x, y + crop, x + crop))
    return boxes


def _features(classes: tuple[str, ...]):
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(classes)),
        "source": datasets.Value("string"),
        "box": datasets.Sequence(datasets.Value("int32"), length=4),
    })


def _dataset_dict(rows: dict[str, list[dict]], classes: tuple[str, ...]):
    import datasets

    features = _features(classes)
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({k: [r[k] for r in split_rows] for k in features}, features=features)
        for split, split_rows in rows.items()
    })


def build_patch_target(spec: PatchTarget, seed: int = 0):
    """DatasetDict of which-photograph patches (see the module docstring)."""
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for label, name in enumerate(spec.classes):
        photo = load_photo(name, spec.mode)
        # One generator per (seed, class): adding a class leaves the others' patches unchanged.
        rng = np.random.default_rng([seed, label, BUILD_VERSION])
        train_blocks, test_blocks = split_blocks(photo.shape[0], photo.shape[1], spec.crop, rng)
        for split, blocks, count in (("train", train_blocks, spec.train_per_class),
                                     ("test", test_blocks, spec.test_per_class)):
            for box in sample_patches(photo, blocks, count, spec.crop, rng):
                y0, x0, y1, x1 = box
                img = Image.fromarray(photo[y0:y1, x0:x1])
                if spec.img_size != spec.crop:
                    img = img.resize((spec.img_size, spec.img_size), Image.Resampling.LANCZOS)
                rows[split].append({"image": img, "label": label, "source": name, "box": list(box)})
    return _dataset_dict(rows, spec.classes)


def build_target(name: str, out_dir: str | os.PathLike, *, seed: int = 0, **changes) -> Path:
    """Build target ``name`` (``changes`` override its spec, e.g. ``train_per_class=4`` for a
    tiny test build) into ``out_dir`` with ``save_to_disk``; returns the directory.

    ``out_dir`` is written through a temporary sibling and renamed, so a build that dies
    leaves no half-written target behind."""
    import datasets

    datasets.disable_progress_bars()  # one "Saving the dataset" bar per split otherwise
    spec = TARGETS[name]
    if changes:
        import dataclasses

        spec = dataclasses.replace(spec, **changes)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(spec, DigitsTarget):
        from pipeline.data.embedded import make_digits_dataset

        make_digits_dataset(tmp, seed=seed)
    else:
        build_patch_target(spec, seed).save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _stamp(name: str, seed: int) -> dict:
    return {"target": name, "seed": seed, "version": BUILD_VERSION, "spec": asdict(TARGETS[name])}


def ensure_target(name: str, root: str | os.PathLike, *, seed: int = 0) -> tuple[Path, bool]:
    """``root/name`` built once per (spec, seed, builder version); ``(path, built_now)``.

    The stamp ``root/name.json`` records what was built; a stale or missing one rebuilds."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out, stamp = root / name, root / f"{name}.json"
    want = _stamp(name, seed)
    if (out / "dataset_dict.json").is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == json.loads(json.dumps(want)):
                return out, False
        except ValueError:
            pass
    build_target(name, out, seed=seed)
    stamp.write_text(json.dumps(want, indent=1))
    return out, True


# ---------------------------------------------------------------------------------------------
# Arrays for the in-process baselines (logistic regression, the yardstick CNN)
# ---------------------------------------------------------------------------------------------

def target_arrays(path: str | os.PathLike) -> dict:
    """A target's splits as uint8 arrays ``[N, H, W, C]`` (C = 1 or 3, as stored) and int labels,
    through transferline's own loader (`pipeline.data.target.load_target`)."""
    from pipeline.data.target import load_target

    train, test, names = load_target(str(path))

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        ds = ds.select_columns(["image", "label"])
        imgs = [np.asarray(im) for im in ds["image"]]
        x = np.stack([im[..., None] if im.ndim == 2 else im[..., :3] for im in imgs]).astype(np.uint8)
        return x, np.asarray(ds["label"], dtype=np.int64)

    x_train, y_train = arrays(train)
    x_test, y_test = arrays(test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "classes": names}


def boxes_overlap(a: list[int], b: list[int]) -> bool:
    """Do two ``[y0, x0, y1, x1]`` boxes share a pixel?"""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


if __name__ == "__main__":  # build every target under a folder: python scripts/bench_targets.py DIR
    import sys

    root = sys.argv[1] if len(sys.argv) > 1 else "runs/bench_transfer/targets"
    for target in TARGETS:
        path, built = ensure_target(target, root)
        print(f"{target}: {path} ({'built' if built else 'cached'})")
