#!/usr/bin/env python
"""What the downstream kNN monitor costs stage one, measured in one run.

Runs the same short local stage one twice, without and with `pretrain.monitor_every`, and
prints the monitor's own time as a share of the training loop and the end-to-end slowdown.

    make data && .venv/bin/python scripts/bench_monitor.py [--steps 200 --every 50]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(steps: int, every: int, out: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"output_dir={out}", "launcher.kind=local", f"pretrain.steps={steps}", "pretrain.checkpoint_every=0",
        f"pretrain.monitor_every={every}", "pretrain.data.num_workers=1", "engine.threads=1",
        "tracking.mode=disabled", "finetune.enabled=false",
    ])
    t0 = time.perf_counter()
    p = run_pipeline(cfg)["pretrain"]
    result = json.loads((out / "pretrain" / "result.json").read_text())
    return {"wall_s": time.perf_counter() - t0, "samples_per_s": p["samples_per_s"],
            "monitor_share": p["monitor_share"], "monitor_s": result["monitor_s"],
            "monitor_calls": len(result["monitor_curve"]), "curve": result["monitor_curve"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        off = run(args.steps, 0, Path(tmp) / "off")
        on = run(args.steps, args.every, Path(tmp) / "on")
    print(f"\nstage one, hybrid_tiny, {args.steps} steps, local launcher; monitor every {args.every} steps "
          f"({on['monitor_calls']} calls: digits, 10 shots/class memory, 200 queries)")
    print(f"monitor time {on['monitor_s']:.2f} s = {100 * on['monitor_share']:.1f}% of the training loop "
          f"({on['monitor_s'] / max(on['monitor_calls'], 1):.2f} s per call)")
    print(f"wall: off {off['wall_s']:.1f} s, on {on['wall_s']:.1f} s (x{on['wall_s'] / off['wall_s']:.3f}); "
          f"training samples/s with monitor / without = {on['samples_per_s'] / off['samples_per_s']:.3f}")
    print("kNN accuracy by step: " + ", ".join(f"{s}: {100 * m['digits']:.0f}%" for s, m in on["curve"]))


if __name__ == "__main__":
    main()
