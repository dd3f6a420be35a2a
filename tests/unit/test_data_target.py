"""Stage-two target data: sources, class names, k-shot subsets, sharded loaders, errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.embedded import make_digits_dataset
from pipeline.data.target import (
    fine_tune_size,
    native_size,
    ShardedEvalSampler,
    TorchImageDataset,
    build_target_loaders,
    k_shot_indices,
    load_target,
    set_loader_epoch,
)
from pipeline.data.transforms import build_transform


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("target") / "digits"
    make_digits_dataset(out, test_size=0.3, seed=0)
    return str(out)


def _tf(train: bool, in_chans: int = 1, size: int = 16):
    return build_transform(size, in_chans, train=train, mean=[0.5], std=[0.5])


def test_digits_round_trip(digits_dir):
    train, test, names = load_target(digits_dir)
    assert names == [str(i) for i in range(10)]
    assert (len(train), len(test)) == (1257, 540)  # 1797 digits, 30 % stratified test split
    assert set(Counter(test["label"]).values()) <= {52, 53, 54, 55}  # stratified: ~54 per class
    image = train[0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    assert max(image.getextrema()) <= 255
    x, y = TorchImageDataset(train, _tf(False))[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    x3, _ = TorchImageDataset(train, _tf(True, in_chans=3, size=32))[0]
    assert x3.shape == (3, 32, 32)


@pytest.mark.parametrize("crop, hflip", [("pad", 0.0), ("pad", 0.5), ("resized", 0.5)])
def test_kept_training_images_skip_only_the_fixed_steps(digits_dir, crop, hflip):
    """The training set keeps each image after its deterministic steps (mode, resize, centre crop)
    and redraws the random ones every time: the same tensors, draw for draw, as the whole transform."""
    from pipeline.data.transforms import split_fixed_prefix

    train, _, _ = load_target(digits_dir)
    tf = build_transform(32, 1, train=True, mean=[0.5], std=[0.5], crop=crop, hflip=hflip)
    fixed, _ = split_fixed_prefix(tf)
    if crop == "pad":  # resize + centre crop, then the random shift: the resize is kept
        assert [type(t).__name__ for t in fixed.transforms] == ["Grayscale", "ToImage", "Resize", "CenterCrop"]
    else:  # a random resized crop resizes after its draw: only the mode conversion is fixed
        assert [type(t).__name__ for t in fixed.transforms] == ["Grayscale", "ToImage"]
    kept = TorchImageDataset(train, tf, cache="decoded")
    for _ in range(3):  # first read fills the cache, later reads hit it
        torch.manual_seed(0)
        got = [kept[i][0] for i in range(6)]
        torch.manual_seed(0)
        want = [tf(train[i]["image"]) for i in range(6)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert kept._kept[0][0].shape[-1] == (32 if crop == "pad" else 8)
    assert split_fixed_prefix(lambda x: x)[0] is None  # not a Compose: nothing split off


def test_digits_split_is_fixed_by_seed(digits_dir, tmp_path):
    again = make_digits_dataset(tmp_path / "again", seed=0)
    train, _, _ = load_target(digits_dir)
    assert list(again["train"]["label"]) == list(train["label"])
    other = make_digits_dataset(tmp_path / "other", seed=1)
    assert list(other["train"]["label"]) != list(train["label"])


def test_imagefolder_directory(tmp_path):
    root = tmp_path / "folder"
    for split, per_class in (("train", 3), ("test", 2)):
        for c, name in enumerate(("cat", "dog", "emu")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                img = np.full((6, 6, 3), 40 * c + i, np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    train, test, names = load_target(str(root), cache_dir=str(tmp_path / "cache"))
    assert names == ["cat", "dog", "emu"]
    assert (len(train), len(test)) == (9, 6)
    assert sorted(Counter(train["label"]).items()) == [(0, 3), (1, 3), (2, 3)]
    x, y = TorchImageDataset(test, _tf(False, in_chans=3, size=8))[0]
    assert x.shape == (3, 8, 8) and 0 <= y < 3


def _save(tmp_path: Path, labels_train, labels_test, name: str) -> str:
    def split(labels):
        imgs = [Image.fromarray(np.zeros((4, 4), np.uint8)) for _ in labels]
        return datasets.Dataset.from_dict({"image": imgs, "label": list(labels)},
                                          features=None).cast_column("image", datasets.Image())
    out = tmp_path / name
    datasets.DatasetDict({"train": split(labels_train), "test": split(labels_test)}).save_to_disk(str(out))
    return str(out)


def test_class_names_without_classlabel(tmp_path):
    train, test, names = load_target(_save(tmp_path, ["b", "a", "c", "a"], ["c", "a"], "strings"))
    assert names == ["a", "b", "c"]
    assert list(train["label"]) == [1, 0, 2, 0] and list(test["label"]) == [2, 0]

    train, _, names = load_target(_save(tmp_path, [9, 3, 7], [3], "sparse"))
    assert names == ["3", "7", "9"]
    assert list(train["label"]) == [2, 0, 1]

    train, _, names = load_target(_save(tmp_path, [1, 0, 2], [0], "dense"))
    assert names == ["0", "1", "2"] and list(train["label"]) == [1, 0, 2]


def test_k_shot_exact_stratified_deterministic():
    labels = np.repeat(np.arange(4), [6, 9, 5, 7])
    idx = k_shot_indices(labels, 5, seed=3)
    assert len(idx) == 20 and len(set(idx)) == 20
    assert Counter(labels[idx].tolist()) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert idx == k_shot_indices(labels, 5, seed=3)
    assert idx != k_shot_indices(labels, 5, seed=4)
    assert k_shot_indices(labels, 0, seed=3) == list(range(len(labels)))
    assert k_shot_indices(labels, None, seed=3) == list(range(len(labels)))


def test_k_shot_names_short_classes():
    labels = [0] * 6 + [1] * 2 + [2] * 3
    with pytest.raises(ValueError, match=r"'bee' \(label 1\) has 2, 'cow' \(label 2\) has 3"):
        k_shot_indices(labels, 4, seed=0, class_names=["ant", "bee", "cow"])


def test_distributed_train_shards_are_disjoint(digits_dir):
    train, test, _ = load_target(digits_dir)
    seen, evaluated = [], []
    for rank in range(2):
        train_loader, test_loader = build_target_loaders(
            train, test, transform_train=_tf(True), transform_eval=_tf(False), batch_size=8, num_workers=0,
            rank=rank, world_size=2, seed=0, shots_per_class=5,
        )
        set_loader_epoch(train_loader, 0)
        subset = train_loader.dataset
        seen.append({subset.indices[i] for i in train_loader.sampler})
        evaluated.append(list(test_loader.sampler))
        images, labels = next(iter(train_loader))
        assert images.shape == (8, 1, 16, 16) and labels.dtype == torch.int64
    assert len(seen[0]) == len(seen[1]) == 25  # 10 classes x 5 shots over 2 ranks
    assert not seen[0] & seen[1]
    assert not set(evaluated[0]) & set(evaluated[1])
    assert sorted(evaluated[0] + evaluated[1]) == list(range(len(test)))  # complete, never padded


def test_single_process_loader_reshuffles_and_is_deterministic(digits_dir):
    train, test, _ = load_target(digits_dir)

    def orders(seed):
        loader, _ = build_target_loaders(train, test, transform_train=_tf(True), transform_eval=_tf(False),
                                         batch_size=4, num_workers=0, seed=seed, shots_per_class=2)
        return [list(loader.sampler) for _ in range(2)]

    first, second = orders(1)
    assert sorted(first) == list(range(20)) and first != second
    assert orders(1) == [first, second]


def test_evaluating_draws_nothing_from_the_training_random_stream(digits_dir):
    """Augmentations draw from torch's global generator; a pass over the test loader must not, or
    `finetune.eval_every` would change what stage two trains on (it did: 81.4% -> 79.3% scratch on
    the demo when evaluations went from every 20 steps to every 40)."""
    train, test, _ = load_target(digits_dir)
    _, test_loader = build_target_loaders(train, test.select(range(10)), transform_train=_tf(True),
                                          transform_eval=_tf(False), batch_size=4, num_workers=0, seed=0,
                                          shots_per_class=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(2):
        list(test_loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_sharded_eval_sampler_uneven():
    parts = [list(ShardedEvalSampler(7, r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardedEvalSampler(7, r, 3)) for r in range(3)] == [3, 2, 2]


def test_missing_split_and_column_are_named(digits_dir):
    with pytest.raises(ValueError, match=r"no split 'validation'; available splits: \['train', 'test'\]"):
        load_target(digits_dir, test_split="validation")
    with pytest.raises(ValueError, match=r"no label_column 'fine_label'; available columns: \['image', 'label'\]"):
        load_target(digits_dir, label_column="fine_label")
    with pytest.raises(ValueError, match=r"no image_column 'img'"):
        load_target(digits_dir, image_column="img")


def test_bad_sources_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_target(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'someone/some-set' is not a local directory and the Hub is off"):
        load_target("someone/some-set")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"label": [0, 1]}).save_to_disk(str(single))
    with pytest.raises(ValueError, match="single Dataset without splits"):
        load_target(str(single))


def test_fine_tuning_resolution_follows_the_target_within_the_checkpoints_scale():
    """img_size 0: the target's own size (median short side), raised to the checkpoint's and
    capped at twice it; what fine-tuning and assess see."""
    def split(sizes):
        return datasets.Dataset.from_dict({"image": [Image.new("L", s, 128) for s in sizes], "label": [0] * len(sizes)})

    assert native_size(split([(40, 40)] * 5)) == 40
    assert native_size(split([(20, 30), (48, 64), (50, 48), (100, 90), (48, 48)])) == 48  # short sides' median
    assert native_size(split([(8, 8)] * 200), sample=16) == 8
    with pytest.raises(ValueError, match="empty"):
        native_size(split([]))
    assert [fine_tune_size(n, 32) for n in (8, 32, 40, 48, 64, 500)] == [32, 32, 40, 48, 64, 64]


def test_stage_two_datasets_decode_and_transform_each_image_once(digits_dir, monkeypatch):
    """The test set is transformed once for all evaluations; the k-shot set is decoded once
    and augmented every time; both within the byte budget, giving the same values as no cache."""
    import pipeline.data.target as target

    train, test, _ = load_target(digits_dir)
    calls: list[int] = []

    def counting(tf):
        def run(image):
            calls.append(id(image))
            return tf(image)
        return run

    plain = TorchImageDataset(test, _tf(False))
    cached = TorchImageDataset(test, counting(_tf(False)), cache="output")
    first = [cached[i][0] for i in range(5)]
    again = [cached[i][0] for i in range(5)]
    assert len(calls) == 5 and all(torch.equal(a, b) and torch.equal(a, plain[i][0])
                                   for i, (a, b) in enumerate(zip(first, again)))
    calls.clear()
    decoded = TorchImageDataset(train, counting(_tf(True)), cache="decoded")
    decoded[3], decoded[3]
    assert len(calls) == 2 and calls[0] == calls[1]  # augmented twice, from the same decoded image
    monkeypatch.setattr(target, "CACHE_BYTES", 0)
    calls.clear()
    none_kept = TorchImageDataset(test, counting(_tf(False)), cache="output")
    none_kept[0], none_kept[0]
    assert len(calls) == 2


def test_jitter_changes_brightness_in_training_only():
    """`finetune.data.jitter`: a training image's brightness varies from draw to draw (a uniform
    image, so the random shifts of `crop: pad` change nothing); evaluation never jitters."""
    from PIL import Image

    grey = Image.new("L", (16, 16), 120)
    kw = dict(mean=[0.5], std=[0.25], augment=True, hflip=0.0, crop="pad")
    torch.manual_seed(0)
    means = {round(float(build_transform(16, 1, train=True, jitter=0.4, **kw)(grey).mean()), 4) for _ in range(8)}
    assert len(means) > 1
    assert {round(float(build_transform(16, 1, train=True, **kw)(grey).mean()), 4) for _ in range(8)} == {-0.1176}
    evaluate = build_transform(16, 1, train=False, jitter=0.4, **kw)
    assert torch.equal(evaluate(grey), build_transform(16, 1, train=False, mean=[0.5], std=[0.25])(grey))
