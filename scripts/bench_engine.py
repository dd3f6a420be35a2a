#!/usr/bin/env python
"""Our engine's training loop against a bare PyTorch loop: same model, batches, optimiser.

Both loops do the same work per step (forward, cross-entropy, backward, gradient clipping,
AdamW step, LR schedule); the difference is what the engine adds around it (loss kept on the
device, one host sync per log window, throughput, hooks). Runs alternate A/B several times
and the medians are compared, because this machine's speed drifts.

    .venv/bin/python scripts/bench_engine.py [--model hybrid_tiny --img-size 32 --batch 64]

Goal: engine steps/s >= 0.98 x bare loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from architectures import create_model
from pipeline.distributed import DistContext, resolve_device
from pipeline.engine import Engine
from pipeline.optim import build_optimizer, build_scheduler, param_groups


def make_parts(args, device):
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=100, in_chans=3).to(device)
    opt = build_optimizer(param_groups(model, lr=1e-3, weight_decay=0.05), lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=0, total_steps=10**6)
    return model, opt, sched


def bare_loop(model, opt, sched, batches, device) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    loss.item()  # wait for the device, as the engine's last log step does
    return len(batches) / (time.perf_counter() - t0)


def engine_loop(model, opt, sched, batches, device, log_every: int) -> float:
    engine = Engine(model, opt, sched, DistContext(device=device), clip_grad_norm=1.0,
                    channels_last=False, log_every=log_every)
    t0 = time.perf_counter()
    engine.fit(batches, start_step=0, end_step=len(batches))
    return len(batches) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hybrid_tiny")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen),
                torch.randint(0, 100, (args.batch,), generator=gen)) for _ in range(args.steps)]

    rates: dict[str, list[float]] = {"bare": [], "engine": []}
    model, opt, sched = make_parts(args, device)
    bare_loop(model, opt, sched, batches[:3], device)  # warm-up (allocator, kernels)
    for _ in range(args.repeats):
        for name in ("bare", "engine"):
            model, opt, sched = make_parts(args, device)
            if name == "bare":
                rates[name].append(bare_loop(model, opt, sched, batches, device))
            else:
                rates[name].append(engine_loop(model, opt, sched, batches, device, args.log_every))

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"model {args.model}, {args.img_size} px, batch {args.batch}, {args.steps} steps x {args.repeats} "
          f"alternating repeats, device {device}, {args.threads} thread(s)")
    print(f"{'loop':<8} {'median steps/s':>15} {'samples/s':>10}  all runs (steps/s)")
    for k in ("bare", "engine"):
        runs = ", ".join(f"{r:.2f}" for r in rates[k])
        print(f"{k:<8} {med[k]:>15.2f} {med[k] * args.batch:>10.0f}  {runs}")
    ratio = med["engine"] / med["bare"]
    print(f"engine / bare = {ratio:.3f}  (goal >= 0.98: {'met' if ratio >= 0.98 else 'NOT met'})")


if __name__ == "__main__":
    main()
