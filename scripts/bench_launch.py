#!/usr/bin/env python
"""The same short stage one with `launcher.kind=local` and `launcher.kind=ray` (1 worker).

Separates the fixed start-up (driver wall time minus the training loop) from the per-step
rate (measured inside the loop), so Ray's fixed cost is not mistaken for a slower step.

    make data && .venv/bin/python scripts/bench_launch.py [--steps 150] [--rounds 3]

Rounds alternate local and Ray; the table shows medians (a 2-core machine is noisy: single
runs of the per-step ratio ranged 0.93-1.12 here). Goals: Ray per-step rate >= 0.95 x local;
Ray start-up <= 15 s here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(kind: str, steps: int, out_root: Path, urls: str) -> dict:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    out = out_root / kind
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"name=bench-{kind}", f"output_dir={out}", f"launcher.kind={kind}", "launcher.num_workers=1",
        f"pretrain.data.urls={urls}", f"pretrain.steps={steps}", "pretrain.checkpoint_every=0",
        "pretrain.data.num_workers=1", "engine.threads=1", "tracking.mode=disabled",
    ], command="pretrain")
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, "pretrain")
    wall = time.perf_counter() - t0
    p = summary["pretrain"]
    loop_s = (p["samples_seen"] / p["samples_per_s"]) if p["samples_per_s"] else float("nan")
    return {"wall_s": wall, "loop_s": loop_s, "startup_s": wall - loop_s,
            "steps_per_s": steps / loop_s, "samples_per_s": p["samples_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--urls", default=str(REPO / "data" / "fractals" / "fractals-{000000..000019}.tar"))
    ap.add_argument("--rounds", type=int, default=3, help="alternating local/Ray rounds (medians)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        for r in range(args.rounds):
            rounds.append({kind: run_once(kind, args.steps, Path(tmp) / str(r), args.urls) for kind in ("local", "ray")})
    results = {kind: {key: statistics.median(rd[kind][key] for rd in rounds) for key in rounds[0][kind]}
               for kind in ("local", "ray")}
    per_round = [rd["ray"]["steps_per_s"] / rd["local"]["steps_per_s"] for rd in rounds]
    print(f"\nstage one: hybrid_tiny, batch 64, {args.steps} steps, 1 worker, 1 loader worker; "
          f"medians of {args.rounds} rounds")
    print(f"{'launcher':<8} {'wall s':>8} {'start-up s':>11} {'loop s':>8} {'steps/s':>8} {'samples/s':>10}")
    for kind, r in results.items():
        print(f"{kind:<8} {r['wall_s']:>8.1f} {r['startup_s']:>11.1f} {r['loop_s']:>8.1f} "
              f"{r['steps_per_s']:>8.2f} {r['samples_per_s']:>10.0f}")
    ratio = statistics.median(per_round)
    print("ray / local per-step rate by round: " + ", ".join(f"{x:.3f}" for x in per_round)
          + "; ray start-up by round: " + ", ".join(f"{rd['ray']['startup_s']:.1f} s" for rd in rounds))
    startup = results["ray"]["startup_s"]
    print(f"ray / local per-step rate = {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    print(f"ray start-up = {startup:.1f} s (goal <= 15 s: {'met' if startup <= 15 else 'NOT met'}); "
          f"local start-up = {results['local']['startup_s']:.1f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
