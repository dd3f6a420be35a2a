"""scripts/glyph_corpus.py: the printed-glyph corpus holds no digit, renders every class from a font
that has it, writes the fractal shards' layout, is deterministic, and streams through the loader."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import glyph_corpus  # noqa: E402
from pipeline.data.shards import build_shard_loader  # noqa: E402
from pipeline.data.transforms import build_transform  # noqa: E402

TINY = dict(per_class=3, img_size=16, samples_per_shard=7, num_classes=5)


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> dict:
    return glyph_corpus.make_glyph_shards(tmp_path_factory.mktemp("gl") / "a", seed=0, **TINY)


def _samples(root: str | Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path in sorted(Path(root).glob("glyphs-*.tar")):
        with tarfile.open(path) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def test_no_digit_is_a_class_and_classes_are_distinct() -> None:
    # A corpus with the target's classes would measure label overlap, not transfer.
    assert not any(ch.isdigit() for ch in glyph_corpus.CLASSES)
    assert len(set(glyph_corpus.CLASSES)) == len(glyph_corpus.CLASSES) == 105


def test_every_class_has_a_bundled_font_that_draws_it() -> None:
    for ch in glyph_corpus.CLASSES:
        assert glyph_corpus.fonts_with(ch), ch
    with pytest.raises(ValueError, match="no bundled font"):
        glyph_corpus.fonts_with("\ue000")  # a private-use code point: no font draws it


def test_layout_labels_and_statistics(glyphs) -> None:
    info = json.loads((Path(glyphs["out_dir"]) / "_info.json").read_text())
    assert (info["num_classes"], info["num_samples"], info["in_chans"], info["img_size"]) == (5, 15, 3, 16)
    assert info["classes"] == "".join(glyph_corpus.CLASSES[:5])
    assert [s["num_samples"] for s in info["shards"]] == [7, 7, 1]
    samples = _samples(glyphs["out_dir"])
    labels = [int(v) for k, v in samples.items() if k.endswith(".cls")]
    assert sorted(labels) == sorted([c for c in range(5) for _ in range(3)])
    for key, data in samples.items():
        if key.endswith(".png"):
            img = np.asarray(Image.open(io.BytesIO(data)))
            assert img.shape == (16, 16, 3) and img.dtype == np.uint8
            assert img.max() > 30  # ink, faint where the glyph was drawn coarse
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(v))).reshape(-1, 3) / 255.0
                             for k, v in samples.items() if k.endswith(".png")])
    np.testing.assert_allclose(info["mean"], pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(info["std"], pixels.std(0), atol=1e-5)
    assert max(info["mean"]) < 0.3  # ink on a black ground, as the fractal shards


def test_deterministic_whatever_the_workers(glyphs, tmp_path) -> None:
    def digests(root: str) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir())}

    again = glyph_corpus.make_glyph_shards(tmp_path / "b", seed=0, workers=2, **TINY)
    assert digests(again["out_dir"]) == digests(glyphs["out_dir"])
    other = glyph_corpus.make_glyph_shards(tmp_path / "c", seed=1, **TINY)
    assert digests(other["out_dir"]) != digests(glyphs["out_dir"])


def test_bad_arguments_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        glyph_corpus.make_glyph_shards(tmp_path, num_classes=len(glyph_corpus.CLASSES) + 1)


def test_shards_feed_the_loader(glyphs) -> None:
    tf = build_transform(16, 3, train=True, mean=glyphs["mean"], std=glyphs["std"])
    loader = build_shard_loader(glyphs["urls"], rank=0, world_size=1, batch_size=4, num_workers=0,
                                steps=3, shuffle_buffer=8, transform=tf)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 16, 16)
    assert all(0 <= int(y) < 5 for _, labels in batches for y in labels)
