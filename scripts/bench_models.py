#!/usr/bin/env python
"""CPU cost of a training step for architectures and kwarg variants, side by side.

One thread, a batch of random images, 100 classes: forward, cross-entropy, backward and an AdamW
step, as in stage one. The models take turns for several rounds and the medians are compared,
because this machine's speed drifts from hour to hour; the ratio to the first model is what to
read across runs.

    .venv/bin/python scripts/bench_models.py hybrid_tiny resnet_tiny
    .venv/bin/python scripts/bench_models.py hybrid_tiny 'hybrid_tiny:dims=[24,64,128]' \\
        'hybrid_tiny:stem_stride=1,dims=[8,32,64,128],depths=[1,1,1,1],conv_stages=4'

A spec is `name` or `name:key=value,...`; values are YAML (`[24,64,128]`, `batch`, `1`), as in
`pretrain.model.kwargs.*` overrides. The name may be an import path, `module:factory[:key=value,...]`
(scripts/ is on the path: `arch_variants:dense`).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch
import torch.nn.functional as F
import yaml

from architectures import create_model, list_models
from pipeline.flops import forward_flops


def parse_spec(spec: str) -> tuple[str, dict]:
    """`name:key=value,...` -> (name, kwargs); commas inside brackets belong to the value."""
    name, _, rest = spec.partition(":")
    if rest and name not in list_models():  # an import path: `module:factory`, then the kwargs
        factory, _, rest = rest.partition(":")
        name = f"{name}:{factory}"
    kwargs = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{spec!r}: {item!r} is not key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name, kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="model specs; the first is the reference")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch,))
    parts = []
    for spec in args.specs:
        name, kwargs = parse_spec(spec)
        try:
            model = create_model(name, num_classes=100, in_chans=3, **kwargs)
        except (ValueError, TypeError) as e:  # unknown name, bad import path or kwarg: one line, not a traceback
            raise SystemExit(f"{spec!r}: {e}") from None
        macs = forward_flops(model, 3, args.img_size) / 2  # multiply-add = 2 FLOPs
        parts.append((spec, model, torch.optim.AdamW(model.parameters(), 1e-3), macs))
    times: dict[str, list[float]] = {spec: [] for spec in args.specs}
    for _ in range(args.rounds):
        for spec, model, opt, _ in parts:
            for i in range(args.steps + 2):  # two warm-up steps per round
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= 2:
                    times[spec].append(time.perf_counter() - t0)
    ref = statistics.median(times[args.specs[0]])
    print(f"| model | params | MMACs / image | ms / step (batch {args.batch}, {args.img_size} px) | × first |")
    print("|---|---|---|---|---|")
    for spec, model, _, macs in parts:
        med = statistics.median(times[spec])
        n = sum(p.numel() for p in model.parameters())
        print(f"| `{spec}` | {n / 1e6:.3f} M | {macs / 1e6:.1f} | {1e3 * med:.1f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
