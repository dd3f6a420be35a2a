#!/usr/bin/env python
"""Stage one's input stream against what the model consumes, on this machine, in one run.

Measures, each alone on the machine:
- the stream (tar read + PNG/JPEG decode + augmentation + batching, the demo's transform and
  shuffle buffer) through `build_shard_loader` with 0, 1 and 2 loader workers, in samples/s
  after a warm-up (worker start and the shuffle buffer's first fill are excluded);
- where one worker's time goes: reading raw samples, + decoding, + augmenting (in-process);
- the model: `Engine` train steps (forward, backward, clipping, AdamW) of hybrid_tiny at 32 px
  with the demo's batch (64), on ready-made batches;
and prints stream / model ratios. Goal: the stream >= 3x what the model consumes.

    .venv/bin/python scripts/bench_loader.py [--urls 'data/fractals/fractals-{000000..000019}.tar']
    .venv/bin/python scripts/bench_loader.py --jpeg-size 256 --img-size 224 --model hybrid_base --batch 32
    .venv/bin/python scripts/bench_loader.py --jpeg-size 256 --img-size 224 --decode device ...
    .venv/bin/python scripts/bench_loader.py --objective simclr     # two views per sample (dino: four)
        [--batches 60] [--model hybrid_tiny --img-size 32 --batch 64] [--json out.json]

`--decode device` measures `pretrain.data.decode=device`: the workers read headers and draw
crops, and the stream's batches are decoded by `DeviceDecoder` on --device (on a CPU that is the
benchmark's own process, so the figure is a floor; the in-process line shows what one worker
then costs per sample).

Without --urls it uses data/fractals (the demo's shards, `transferline data embedded`) when
present, else it generates a smaller corpus of the same kind in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from architectures import create_model
from pipeline.data.augment import BatchNormalize, SampleAugment
from pipeline.data.device_decode import DeferredAugment, DeviceDecodedStream, DeviceDecoder
from pipeline.data.shards import SampleSpec, build_shard_loader, expand_urls, read_shard_info
from pipeline.data.sources import OpenOptions, open_shard
from pipeline.data.tarsamples import TarSamples
from pipeline.data.transforms import build_transform
from pipeline.distributed import DistContext, resolve_device
from pipeline.engine import Engine
from pipeline.objectives import build_objective, objective_param_groups, view_augment
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.schema.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


def demo_shards(tmp: Path) -> str:
    local = REPO / "data" / "fractals"
    if (local / "_info.json").is_file():
        return str(local / json.loads((local / "_info.json").read_text())["pattern"])
    from pipeline.data.embedded import make_fractal_shards

    print("data/fractals not found: generating 30 classes x 200 images at 32 px ...", flush=True)
    return make_fractal_shards(tmp / "fractals", num_classes=30, per_class=200, img_size=32,
                               samples_per_shard=500, seed=0)["urls"]


def stream_rate(urls: str, transform, batch_transform, args, num_workers: int, decoder=None) -> float:
    warmup = 5
    loader = build_shard_loader(urls, rank=0, world_size=1, batch_size=args.batch, num_workers=num_workers,
                                steps=args.batches + warmup, shuffle_buffer=args.shuffle_buffer,
                                transform=transform, batch_transform=None if decoder else batch_transform, seed=0,
                                mp_context=args.mp_context, decode="device" if decoder else "worker")
    it = iter(DeviceDecodedStream(loader, decoder) if decoder else loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for images, _ in it:
        n += images.shape[0]
    if decoder is not None and decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    return n / (time.perf_counter() - t0)


def stage_rates(urls: str, transform, v2, limit: int) -> dict[str, float]:
    """In-process samples/s of reading raw samples, + decoding, + augmenting (one core); then
    torchvision v2's `build_transform` instead of our split augmentation, for comparison; and the
    worker's share under decode=device (JPEG header + crop drawn, bytes left encoded)."""
    shards = expand_urls(urls)
    keys = ("png", "jpg", "jpeg", "webp")
    spec = SampleSpec(keys, "cls", 0, transform)
    spec_v2 = SampleSpec(keys, "cls", 0, v2)
    spec_device = SampleSpec(keys, "cls", 0, DeferredAugment(transform), defer_jpeg=True) \
        if isinstance(transform, SampleAugment) else None  # views are drawn on decoded images only

    def samples():
        count = 0
        while True:
            for url in shards:
                with open_shard(url, OpenOptions()) as stream:
                    for sample in TarSamples(stream, url=url, slot=0):
                        yield sample
                        count += 1
                        if count >= limit:
                            return

    out = {}
    for name, work in (("read", lambda s: None), ("read+decode", spec.image_and_label),
                       ("read+decode+augment", spec), ("read+decode+augment (v2)", spec_v2),
                       ("read+header+crop (decode=device)", spec_device)):
        if work is None:
            continue
        t0 = time.perf_counter()
        n = sum(1 for s in samples() if work(s) is not None or True)
        out[name] = n / (time.perf_counter() - t0)
    return out


def model_rate(args, device: torch.device) -> float:
    """Samples/s of stage one's train step under ``args.objective`` (a simclr sample is 2 views)."""
    torch.manual_seed(0)
    p = PretrainConfig(objective=args.objective)
    objective = build_objective(p, create_model(args.model, num_classes=100 if p.labeled else 0, in_chans=3))
    opt = build_optimizer(objective_param_groups(objective, lr=1e-3, weight_decay=0.05), lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=0, total_steps=10**6)
    engine = Engine(objective, opt, sched, DistContext(device=device), clip_grad_norm=1.0, log_every=10,
                    loss=objective.loss)
    views = () if objective.views == 1 else (objective.views,)
    batches = [(torch.randn(args.batch, *views, 3, args.img_size, args.img_size),
                torch.randint(0, 100, (args.batch,))) for _ in range(4)]
    warmup, steps = 5, args.model_steps
    engine.fit([batches[i % 4] for i in range(warmup)], start_step=0, end_step=warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.fit([batches[i % 4] for i in range(steps)], start_step=warmup, end_step=warmup + steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * args.batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", default="", help="shards to read (default: the demo's)")
    parser.add_argument("--jpeg-size", type=int, default=0,
                        help="instead: generate JPEG shards of this size (e.g. 256, with --img-size 224)")
    parser.add_argument("--jpeg-images", type=int, default=2048, help="images in the generated JPEG corpus")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per loader setting")
    parser.add_argument("--batch", type=int, default=64, help="batch size (the demo's: 64)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--model", default="hybrid_tiny")
    parser.add_argument("--model-steps", type=int, default=40)
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="the demo's: 1000")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    parser.add_argument("--mp-context", default=None, help="fork (Linux default), spawn or forkserver")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (medians)")
    parser.add_argument("--decode", choices=("worker", "device"), default="worker",
                        help="pretrain.data.decode: where the stream's images are decoded")
    parser.add_argument("--objective", choices=("supervised", "simclr", "dino"), default="supervised",
                        help="a label-free objective: every sample becomes its views (2 for simclr, 2 + 2 "
                             "local for dino), the model trains that objective")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.jpeg_size and not args.urls:
            from pipeline.data.embedded import make_jpeg_shards

            print(f"generating {args.jpeg_images} JPEG images at {args.jpeg_size} px ...", flush=True)
            urls = make_jpeg_shards(Path(tmp) / "jpeg", count=args.jpeg_images, size=args.jpeg_size,
                                    per_shard=max(args.batch, args.jpeg_images // 8))
        else:
            urls = args.urls or demo_shards(Path(tmp))
        info = read_shard_info(urls) or {}
        mean, std = info.get("mean", [0.5] * 3), info.get("std", [0.25] * 3)
        # What pretrain() uses: crop + flip per sample on PIL, normalisation per batch.
        transform = SampleAugment(args.img_size, 3, scale=(0.35, 1.0))
        if args.objective != "supervised":  # the label-free objective's views, with its default recipe
            transform = view_augment(PretrainConfig(objective=args.objective), args.img_size, 3)
        batch_transform = BatchNormalize(mean, std, 3)
        v2 = build_transform(args.img_size, 3, train=True, mean=mean, std=std, scale=(0.35, 1.0))
        device = resolve_device(args.device)
        decoder = DeviceDecoder(args.img_size, 3, mean, std, device) if args.decode == "device" else None
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
              f"torch threads {torch.get_num_threads()}, model on {device}", flush=True)
        print(f"shards: {urls} ({len(expand_urls(urls))} shards)", flush=True)

        stages = stage_rates(urls, transform, v2, limit=args.batches * args.batch // 2)
        for name, rate in stages.items():
            print(f"in-process {name:<34s} {rate:8.0f} samples/s", flush=True)
        # Rounds alternate model and stream measurements; medians, because this machine's speed drifts.
        workers = [int(x) for x in args.workers.split(",")]
        models: list[float] = []
        per_worker: dict[int, list[float]] = {w: [] for w in workers}
        for r in range(args.rounds):
            models.append(model_rate(args, device))
            for w in workers:
                per_worker[w].append(stream_rate(urls, transform, batch_transform, args, w, decoder))
            print(f"round {r + 1}: model {models[-1]:.0f}, stream "
                  + ", ".join(f"{w}w {per_worker[w][-1]:.0f}" for w in workers) + " samples/s", flush=True)
        model = statistics.median(models)
        streams = {w: statistics.median(v) for w, v in per_worker.items()}
        print(f"model   {args.model} @ {args.img_size}px, batch {args.batch}: {model:8.0f} samples/s (median)")
        for w in workers:
            print(f"stream  {w} loader worker(s), decode={args.decode}: {streams[w]:8.0f} samples/s = {streams[w] / model:5.2f} x the model")
        best = max(streams.values())
        verdict = "meets" if best >= 3 * model else "misses"
        print(f"best stream / model = {best / model:.2f} ({verdict} the goal of >= 3x)")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "model_samples_per_s": model, "stream_samples_per_s": streams,
                "stream_over_model": {w: r / model for w, r in streams.items()}, "in_process": stages,
                "cpus": os.cpu_count(), "device": str(device), "urls": urls, "decode": args.decode,
            }, indent=2))


if __name__ == "__main__":
    main()
