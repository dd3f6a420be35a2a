"""A printed-glyph pretraining corpus, for corpus experiments with `scripts/bench_transfer.py`.

Tests one hypothesis of "Transfer that pays off": stage one on strokes closer to the demo's
target (handwritten digits) than fractals transfers better to it. Each class is one character
(Latin capitals, the lower-case letters whose shape differs from their capital, Greek letters
unlike Latin ones, and common symbols), rendered from the fonts matplotlib ships (DejaVu Sans,
Serif and Mono, STIX; every style) with a random font that has the glyph, size, stroke weight,
rotation, shear, offset, drawing resolution (some drawn at a quarter or half of the output size,
then upsampled) and ink colour, white-ish ink on black as in the fractal shards.

**No digits**: a corpus that holds the target's classes would measure label overlap, not transfer.

The shards have the fractal shards' layout (`<key>.png` RGB + `<key>.cls`, samples shuffled across
shards, `_info.json` with per-channel mean/std), so they drop in for `pretrain.data.urls`:

    .venv/bin/python scripts/glyph_corpus.py --out runs/corpora/glyphs --per-class 200 --workers 2
    .venv/bin/python scripts/bench_transfer.py --shots 2 5 --strategies scratch full --no-assess \\
        --pretrain-steps 1600 --override 'pretrain.data.urls=runs/corpora/glyphs/glyphs-{000000..000020}.tar'

Deterministic by seed on one machine (class ``c`` draws from ``(seed, c)``, whatever ``workers``);
another FreeType build may rasterise a few pixels differently. README, "Other pretraining corpora",
has what it measured: it did not make the demo's gain clear, so it is not the demo's corpus.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.data.embedded import INFO_NAME, _png_bytes, _pool, histogram_stats, value_histogram, write_class_shards

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
# Lower case only where the shape is not a scaled capital (c/C, o/O, s/S ... would be one class).
CLASSES: tuple[str, ...] = tuple(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "abdefghijkmnqrty"
    "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθλμξπρστφχψω"
    "&@#%?!§¶$€£¥∞∑∫√≈≠±÷×→←↑↓♠♣♥♦★☆♪©®"
)
#: Glyphs are drawn on a canvas this many times the output size, then cropped and downsampled.
_SUPERSAMPLE = 4


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def fonts_with(char: str) -> tuple[str, ...]:
    """The font files (full paths) that hold a glyph for ``char`` (not the missing-glyph box)."""
    from matplotlib.ft2font import FT2Font

    have = tuple(str(font_dir() / f) for f in FONT_FILES if FT2Font(str(font_dir() / f)).get_char_index(ord(char)))
    if not have:
        raise ValueError(f"no bundled font has a glyph for {char!r}")
    return have


def render_glyph(char: str, font_path: str, rng: np.random.Generator, img_size: int) -> np.ndarray:
    """One varied rendering of ``char``: ``[img_size, img_size, 3]`` uint8, coloured ink on black."""
    big = _SUPERSAMPLE * img_size
    font = ImageFont.truetype(font_path, int(big * rng.uniform(0.55, 0.85)))
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(canvas).text((big, big), char, fill=255, font=font, anchor="mm")
    weight = int(rng.integers(0, 3))  # thinner, as drawn, bolder
    if weight != 1:
        canvas = canvas.filter(ImageFilter.MinFilter(3) if weight == 0 else ImageFilter.MaxFilter(5))
    angle, shear = rng.uniform(-20, 20), rng.uniform(-0.3, 0.3)
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, center=(big, big))
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * big, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = canvas.getbbox() or (0, 0, 2 * big, 2 * big)
    side = max(x1 - x0, y1 - y0, 1) * rng.uniform(1.1, 1.5)  # margin around the glyph
    cx = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * side
    cy = (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * side
    crop = canvas.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
    drawn_at = int(rng.choice([max(4, img_size // 4), max(4, img_size // 2), img_size]))
    grey = crop.resize((drawn_at, drawn_at), Image.Resampling.LANCZOS).resize((img_size, img_size), Image.Resampling.BILINEAR)
    ink = rng.random(3)
    ink /= ink.max()  # bright: the strongest channel at full scale, as the fractals' colours
    return np.rint(np.asarray(grey, dtype=np.float32)[..., None] / 255 * ink * 255).astype(np.uint8)


def _render_class(c: int, *, seed: int, per_class: int, img_size: int) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng([seed, c])
    fonts = fonts_with(CLASSES[c])
    imgs = np.stack([render_glyph(CLASSES[c], fonts[rng.integers(len(fonts))], rng, img_size) for _ in range(per_class)])
    return [_png_bytes(img) for img in imgs], value_histogram(imgs)


def make_glyph_shards(out_dir: str | os.PathLike, per_class: int = 200, img_size: int = 32,
                      samples_per_shard: int = 1000, seed: int = 0, *, num_classes: int = len(CLASSES),
                      workers: int = 1) -> dict[str, Any]:
    """Write the glyph corpus (the first ``num_classes`` of `CLASSES`) as labelled webdataset shards and
    ``_info.json``; returns the info plus ``urls``, the absolute brace pattern of the shards."""
    if not 1 <= num_classes <= len(CLASSES) or per_class < 1 or img_size < 8 or samples_per_shard < 1:
        raise ValueError(f"need 1 <= num_classes <= {len(CLASSES)}, per_class >= 1, img_size >= 8, "
                         f"samples_per_shard >= 1; got {num_classes}, {per_class}, {img_size}, {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    render = functools.partial(_render_class, seed=seed, per_class=per_class, img_size=img_size)
    with _pool(max(1, min(workers, num_classes))) as pool:
        results = list(pool.map(render, range(num_classes)))
        shards, pattern, hist = write_class_shards(out, pool, results, "glyphs", "g",
                                                   samples_per_shard=samples_per_shard, seed=seed)
    mean, std = histogram_stats(hist)
    info = {
        "num_classes": num_classes, "num_samples": num_classes * per_class, "per_class": per_class, "shards": shards,
        "img_size": img_size, "in_chans": 3, "mean": mean, "std": std,
        "seed": seed, "pattern": pattern, "generator": "printed-glyphs", "classes": "".join(CLASSES[:num_classes]),
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")  # ASCII: any locale reads it
    return {**info, "out_dir": str(out.resolve()), "urls": str(out.resolve() / pattern)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--classes", type=int, default=len(CLASSES), help=f"the first N of the {len(CLASSES)} glyphs")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="rendering processes")
    args = ap.parse_args(argv)
    info = make_glyph_shards(args.out, args.per_class, args.img_size, args.per_shard, args.seed,
                             num_classes=args.classes, workers=args.workers)
    print(json.dumps({k: v for k, v in info.items() if k != "shards"}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
