"""A label-free procedural corpus with natural-image statistics: dead-leaves images.

Baradad et al. ("Learning to See by Looking at Noise", NeurIPS 2021) found that contrastive
pretraining on dead-leaves images transfers to real photographs far better than on plain noise:
the model (Lee, Mumford & Huang, 2001) reproduces what makes photographs photographs, namely
occlusion, sharp edges between flat regions and scale invariance. An image is built by dropping
opaque shapes ("leaves") on top of each other; shape sizes follow ``p(r) ~ r^-3``, which gives
the 1/f^2 power spectrum of natural images.

Here: circles, rotated rectangles and triangles with uniformly random RGB colours (Baradad's
"dead_leaves-mixed"), drawn at 2x and downsampled with antialiasing. The shards have no label
(``<key>.png`` only): they are for label-free objectives (`pretrain.objective: simclr`).
Deterministic by seed; ``transferline data deadleaves --out DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.embedded import INFO_NAME, _png_bytes, _pool, _write_shard, histogram_stats, value_histogram

SHARD_NAME = "deadleaves-{:06d}.tar"
#: Supersampling factor: shapes are drawn at this multiple of the output size, then downsampled.
_SUPERSAMPLE = 2


def leaf_radii(rng: np.random.Generator, count: int, r_min: float, r_max: float) -> np.ndarray:
    """``count`` radii from ``p(r) ~ r^-3`` on ``[r_min, r_max]`` (inverse CDF): scale-invariant sizes."""
    u = rng.random(count)
    return (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5


def render_dead_leaves(rng: np.random.Generator, img_size: int, *, r_min: float = 0.06, r_max: float = 0.6,
                       leaves: int = 200) -> np.ndarray:
    """One RGB dead-leaves image ``[img_size, img_size, 3]`` uint8 (radii as fractions of the side).

    ``leaves`` shapes are painted one over the other (each later leaf occludes the earlier ones),
    enough at these radii that the background is all but hidden. Every random number is drawn in
    one vectorised call per quantity: the per-leaf work is a single PIL draw call.
    """
    side = img_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(canvas)
    radii = leaf_radii(rng, leaves, r_min, r_max) * side
    centres = rng.random((leaves, 2)) * side
    kinds = rng.integers(0, 3, leaves)  # circle, rectangle (aspect up to 1:3), triangle
    angles = rng.random(leaves) * 2 * np.pi
    aspects = np.sqrt(1 + 2 * rng.random(leaves))
    wobble = rng.normal(0, 0.3, (leaves, 3))
    colours = [tuple(c) for c in rng.integers(0, 256, (leaves, 3)).tolist()]
    # Every polygon's corners at once: rectangles (4 corners), triangles (3 corners, the 4th repeated).
    w, h = radii * aspects, radii / aspects
    rect = np.stack([np.stack([-w, -h], 1), np.stack([w, -h], 1), np.stack([w, h], 1), np.stack([-w, h], 1)], 1)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    rect = np.stack([rect[..., 0] * cos - rect[..., 1] * sin, rect[..., 0] * sin + rect[..., 1] * cos], -1)
    a = angles[:, None] + np.array([0, 2, 4]) * np.pi / 3 + wobble
    tri = np.stack([np.cos(a), np.sin(a)], -1) * radii[:, None, None]
    polys = (rect + centres[:, None]).tolist(), (tri + centres[:, None]).tolist()
    boxes = np.concatenate([centres - radii[:, None], centres + radii[:, None]], 1).tolist()
    for i, kind in enumerate(kinds.tolist()):
        if kind == 0:
            draw.ellipse(boxes[i], fill=colours[i])
        else:
            draw.polygon([tuple(p) for p in polys[kind - 1][i]], fill=colours[i])
    return np.asarray(canvas.resize((img_size, img_size), Image.Resampling.LANCZOS))


def _render_chunk(job: tuple[int, int, int, int]) -> tuple[list[bytes], np.ndarray]:
    """``(seed, chunk, count, img_size)`` -> the chunk's PNGs and a [3, 256] value histogram."""
    seed, chunk, count, img_size = job
    rng = np.random.default_rng([seed, 2, chunk])
    imgs = np.stack([render_dead_leaves(rng, img_size) for _ in range(count)])
    return [_png_bytes(img) for img in imgs], value_histogram(imgs)


def make_deadleaves_shards(out_dir: str | os.PathLike, num_samples: int = 20000, img_size: int = 32,
                           samples_per_shard: int = 1000, seed: int = 0, *, workers: int = 1) -> dict[str, Any]:
    """Write ``num_samples`` dead-leaves images as label-free webdataset shards (``<key>.png``) and
    ``_info.json`` (num_samples, shards, img_size, in_chans=3, per-channel mean/std, seed, pattern;
    no ``num_classes``). Byte-identical for equal arguments, whatever ``workers`` is."""
    if num_samples < 1 or img_size < 8 or samples_per_shard < 1:
        raise ValueError(f"need num_samples>=1, img_size>=8, samples_per_shard>=1; got {num_samples}, "
                         f"{img_size}, {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_samples // samples_per_shard)
    sizes = [min(samples_per_shard, num_samples - s * samples_per_shard) for s in range(num_shards)]
    names = [SHARD_NAME.format(s) for s in range(num_shards)]
    with _pool(max(1, min(workers, num_shards))) as pool:
        # One chunk per shard, each with its own RNG: the pool changes nothing in the output.
        results = list(pool.map(_render_chunk, [(seed, s, n, img_size) for s, n in enumerate(sizes)]))
        jobs = [(str(out / name), [(f"s{s:06d}_{i:06d}", png, None) for i, png in enumerate(pngs)])
                for s, (name, (pngs, _)) in enumerate(zip(names, results))]
        hist = sum(h for _, h in results)
        list(pool.map(_write_shard, jobs))
    mean, std = histogram_stats(hist)
    pattern = "deadleaves-{" + f"{0:06d}..{num_shards - 1:06d}" + "}.tar"
    info = {
        "num_samples": num_samples,
        "shards": [{"url": name, "num_samples": n} for name, n in zip(names, sizes)],
        "img_size": img_size, "in_chans": 3,
        "mean": mean, "std": std,
        "seed": seed, "pattern": pattern, "generator": "dead-leaves",
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return {**info, "out_dir": str(out.resolve()), "urls": str(out.resolve() / pattern)}
