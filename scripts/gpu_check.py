#!/usr/bin/env python
"""One prepared check for a GPU machine (runs without Ray): model speed, MFU, memory, data path.

1. The card's dense bf16 matmul rate, measured here (the MFU denominator).
2. The model (default `hybrid_base` at 224 px, bf16 autocast, channels-last, fused AdamW) through
   our Engine on device-resident synthetic batches: eager and `torch.compile`d — samples/s,
   achieved TFLOP/s, MFU, peak GPU memory.
3. The same step under the label-free objectives (`--objectives simclr dino`, eager): each
   sample's views (2; 2 global + 2 local) and the projection head / EMA teacher, at the same
   images per step — samples/s, MFU (FLOPs count every view), peak memory.
4. Stage one's data path on JPEG webdataset shards made here, `pretrain.data.decode=worker`
   (PIL in the loader workers) against `decode=device` (`torchvision.io.decode_jpeg` batched on
   the device, crops resized there) — samples/s of normalised batches on the device, each.

    .venv/bin/python scripts/gpu_check.py                      # on the GPU box
    .venv/bin/python scripts/gpu_check.py --device cpu --model hybrid_tiny --img-size 32 --steps 3 --quick

Prints one table and writes it as JSON to --out (default gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from architectures import create_model
from pipeline.distributed import DistContext, resolve_device
from pipeline.data.embedded import make_jpeg_shards
from pipeline.engine import Engine
from pipeline.flops import measure_matmul_flops, train_flops_per_sample
from pipeline.optim import build_optimizer, build_scheduler, param_groups

REPO = Path(__file__).resolve().parents[1]


def model_speed(args, device: torch.device, compile: bool, peak: float, objective: str = "supervised") -> dict:
    """Stage one's train step through our Engine; a label-free ``objective`` (`simclr`, `dino`) trains
    its views of ``args.batch // views`` samples per step (the same images per step), heads included."""
    from pipeline.config import load_config
    from pipeline.objectives import build_objective, objective_param_groups

    torch.manual_seed(0)
    p = load_config(REPO / "configs" / "demo.yaml", [f"pretrain.objective={objective}"], command="pretrain").pretrain
    model = create_model(args.model, num_classes=1000 if objective == "supervised" else 0, in_chans=3)
    trained = build_objective(p, model)
    views = trained.views
    flops = train_flops_per_sample(model, 3, args.img_size) * views
    trained.to(device)
    opt = build_optimizer(objective_param_groups(trained, lr=1e-3, weight_decay=0.05), lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=0, total_steps=10**6)
    engine = Engine(trained, opt, sched, DistContext(device=device), precision="bf16" if device.type == "cuda" else "fp32",
                    clip_grad_norm=1.0, compile=compile, log_every=max(1, args.steps), loss=trained.loss,
                    prepare_batch=trained.prepare_batch)
    n = max(1, args.batch // views)
    shape = (n, 3, args.img_size, args.img_size) if views == 1 else (n, views, 3, args.img_size, args.img_size)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    batches = [(x, y)] * (args.warmup + args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.fit(batches[: args.warmup], start_step=0, end_step=args.warmup)  # compile + allocator warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    engine.fit(batches[args.warmup:], start_step=0, end_step=args.steps)  # ends with a host sync (loss.item)
    dt = time.perf_counter() - t0
    sps = args.steps * n / dt  # samples (each `views` images)
    tflops = sps * flops / 1e12
    return {
        "samples_per_s": sps,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "train_gflops_per_sample": flops / 1e9,
        "views": views,
        "samples_per_step": n,
    }


def data_path_speed(urls: str, args, device: torch.device, decode: str) -> float:
    """Stage one's own stream (`stages.pretrain.pretrain_stream`) at `pretrain.data.decode=<decode>`:
    samples/s of normalised batches resident on the device."""
    from pipeline.config import load_config
    from pipeline.data.shards import plan_from_config
    from pipeline.stages.pretrain import pretrain_stream

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"pretrain.data.urls={urls}", f"pretrain.data.img_size={args.img_size}", f"pretrain.data.batch_size={args.batch}",
        f"pretrain.data.num_workers={args.loader_workers}", "pretrain.data.shuffle_buffer=0",
        "pretrain.data.image_key=jpg", "pretrain.data.num_classes=1000", f"pretrain.data.decode={decode}",
    ], command="pretrain")
    ctx = DistContext(device=device)
    stream = pretrain_stream(cfg, plan_from_config(cfg.pretrain.data), ctx, steps=args.data_steps, num_classes=1000,
                             mean=[0.5] * 3, std=[0.25] * 3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = iter(stream)
    next(it)  # workers up, decoder warm
    sync()
    t0 = time.perf_counter()
    n = 0
    for images, _ in it:
        n += images.to(device, non_blocking=True).shape[0]
    sync()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hybrid_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--data-images", type=int, default=4096)
    ap.add_argument("--data-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="skip torch.compile (CPU smoke run)")
    ap.add_argument("--objectives", nargs="*", default=["simclr", "dino"], choices=["simclr", "dino"],
                    help="label-free objectives to time besides supervised (eager)")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = measure_matmul_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"device": name, "matmul_tflops": peak / 1e12, "model": args.model, "img_size": args.img_size,
                    "batch": args.batch}
    report["eager"] = model_speed(args, device, compile=False, peak=peak)
    if not args.quick:
        report["compiled"] = model_speed(args, device, compile=True, peak=peak)
    for objective in args.objectives:  # label-free stage one (eager): its views and heads
        report[objective] = model_speed(args, device, compile=False, peak=peak, objective=objective)
    with tempfile.TemporaryDirectory() as tmp:
        per_shard = max(args.batch, args.data_images // max(1, args.loader_workers))
        urls = make_jpeg_shards(Path(tmp), count=args.data_images, size=max(256, args.img_size + 32),
                                per_shard=per_shard)
        report["data_cpu_decode_samples_per_s"] = data_path_speed(urls, args, device, "worker")
        report["data_gpu_decode_samples_per_s"] = data_path_speed(urls, args, device, "device")

    print(f"\n{name}: dense matmul {report['matmul_tflops']:.1f} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'fp32'})")
    print(f"{args.model} @ {args.img_size}px, batch {args.batch}:")
    print(f"{'mode':<9} {'views':>5} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for mode in ("eager", "compiled", *args.objectives):
        if mode in report:
            r = report[mode]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "—"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "—"
            print(f"{mode:<9} {r['views']:>5} {r['samples_per_s']:>10.0f} {r['tflops']:>8.2f} {mfu:>6} {mem:>9}")
    print(f"data path: CPU decode ({args.loader_workers} workers) {report['data_cpu_decode_samples_per_s']:.0f} "
          f"samples/s; device decode {report['data_gpu_decode_samples_per_s']:.0f} samples/s")
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
