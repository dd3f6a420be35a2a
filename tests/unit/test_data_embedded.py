"""Embedded default data: fractal shards (IFS sampling, rendering, determinism) and digits."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.embedded import (
    DEFAULT_BACKGROUND,
    chaos_game,
    colourise,
    ensure_embedded_data,
    make_digits_dataset,
    make_fractal_shards,
    noise_background,
    sample_ifs,
    sigma_band,
    sigma_factor,
    singular_values,
)
from pipeline.data.shards import build_shard_loader
from pipeline.data.transforms import build_transform

TINY = dict(num_classes=6, per_class=10, img_size=16, samples_per_shard=16)


@pytest.fixture(scope="module")
def fractals(tmp_path_factory) -> dict:
    return make_fractal_shards(tmp_path_factory.mktemp("fr") / "a", seed=0, **TINY)


def _members(path: str | Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def _read(path: str | Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _digests(root: str | Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir())}


def test_singular_values_closed_form_matches_svd():
    params = np.random.default_rng(0).uniform(-1, 1, size=(50, 3, 6))
    s1, s2 = singular_values(params)
    ref = np.linalg.svd(params[..., :4].reshape(50, 3, 2, 2), compute_uv=False)
    np.testing.assert_allclose(np.stack([s1, s2], -1), ref, atol=1e-7)


@pytest.mark.parametrize("num_maps", [2, 3, 4])
def test_sampled_ifs_is_contractive_and_in_the_sigma_band(num_maps):
    params = sample_ifs(np.random.default_rng(num_maps), num_maps)
    assert params.shape == (num_maps, 6) and np.abs(params).max() <= 1
    lo, hi = sigma_band(num_maps)
    assert lo <= sigma_factor(params) <= hi
    assert (singular_values(params)[0] < 1).all()


def test_chaos_game_counts_every_point_inside_the_box():
    rng = np.random.default_rng(0)
    params = np.stack([sample_ifs(rng, 3) for _ in range(4)])
    counts, colour = chaos_game(params, rng, 24, points=640, chains=64)
    assert counts.shape == colour.shape == (4, 24, 24)
    assert (counts.reshape(4, -1).sum(1) == 640).all()  # 10 steps x 64 chains, none lost
    assert colour.min() >= 0 and colour.max() <= 1
    assert ((counts > 0).mean(axis=(1, 2)) > 0.05).all()  # filled, not dust


def test_shards_layout_info_and_statistics(fractals):
    out = Path(fractals["out_dir"])
    info = json.loads((out / "_info.json").read_text())
    assert {k: info[k] for k in ("num_classes", "num_samples", "img_size", "in_chans")} == {
        "num_classes": 6, "num_samples": 60, "img_size": 16, "in_chans": 3}
    assert info["shards"] == [{"url": f"fractals-{i:06d}.tar", "num_samples": n} for i, n in enumerate([16, 16, 16, 12])]
    assert fractals["urls"] == str(out / "fractals-{000000..000003}.tar")

    labels, pixels = [], []
    for shard in info["shards"]:
        data = _read(out / shard["url"])
        keys = sorted({name.split(".")[0] for name in data})
        assert sorted(data) == sorted([f"{k}.cls" for k in keys] + [f"{k}.png" for k in keys])
        shard_labels = [int(data[f"{k}.cls"]) for k in keys]
        assert len(set(shard_labels)) >= 3  # shuffled across shards: many classes per shard
        labels += shard_labels
        for k in keys:
            img = Image.open(io.BytesIO(data[f"{k}.png"]))
            assert img.mode == "RGB" and img.size == (16, 16)
            pixels.append(np.asarray(img, dtype=np.float64) / 255)
    assert Counter(labels) == {c: 10 for c in range(6)}
    pixels = np.stack(pixels).reshape(-1, 3)
    np.testing.assert_allclose(info["mean"], pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(info["std"], pixels.std(0), atol=1e-5)
    member = next(iter(_members(out / "fractals-000000.tar").values()))
    assert (member.mtime, member.uid, member.gid) == (0, 0, 0)


def _images(out: str | Path) -> np.ndarray:
    """Every image of a shard directory, ``[N, H, W, 3]`` uint8."""
    return np.stack([np.asarray(Image.open(io.BytesIO(v))) for p in sorted(Path(out).glob("*.tar"))
                     for k, v in _read(p).items() if k.endswith(".png")])


def test_background_fraction_of_images_lie_on_noise_with_the_fractal_on_top():
    rng = np.random.default_rng(0)
    base = sample_ifs(rng, 3)
    params = np.repeat(base[None], 64, axis=0)
    counts, colour = chaos_game(params, np.random.default_rng(1), 16)
    plain = colourise(counts, colour, np.random.default_rng(2))
    assert (plain[counts == 0] == 0).all()  # black ground: only the attractor is lit
    for fraction, (lo, hi) in ((0.0, (0, 0)), (0.5, (20, 44)), (1.0, (64, 64))):
        img = colourise(counts, colour, np.random.default_rng(2), fraction)
        on_noise = np.array([(im[c == 0] > 0).any() for im, c in zip(img, counts)])  # any unlit pixel lit
        assert lo <= on_noise.sum() <= hi, fraction
        # The fractal's own pixels are the plain rendering's, or brighter where the ground shows through.
        assert (img.astype(int) >= plain.astype(int) - 1).all()
    np.testing.assert_array_equal(colourise(counts, colour, np.random.default_rng(2), 0.0), plain)


def test_noise_background_is_dim_varied_and_not_flat():
    bg = noise_background(np.random.default_rng(0), 32, 16)
    assert bg.shape == (32, 16, 16, 3) and bg.dtype == np.float32
    assert bg.min() >= 0.0 and bg.max() <= 0.7 + 1e-6  # the attractor stays the brightest thing
    spread = bg.std(axis=(1, 2)).max(axis=-1)
    assert (spread > 0.01).all()  # a texture, not a flat colour
    means = bg.mean(axis=(1, 2))
    assert means.std(axis=0).min() > 0.02  # grounds differ in shade from image to image


def test_background_corpus_records_itself_and_is_refused_by_name_when_it_differs(tmp_path):
    with pytest.raises(ValueError, match="background"):
        make_fractal_shards(tmp_path / "bad", background=1.5, **TINY)
    noisy = make_fractal_shards(tmp_path / "noisy", background=1.0, **TINY)
    black = make_fractal_shards(tmp_path / "black", background=0.0, **TINY)
    assert json.loads(Path(noisy["out_dir"], "_info.json").read_text())["background"] == 1.0
    assert noisy["mean"][0] > black["mean"][0]
    assert (_images(noisy["out_dir"]).reshape(60, -1, 3).min(axis=1) > 0).mean() > 0.5  # few black pixels
    assert (_images(black["out_dir"]).reshape(60, -1, 3).min(axis=1) == 0).all()

    small = dict(num_classes=2, per_class=3, img_size=8)
    ensure_embedded_data(tmp_path / "root", **small)
    info = json.loads((tmp_path / "root" / "fractals" / "_info.json").read_text())
    assert info["background"] == DEFAULT_BACKGROUND
    with pytest.raises(ValueError, match="'background': 0.0"):
        ensure_embedded_data(tmp_path / "root", **small, background=0.0)


def test_same_seed_gives_byte_identical_shards(fractals, tmp_path):
    again = make_fractal_shards(tmp_path / "b", seed=0, workers=2, **TINY)  # a process pool changes nothing
    assert _digests(again["out_dir"]) == _digests(fractals["out_dir"])
    other = make_fractal_shards(tmp_path / "c", seed=1, **TINY)
    assert _digests(other["out_dir"]) != _digests(fractals["out_dir"])


def test_a_class_depends_only_on_seed_and_index(fractals, tmp_path):
    fewer = make_fractal_shards(tmp_path / "fewer", seed=0, **{**TINY, "num_classes": 2})
    small = {k: v for p in Path(fewer["out_dir"]).glob("*.tar") for k, v in _read(p).items()}
    big = {k: v for p in Path(fractals["out_dir"]).glob("*.tar") for k, v in _read(p).items()}
    assert small and all(big[k] == v for k, v in small.items())


def test_shards_feed_the_loader(fractals):
    tf = build_transform(16, 3, train=True, mean=fractals["mean"], std=fractals["std"])
    loader = build_shard_loader(fractals["urls"], rank=1, world_size=2, batch_size=8, num_workers=0,
                                steps=5, shuffle_buffer=16, transform=tf)
    batches = list(loader)
    assert len(batches) == 5
    assert batches[0][0].shape == (8, 3, 16, 16)
    assert all(0 <= int(y) < 6 for _, labels in batches for y in labels)


def test_digits_pixels_and_features(tmp_path):
    dd = make_digits_dataset(tmp_path / "digits", test_size=0.25, seed=0)
    assert (len(dd["train"]), len(dd["test"])) == (1347, 450)
    assert dd["train"].features["label"].names == [str(i) for i in range(10)]
    arr = np.stack([np.asarray(dd["train"][i]["image"]) for i in range(50)])
    assert arr.dtype == np.uint8 and arr.shape == (50, 8, 8) and arr.max() == 255
    assert (tmp_path / "digits" / "dataset_dict.json").is_file()


def test_ensure_embedded_data_is_idempotent_and_atomic(tmp_path):
    small = dict(num_classes=3, per_class=4, img_size=8)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_embedded_data(tmp_path, **small)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]  # concurrent builders agree
    paths = results[0]
    assert Path(paths["fractals"], "_info.json").is_file()
    assert Path(paths["digits"], "dataset_dict.json").is_file()
    assert paths["fractals_urls"].endswith("fractals-{000000..000000}.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "fractals"]  # no temp dirs left

    before = _digests(paths["fractals"])
    stamp = Path(paths["fractals"], "_info.json").stat().st_mtime_ns
    assert ensure_embedded_data(tmp_path, **small) == paths
    assert _digests(paths["fractals"]) == before
    assert Path(paths["fractals"], "_info.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    with pytest.raises(ValueError, match="was built with"):
        ensure_embedded_data(tmp_path, **{**small, "per_class": 5})


def test_cli_builds_a_plain_black_ground_corpus_on_request(tmp_path):
    out = tmp_path / "plain"
    done = subprocess.run([sys.executable, "-m", "pipeline", "data", "fractals", "--out", str(out), "--classes", "2",
                           "--per-class", "3", "--img-size", "8", "--background", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "_info.json").read_text())["background"] == 0.0
    assert (_images(out).reshape(6, -1, 3).min(axis=1) == 0).all()


def test_cli_refuses_a_background_outside_0_1_by_flag_name(tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "fractals", "--out", str(tmp_path / "bad"), "--background", "1.5"])
    assert exit_info.value.code == 2
    assert "argument --background: a fraction of the images, in [0, 1]; got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything is written
