"""The embedded default data: generated pretraining shards and a small real target set.

Stage one pretrains on a formula-driven corpus in the spirit of FractalDB (Kataoka et al.,
ACCV 2020): every class is one random iterated function system (IFS), every image a rendering
of it with small per-sample variations. No download, no licence question, deterministic by seed.

- IFS sampling: 2-4 affine maps ``(a, b, c, d, e, f)`` drawn uniformly from [-1, 1], each map
  contractive. A candidate is kept when its *sigma factor* (sum over maps of
  ``s1 + 2 * s2``, the singular values of the linear part) lies in
  ``[(5 + N) / 2, (6 + N) / 2]`` for N maps. The factor and the band come from Anderson & Farrell
  ("Improving Fractal Pre-training", WACV 2022), who showed it separates dust (low sigma) from
  blobs (high sigma); the band grows by 1/2 per map because every extra map adds area. It gives
  the 3.5-5.0 range for 2-4 maps. FractalDB's own filter, a minimum filling rate of the rendered
  attractor, is applied as well (on a cheap 32 px pilot render) to drop the degenerate
  near-line systems the sigma band still lets through.
- Rendering: the chaos game, with maps picked with probability proportional to ``|det|``
  (FractalDB), vectorised over ``[samples, chains]``. Chains start on the fixed point of the
  first map, which lies on the attractor, so no burn-in points are needed or discarded.
- Per-sample variation: every parameter is jittered multiplicatively (FractalDB's parameter
  weighting, generalised), random horizontal flip, two random colours blended by a
  "last maps used" coordinate (as in fractal-flame colouring), giving RGB images.
- Ground: half the images (``background``) lie on 1/f noise (the power spectrum of natural
  images) in two random dim colours instead of black. On black alone stage one never sees a dense
  image, and a fine-tune on photographed textures lost to training from scratch; `README.md`'s
  bench section has the numbers.

Stage two's embedded target is scikit-learn's bundled digits set (1,797 real 8x8 scans).
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

INFO_NAME = "_info.json"
#: Fixed tar header fields: equal seeds give byte-identical shards.
_TAR_MTIME = 0
#: The filling-rate pilot renders every candidate at this size, whatever the output size.
_PILOT_SIZE = 32
#: Fraction of the demo corpus' images laid over a noise ground instead of black (`noise_background`).
DEFAULT_BACKGROUND = 0.5


# --------------------------------------------------------------------------- IFS sampling


def singular_values(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values ``(s1 >= s2)`` of the 2x2 linear parts of IFS maps ``params[..., 6]``.

    Closed form, much faster than a batched SVD: ``s1 +- s2 = sqrt(|A|_F^2 +- 2 |det A|)``.
    """
    a, b, c, d = params[..., 0], params[..., 1], params[..., 2], params[..., 3]
    q = a * a + b * b + c * c + d * d
    det2 = 2.0 * np.abs(a * d - b * c)
    plus, minus = np.sqrt(q + det2), np.sqrt(np.maximum(q - det2, 0.0))
    return 0.5 * (plus + minus), 0.5 * (plus - minus)


def sigma_factor(params: np.ndarray) -> np.ndarray:
    """Sigma factor of IFS codes ``params[..., N, 6]``: sum over maps of ``s1 + 2 * s2``."""
    s1, s2 = singular_values(params)
    return (s1 + 2.0 * s2).sum(axis=-1)


def sigma_band(num_maps: int) -> tuple[float, float]:
    """Accepted sigma-factor interval for ``num_maps`` maps (Anderson & Farrell)."""
    return (5.0 + num_maps) / 2.0, (6.0 + num_maps) / 2.0


def sample_ifs(
    rng: np.random.Generator,
    num_maps: int,
    *,
    min_fill: float = 0.1,
    batch: int = 4096,
    max_batches: int = 200,
) -> np.ndarray:
    """Draw one accepted IFS code ``[num_maps, 6]``.

    Candidates are drawn in batches (acceptance is about 0.4-2 %, so a batch almost always
    holds one); the first candidate that is contractive, inside the sigma band and fills at
    least ``min_fill`` of a 32 px pilot render is returned.
    """
    lo, hi = sigma_band(num_maps)
    for _ in range(max_batches):
        cand = rng.uniform(-1.0, 1.0, size=(batch, num_maps, 6))
        s1, s2 = singular_values(cand)
        sigma = (s1 + 2.0 * s2).sum(-1)
        ok = (s1 < 1.0).all(-1) & (sigma >= lo) & (sigma <= hi)
        for idx in np.flatnonzero(ok):
            counts, _ = chaos_game(cand[idx][None], rng, _PILOT_SIZE, points=2048)
            if (counts > 0).mean() >= min_fill:
                return cand[idx]
    raise RuntimeError(f"no IFS with {num_maps} maps passed the filters after {batch * max_batches} candidates")


def jitter_ifs(params: np.ndarray, rng: np.random.Generator, count: int, jitter: float) -> np.ndarray:
    """``count`` variants of one IFS code, each parameter scaled by ``1 + jitter * U(-1, 1)``.

    Maps pushed to a spectral norm >= 1 are scaled back to 0.99 so every variant stays contractive.
    """
    out = params[None] * (1.0 + jitter * rng.uniform(-1.0, 1.0, size=(count, *params.shape)))
    s1, _ = singular_values(out)
    shrink = np.minimum(1.0, 0.99 / np.maximum(s1, 1e-12))
    out[..., :4] *= shrink[..., None]
    return out


# --------------------------------------------------------------------------- rendering


def chaos_game(
    params: np.ndarray,
    rng: np.random.Generator,
    img_size: int,
    *,
    points: int = 3072,
    chains: int = 64,
    margin: float = 0.04,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``S`` IFS codes ``params[S, N, 6]`` with the chaos game, all at once.

    Returns ``(counts, colour)``, both ``[S, img_size, img_size]`` float32: hits per pixel, and the
    mean colour coordinate of the hits (in [0, 1]; each map pulls it half-way to its own value,
    so it records the last maps applied). Every sample's attractor is centred and scaled to fill
    the image box (aspect kept, ``margin`` on each side).
    """
    S, N, _ = params.shape
    steps = max(1, -(-points // chains))
    det = np.abs(params[..., 0] * params[..., 3] - params[..., 1] * params[..., 2]) + 1e-12
    cum = np.cumsum(det / det.sum(axis=1, keepdims=True), axis=1)

    # Map choice for every step at once, on 16-bit draws: map k is chosen when
    # cum[k-1] <= u < cum[k] (probability proportional to |det|, as in FractalDB).
    u = rng.integers(0, 1 << 16, size=(steps, S, chains), dtype=np.uint16)
    thresholds = np.rint(cum * (1 << 16)).astype(np.uint32)
    k = np.zeros(u.shape, np.uint8)
    for n in range(N - 1):
        k += u >= thresholds[None, :, None, n]
    idx = np.arange(S, dtype=np.intp)[None, :, None] * N + k  # into the flattened [S * N] maps
    a, b, c, d, e, f = params.reshape(S * N, 6).T.astype(np.float32)
    map_colour = np.tile(np.linspace(0.0, 1.0, N, dtype=np.float32), S)

    # Start on the fixed point x* = (I - A0)^-1 t0 of map 0: it lies on the attractor, so no burn-in.
    lin0 = params[:, 0, :4].reshape(S, 2, 2)
    x0 = np.linalg.solve(np.eye(2)[None] - lin0, params[:, 0, 4:, None])[..., 0].astype(np.float32)
    x = np.repeat(x0[:, :1], chains, axis=1)
    y = np.repeat(x0[:, 1:], chains, axis=1)
    col = np.full((S, chains), 0.5, np.float32)
    xs = np.empty((steps, S, chains), np.float32)
    ys = np.empty_like(xs)
    cs = np.empty_like(xs)
    for t in range(steps):
        i = idx[t]  # gathering per step keeps the working set in cache
        x, y = a[i] * x + b[i] * y + e[i], c[i] * x + d[i] * y + f[i]
        col = 0.5 * (col + map_colour[i])
        xs[t], ys[t], cs[t] = x, y, col

    # Normalise every sample's points to the image box, then rasterise with one bincount.
    xmin, xmax = xs.min(axis=(0, 2)), xs.max(axis=(0, 2))
    ymin, ymax = ys.min(axis=(0, 2)), ys.max(axis=(0, 2))
    extent = np.maximum(np.maximum(xmax - xmin, ymax - ymin), 1e-6)
    scale = ((1.0 - 2.0 * margin) * img_size / extent).astype(np.float32)
    # pixel = (x - centre) * scale + size / 2, folded into one multiply-add per coordinate;
    # after clipping to [0, size - 1] the int cast is the floor.
    top = np.float32(img_size - 1)
    fx = xs * scale[None, :, None] + (0.5 * img_size - 0.5 * (xmin + xmax) * scale)[None, :, None]
    fy = ys * scale[None, :, None] + (0.5 * img_size - 0.5 * (ymin + ymax) * scale)[None, :, None]
    np.clip(fx, 0, top, out=fx)
    np.clip(fy, 0, top, out=fy)
    iy = fy.astype(np.intp)
    iy *= img_size
    iy += fx.astype(np.intp)
    iy += (np.arange(S, dtype=np.intp) * (img_size * img_size))[None, :, None]
    flat = iy.ravel()
    nbins = S * img_size * img_size
    counts = np.bincount(flat, minlength=nbins).astype(np.float32)
    colour = np.bincount(flat, weights=cs.ravel(), minlength=nbins).astype(np.float32)
    colour = np.divide(colour, counts, out=np.zeros_like(colour), where=counts > 0)
    shape = (S, img_size, img_size)
    return counts.reshape(shape), colour.reshape(shape)


def colourise(counts: np.ndarray, colour: np.ndarray, rng: np.random.Generator,
              background: float = 0.0) -> np.ndarray:
    """Turn hit counts into RGB uint8 images ``[S, H, W, 3]`` with two random colours per sample.

    Intensity is ``log1p(hits)`` saturating at twice the mean hits per lit pixel, so sparse and
    dense attractors both come out visible; hue blends the sample's two colours by ``colour``.
    A ``background`` fraction of the samples is laid over a `noise_background` instead of black,
    the attractor's intensity as its opacity (no draws are made when it is 0, so older corpora
    stay byte-identical).
    """
    S = counts.shape[0]
    lit = np.maximum((counts > 0).sum(axis=(1, 2)), 1)
    sat = np.maximum(2.0 * counts.sum(axis=(1, 2)) / lit, 2.0)
    value = np.minimum(np.log1p(counts) / np.log1p(sat)[:, None, None], 1.0)
    rgb = rng.random((S, 2, 3), dtype=np.float32)
    rgb /= rgb.max(axis=-1, keepdims=True)  # bright: the strongest channel at full scale
    img = value[..., None] * _two_colours(rgb, colour)
    if background > 0:
        # Quantised first, as a black-ground image is, so both kinds see the same fractal pixels.
        img = np.rint(img * 255.0).astype(np.float32) / 255.0
        bg = noise_background(rng, S, counts.shape[1])
        laid = img + (1.0 - value[..., None]) * bg
        img = np.where((rng.random(S) < background)[:, None, None, None], np.clip(laid, 0.0, 1.0), img)
    return np.rint(img * 255.0).astype(np.uint8)


def noise_background(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """``count`` backgrounds ``[count, size, size, 3]`` float32 in [0, 1]: 1/f^alpha noise (alpha
    uniform in [1, 2.5], from grainy to cloudy; natural images sit near 2), stretched to [0, 1],
    shaded between two random colours and dimmed to a random level in [0.2, 0.7], so the
    attractor on top stays the brightest thing in the image (and stage one learns figure from ground).
    """
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]
    freq = np.sqrt(fx * fx + fy * fy)
    freq[0, 0] = 1.0
    alpha = rng.uniform(1.0, 2.5, size=(count, 1, 1))
    real = rng.standard_normal((count, size, size))
    spectrum = (real + 1j * rng.standard_normal((count, size, size))) / freq[None] ** alpha
    spectrum[:, 0, 0] = 0
    noise = np.real(np.fft.ifft2(spectrum))
    noise -= noise.min(axis=(1, 2), keepdims=True)
    noise /= np.maximum(noise.max(axis=(1, 2), keepdims=True), 1e-8)
    rgb = rng.random((count, 2, 3), dtype=np.float32)
    level = rng.uniform(0.2, 0.7, size=(count, 1, 1, 1)).astype(np.float32)
    return level * _two_colours(rgb, noise.astype(np.float32))


def _two_colours(rgb: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per sample, blend its two colours ``rgb[:, 0]`` and ``rgb[:, 1]`` (``[S, 2, 3]``) by ``t``
    (``[S, H, W]``, 0 to 1): ``[S, H, W, 3]``."""
    c0, c1 = rgb[:, None, None, 0], rgb[:, None, None, 1]
    return c0 + (c1 - c0) * t[..., None]


def render_fractal_class(
    base: np.ndarray,
    rng: np.random.Generator,
    count: int,
    img_size: int,
    *,
    jitter: float = 0.1,
    points_per_pixel: float = 3.0,
    background: float = 0.0,
    chunk_points: int = 8_000_000,
) -> np.ndarray:
    """Render ``count`` varied images ``[count, H, W, 3]`` uint8 of one IFS class (``background``: the
    fraction laid over noise, `colourise`)."""
    points = max(1024, int(points_per_pixel * img_size * img_size))
    chunk = max(1, chunk_points // points)  # bounds the point buffers at large sizes
    out = []
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        params = jitter_ifs(base, rng, n, jitter)
        counts, colour = chaos_game(params, rng, img_size, points=points)
        img = colourise(counts, colour, rng, background)
        flip = rng.random(n) < 0.5
        img[flip] = img[flip, :, ::-1]
        out.append(img)
    return np.concatenate(out)


# --------------------------------------------------------------------------- shards


def value_histogram(imgs: np.ndarray) -> np.ndarray:
    """``[3, 256]`` pixel-value counts of RGB uint8 images ``[..., 3]``: exact, order-free statistics."""
    return np.stack([np.bincount(imgs[..., ch].ravel(), minlength=256) for ch in range(3)]).astype(np.int64)


def histogram_stats(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a ``[3, 256]`` value histogram (rounded as `_info.json` stores them)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    pixels = hist.sum(axis=1)
    mean = (hist * levels).sum(axis=1) / pixels
    std = np.sqrt(np.maximum((hist * levels**2).sum(axis=1) / pixels - mean * mean, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1 with run-length matching: faster than the default level 6 and, on these mostly
    # black images, no larger.
    Image.fromarray(img).save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def _render_class_pngs(
    c: int, *, seed: int, per_class: int, img_size: int, jitter: float, points_per_pixel: float,
    background: float,
) -> tuple[list[bytes], np.ndarray]:
    """Class ``c``: sample its IFS, render ``per_class`` images; PNGs and a [3, 256] value histogram."""
    rng = np.random.default_rng([seed, 0, c])
    base = sample_ifs(rng, int(rng.integers(2, 5)))
    imgs = render_fractal_class(base, rng, per_class, img_size, jitter=jitter, points_per_pixel=points_per_pixel,
                                background=background)
    return [_png_bytes(img) for img in imgs], value_histogram(imgs)


def write_class_shards(
    out: Path, pool: Any, results: list[tuple[list[bytes], np.ndarray]], name: str, key_prefix: str,
    *, samples_per_shard: int, seed: int,
) -> tuple[list[dict[str, Any]], str, np.ndarray]:
    """Write per-class renderings as labelled shards ``<name>-000000.tar ...``, samples shuffled across them
    (seeded by ``seed``) so every shard holds many classes. ``results[c]`` is class ``c``'s ``(pngs,
    [3, 256] value histogram)``; sample keys are ``<key_prefix><class:05d>_<index:06d>``.

    Returns the `_info.json` shard list, the shards' brace pattern and the summed histogram (exact,
    order-free statistics)."""
    samples = [(f"{key_prefix}{c:05d}_{j:06d}", png, c) for c, (pngs, _) in enumerate(results)
               for j, png in enumerate(pngs)]
    hist = sum(h for _, h in results)
    order = np.random.default_rng([seed, 1]).permutation(len(samples))
    num_shards = -(-len(samples) // samples_per_shard)
    jobs = [(str(out / f"{name}-{s:06d}.tar"), [samples[i] for i in order[s * samples_per_shard:(s + 1) * samples_per_shard]])
            for s in range(num_shards)]
    list(pool.map(_write_shard, jobs))
    shards = [{"url": Path(path).name, "num_samples": len(members)} for path, members in jobs]
    return shards, f"{name}-{{{0:06d}..{num_shards - 1:06d}}}.tar", hist


def _write_shard(job: tuple[str, list[tuple[str, bytes, int | None]]]) -> None:
    """Write one webdataset tar shard of ``(key, png, label)`` samples: ``<key>.png``, ``<key>.cls``
    (none for a ``None`` label: label-free shards).

    Plain ``tarfile`` (what ``wds.TarWriter`` wraps) keeps pool workers free of the torch import;
    headers are fixed (mtime 0, uid/gid 0, no names) so equal inputs give equal bytes.
    """
    path, samples = job
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, png, label in samples:
            members = (("cls", str(label).encode()), ("png", png)) if label is not None else (("png", png),)
            for ext, data in members:
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size, member.mtime, member.mode = len(data), _TAR_MTIME, 0o444
                tar.addfile(member, io.BytesIO(data))


class _InProcess:
    """Stand-in for a process pool when ``workers == 1``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def _pool(workers: int):
    if workers == 1:
        return _InProcess()
    # spawn, never fork: the caller may hold threads (Ray, torch) that a fork would copy mid-state.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def make_fractal_shards(
    out_dir: str | os.PathLike,
    num_classes: int = 100,
    per_class: int = 200,
    img_size: int = 32,
    samples_per_shard: int = 1000,
    seed: int = 0,
    *,
    jitter: float = 0.1,
    points_per_pixel: float = 3.0,
    background: float = DEFAULT_BACKGROUND,
    workers: int = 1,
) -> dict[str, Any]:
    """Generate the FractalDB-style pretraining corpus as webdataset shards in ``out_dir``.

    Writes ``fractals-000000.tar ...`` (members ``<key>.png``, RGB, and ``<key>.cls``, the class
    index as text), samples shuffled across shards so every shard holds many classes, and
    ``_info.json`` (num_classes, num_samples, shards with their sample counts, img_size,
    in_chans=3, per-channel mean/std of the rendered images in [0, 1] units, seed, urls pattern).
    Class ``c``'s IFS depends only on ``(seed, c)``; the whole output is byte-identical for equal
    arguments, whatever ``workers`` is. The encoded PNGs are held in memory until written
    (about 1 KB each at 32 px).

    ``background`` is the fraction of images laid over a 1/f-noise ground instead of black
    (`noise_background`; `DEFAULT_BACKGROUND` for the demo's corpus, 0 for the plain FractalDB look).

    ``workers > 1`` renders classes and writes shards in that many spawned processes (for big
    corpora on many-core machines). Like any spawn pool it needs the calling script's top level
    guarded by ``if __name__ == "__main__":``; ``python -m``, console entry points and pytest are fine.

    Returns the info dict plus ``out_dir`` and ``urls`` (the absolute brace pattern of the shards).
    CLI: ``transferline data fractals --out DIR --classes N --per-class M --img-size S --seed K
    --background P``.
    """
    if num_classes < 1 or per_class < 1 or img_size < 8 or samples_per_shard < 1:
        raise ValueError(
            f"need num_classes>=1, per_class>=1, img_size>=8, samples_per_shard>=1; got "
            f"{num_classes}, {per_class}, {img_size}, {samples_per_shard}"
        )
    if not 0.0 <= background <= 1.0:
        raise ValueError(f"background: a fraction of the images, in [0, 1]; got {background}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, num_classes))

    render = functools.partial(
        _render_class_pngs, seed=seed, per_class=per_class, img_size=img_size,
        jitter=jitter, points_per_pixel=points_per_pixel, background=background,
    )
    with _pool(workers) as pool:
        # Classes are independent (own RNG): the pool changes nothing in the output.
        results = list(pool.map(render, range(num_classes)))
        shards, pattern, hist = write_class_shards(out, pool, results, "fractals", "c",
                                                   samples_per_shard=samples_per_shard, seed=seed)
    mean, std = histogram_stats(hist)
    info = {
        "num_classes": num_classes,
        "num_samples": num_classes * per_class,
        "shards": shards,
        "img_size": img_size,
        "in_chans": 3,
        "mean": mean,
        "std": std,
        "seed": seed,
        "per_class": per_class,
        "background": background,
        "pattern": pattern,
        "generator": "fractaldb-ifs",
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return {**info, "out_dir": str(out.resolve()), "urls": str(out.resolve() / pattern)}


# --------------------------------------------------------------------------- digits target


def make_digits_dataset(out_dir: str | os.PathLike, test_size: float = 0.3, seed: int = 0):
    """Save scikit-learn's digits (bundled, no network) as an HF ``DatasetDict`` in ``out_dir``.

    Features: ``image`` (``datasets.Image``, 8x8 grayscale, 0..16 scaled to 0..255) and ``label``
    (``ClassLabel`` "0".."9"). The train/test split is stratified and fixed by ``seed``; each split
    keeps the original order. Returns the DatasetDict.
    """
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )

    def split(idx: np.ndarray) -> datasets.Dataset:
        idx = np.sort(idx)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(images[i]) for i in idx], "label": labels[idx].tolist()},
            features=features,
        )

    dd = datasets.DatasetDict({"train": split(train_idx), "test": split(test_idx)})
    dd.save_to_disk(str(out_dir))
    return dd


# --------------------------------------------------------------------------- ensure


def _atomic_build(final: Path, build) -> None:
    """Run ``build(tmp_dir)`` and move the result to ``final``; a concurrent winner is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the target now exists and is not empty):
            # its output is identical (same seed), keep it.
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_data(
    root: str | os.PathLike = "data",
    *,
    num_classes: int = 100,
    per_class: int = 200,
    img_size: int = 32,
    seed: int = 0,
    background: float = DEFAULT_BACKGROUND,
    workers: int = 1,
) -> dict[str, str]:
    """Build the embedded data under ``root`` when missing; return its paths.

    Idempotent (an existing, complete build is reused) and atomic (each part is built in a
    temporary sibling directory and renamed into place, so a crash never leaves a half-written
    ``fractals/`` or ``digits/``). An existing fractal build made with other arguments is an error
    rather than silently reused. ``workers`` is passed to `make_fractal_shards`.

    Returns ``{"fractals": dir, "fractals_urls": brace pattern of the shards, "digits": dir}``.
    """
    root = Path(root)
    fractals, digits = root / "fractals", root / "digits"
    info_path = fractals / INFO_NAME
    if not info_path.exists():
        _atomic_build(
            fractals,
            lambda tmp: make_fractal_shards(tmp, num_classes, per_class, img_size, seed=seed, background=background,
                                            workers=workers),
        )
    if not info_path.is_file():
        raise ValueError(f"{fractals} exists but holds no {INFO_NAME} (not a finished build); remove it")
    info = json.loads(info_path.read_text())
    wanted = {"num_classes": num_classes, "per_class": per_class, "img_size": img_size, "seed": seed,
              "background": background}
    found = {k: info.get(k, 0.0 if k == "background" else None) for k in wanted}  # builds before it had none
    if found != wanted:
        raise ValueError(f"{fractals} was built with {found}, not {wanted}; remove it or use another root")
    if not (digits / "dataset_dict.json").exists():
        _atomic_build(digits, lambda tmp: make_digits_dataset(tmp, seed=seed))
        if not (digits / "dataset_dict.json").is_file():
            raise ValueError(f"{digits} exists but holds no dataset_dict.json (not a finished build); remove it")
    return {
        "fractals": str(fractals.resolve()),
        "fractals_urls": str(fractals.resolve() / info["pattern"]),
        "digits": str(digits.resolve()),
    }


def make_jpeg_shards(out: str | os.PathLike, *, count: int, size: int, per_shard: int, seed: int = 0) -> str:
    """A synthetic JPEG corpus for benchmarks of the 224 px data path: smooth random colour
    images (bicubic upsampling of 8x8 noise) saved as JPEG quality 90 in webdataset tars, with
    `jpg`/`cls` members. Returns the brace pattern of the shards."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, count // per_shard)
    for s in range(n_shards):
        with tarfile.open(out / f"jpeg-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(int(rng.integers(1000))).encode())):
                    info = tarfile.TarInfo(f"{s:06d}{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"jpeg-{{000000..{n_shards - 1:06d}}}.tar")
