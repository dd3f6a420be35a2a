"""scripts/bench_targets.py: every benchmark target builds offline from package-shipped photographs,
loads through transferline's own loader, is balanced, and keeps test regions disjoint from training."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_targets as bt  # noqa: E402

from pipeline.data.target import k_shot_indices, load_target  # noqa: E402

TINY = {"train_per_class": 4, "test_per_class": 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_targets")
    out = {}
    for name, spec in bt.TARGETS.items():
        changes = {} if isinstance(spec, bt.DigitsTarget) else TINY
        out[name] = bt.build_target(name, root / name, seed=0, **changes)
    return out


@pytest.mark.parametrize("name", sorted(bt.TARGETS))
def test_target_loads_balanced_and_sized(built, name):
    spec = bt.TARGETS[name]
    train, test, names = load_target(str(built[name]))
    assert names == list(spec.classes)
    assert 2 <= len(names) <= 15
    for ds, per_class in ((train, TINY["train_per_class"]), (test, TINY["test_per_class"])):
        counts = np.bincount(ds["label"], minlength=len(names))
        if isinstance(spec, bt.DigitsTarget):  # a stratified split of the UCI scans: nearly balanced
            assert counts.min() >= 10 and counts.max() - counts.min() <= 6
        else:
            assert counts.tolist() == [per_class] * len(names)
        for img in ds.select(range(min(len(ds), 5)))["image"]:
            assert img.size == (spec.img_size, spec.img_size)
            assert img.mode == spec.mode


@pytest.mark.parametrize("name", [n for n, s in bt.TARGETS.items() if not isinstance(s, bt.DigitsTarget)])
def test_test_split_disjoint_from_train(built, name):
    train, test, _ = load_target(str(built[name]))
    train_boxes: dict[str, list[list[int]]] = {}
    for source, box in zip(train["source"], train["box"]):
        train_boxes.setdefault(source, []).append(box)
    for source, box in zip(test["source"], test["box"]):
        for other in train_boxes.get(source, []):
            assert not bt.boxes_overlap(box, other), f"{name}: test crop {box} of {source} overlaps train {other}"
    arrays = bt.target_arrays(built[name])
    train_px = {x.tobytes() for x in arrays["x_train"]}
    assert not any(x.tobytes() in train_px for x in arrays["x_test"]), f"{name}: a test image is in train"
    assert arrays["x_train"].shape[-1] == bt.in_chans(name)


def test_blocks_partition_the_photo():
    rng = np.random.default_rng(0)
    train, test = bt.split_blocks(191, 384, 64, rng)  # the smallest photograph used (the page scan)
    assert train and test
    blocks = train + test
    assert sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in blocks) == 191 * 384
    for i, a in enumerate(blocks):
        assert a[2] - a[0] >= 64 and a[3] - a[1] >= 64
        assert not any(bt.boxes_overlap(a, b) for b in blocks[i + 1:])


def test_deterministic_by_seed(tmp_path):
    a = bt.build_target("surfaces", tmp_path / "a", seed=0, **TINY)
    b = bt.build_target("surfaces", tmp_path / "b", seed=0, **TINY)
    c = bt.build_target("surfaces", tmp_path / "c", seed=1, **TINY)
    src = [load_target(str(p))[0]["box"] for p in (a, b, c)]
    assert src[0] == src[1] and src[0] != src[2]


def test_full_size_specs_allow_ten_shots():
    """The benchmark's largest k (10) fits every full-size target's smallest training class."""
    for name, spec in bt.TARGETS.items():
        if not isinstance(spec, bt.DigitsTarget):
            assert spec.train_per_class >= 10 and spec.test_per_class >= 10, name
    labels = np.repeat(np.arange(3), 10)
    assert len(k_shot_indices(labels, 10, seed=0)) == 30
