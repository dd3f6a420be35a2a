#!/usr/bin/env python
"""What Ray costs and buys: stage one's per-step rate, the pipeline's fixed Ray cost, and stage
two as parallel trials vs one TorchTrainer per stage.

    make data && .venv/bin/python scripts/bench_launch.py [--part stage-one fixed stage-two] [--rounds 3]

- **stage-one**: the same short stage one with `launcher.kind=local` and `launcher.kind=ray`
  (1 worker). Separates the fixed start-up (driver wall time minus the training loop) from the
  per-step rate (measured inside the loop), so Ray's fixed cost is not mistaken for a slower
  step. Goals: Ray per-step rate >= 0.95 x local; Ray start-up <= 15 s here.
- **fixed**: the whole demo pipeline with almost no work (2 pretraining steps, 2 fine-tuning
  steps, one seed, `assess` on), locally and under Ray with `launcher.stage_two` = `trainer`
  (a TorchTrainer per stage, what the pipeline did before) and `trials` (the default: stage
  two's jobs as Ray tasks). Ray's fixed cost = wall time minus the local launcher's. Goal:
  <= 20 s for the pipeline.
- **stage-two**: the demo's stage two as `make demo` runs it (fine-tune, scratch and `assess`,
  3 seeds of 200 steps, from one stage-one checkpoint made here), `trainer` vs `trials`, driver
  wall time. Goal: trials <= 0.6 x trainer.

Rounds alternate the variants; the tables show medians (a 2-core machine is noisy: single
runs of the stage-one ratio ranged 0.93-1.12 here).
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _run(overrides: list[str], command: str) -> tuple[float, dict[str, Any]]:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    cfg = load_config(DEMO, overrides, command=command)
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, command)
    return time.perf_counter() - t0, summary


def stage_one_once(kind: str, steps: int, out: Path, urls: str) -> dict[str, float]:
    wall, summary = _run([
        f"name=bench-{kind}", f"output_dir={out}", f"launcher.kind={kind}", "launcher.num_workers=1",
        f"pretrain.data.urls={urls}", f"pretrain.steps={steps}", "pretrain.checkpoint_every=0",
        "pretrain.data.num_workers=1", "engine.threads=1", "tracking.mode=disabled",
    ], "pretrain")
    p = summary["pretrain"]
    loop_s = (p["samples_seen"] / p["samples_per_s"]) if p["samples_per_s"] else float("nan")
    return {"wall_s": wall, "loop_s": loop_s, "startup_s": wall - loop_s,
            "steps_per_s": steps / loop_s, "samples_per_s": p["samples_per_s"]}


#: (label, launcher overrides) of the whole-pipeline variants.
VARIANTS = {
    "local": ["launcher.kind=local"],
    "ray trainer": ["launcher.kind=ray", "launcher.stage_two=trainer"],
    "ray trials": ["launcher.kind=ray", "launcher.stage_two=trials"],
}


def fixed_once(variant: str, out: Path, urls: str) -> float:
    wall, _ = _run([
        f"name=fixed-{variant.replace(' ', '-')}", f"output_dir={out}", *VARIANTS[variant],
        f"pretrain.data.urls={urls}", "pretrain.steps=2", "pretrain.checkpoint_every=0",
        "pretrain.optim.warmup_steps=1", "finetune.steps=2", "finetune.optim.warmup_steps=1",
        "finetune.seeds=[0]", "finetune.eval_every=2", "finetune.auto.steps=1", "tracking.mode=disabled",
    ], "run")
    return wall


def stage_two_once(variant: str, out: Path, checkpoint: str) -> dict[str, float]:
    wall, summary = _run([
        f"name=two-{variant.replace(' ', '-')}", f"output_dir={out}", *VARIANTS[variant],
        f"finetune.init_from={checkpoint}", "tracking.mode=disabled",
    ], "finetune")
    return {"wall_s": wall, "finetune_acc": summary["finetune"]["test_accuracy"],
            "scratch_acc": summary["scratch"]["test_accuracy"]}


def median_of(rounds: list[dict[str, Any]], key: str | None = None) -> dict[str, float]:
    return {v: statistics.median(r[v] if key is None else r[v][key] for r in rounds) for v in rounds[0]}


def part_stage_one(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rounds = [{kind: stage_one_once(kind, args.steps, tmp / f"one{r}" / kind, args.urls) for kind in ("local", "ray")}
              for r in range(args.rounds)]
    results = {kind: {key: statistics.median(rd[kind][key] for rd in rounds) for key in rounds[0][kind]}
               for kind in ("local", "ray")}
    per_round = [rd["ray"]["steps_per_s"] / rd["local"]["steps_per_s"] for rd in rounds]
    print(f"\nstage one: hybrid_tiny, batch 64, {args.steps} steps, 1 worker, 1 loader worker; "
          f"medians of {args.rounds} rounds")
    print(f"{'launcher':<8} {'wall s':>8} {'start-up s':>11} {'loop s':>8} {'steps/s':>8} {'samples/s':>10}")
    for kind, r in results.items():
        print(f"{kind:<8} {r['wall_s']:>8.1f} {r['startup_s']:>11.1f} {r['loop_s']:>8.1f} "
              f"{r['steps_per_s']:>8.2f} {r['samples_per_s']:>10.0f}")
    ratio, startup = statistics.median(per_round), results["ray"]["startup_s"]
    print("ray / local per-step rate by round: " + ", ".join(f"{x:.3f}" for x in per_round)
          + "; ray start-up by round: " + ", ".join(f"{rd['ray']['startup_s']:.1f} s" for rd in rounds))
    print(f"ray / local per-step rate = {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    print(f"ray start-up = {startup:.1f} s (goal <= 15 s: {'met' if startup <= 15 else 'NOT met'}); "
          f"local start-up = {results['local']['startup_s']:.1f} s")
    return {"medians": results, "per_step_ratio_by_round": per_round}


def part_fixed(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rounds = [{v: fixed_once(v, tmp / f"fixed{r}" / v.replace(" ", "-"), args.urls) for v in VARIANTS}
              for r in range(args.rounds)]
    walls = median_of(rounds)
    print(f"\nthe demo pipeline with almost no work (2 + 2 steps, 1 seed, assess); medians of {args.rounds} rounds")
    print(f"{'launcher':<12} {'wall s':>8} {'Ray fixed cost s':>17}")
    for v, wall in walls.items():
        cost = "" if v == "local" else f"{wall - walls['local']:>17.1f}"
        print(f"{v:<12} {wall:>8.1f} {cost}")
    cost = walls["ray trials"] - walls["local"]
    print(f"Ray's fixed cost for the pipeline = {cost:.1f} s with trials, {walls['ray trainer'] - walls['local']:.1f} s "
          f"with a TorchTrainer per stage (goal <= 20 s: {'met' if cost <= 20 else 'NOT met'})")
    return {"rounds": rounds, "medians": walls}


def part_stage_two(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # Stage two's cost does not depend on how well stage one learned: a short local stage one.
    _, summary = _run([
        "name=two-pretrain", f"output_dir={tmp / 'two-pretrain'}", "launcher.kind=local",
        f"pretrain.data.urls={args.urls}", "pretrain.steps=20", "pretrain.checkpoint_every=0",
        "pretrain.optim.warmup_steps=2", "tracking.mode=disabled"], "pretrain")
    ckpt = summary["pretrain"]["checkpoint"]
    variants = ("ray trainer", "ray trials")
    rounds = [{v: stage_two_once(v, tmp / f"two{r}" / v.replace(" ", "-"), ckpt) for v in variants}
              for r in range(args.stage_two_rounds)]
    walls = median_of(rounds, "wall_s")
    print(f"\nthe demo's stage two (fine-tune + scratch + assess, 3 seeds x 200 steps); medians of "
          f"{args.stage_two_rounds} round(s)")
    print(f"{'launcher':<12} {'wall s':>8} {'fine-tuned':>11} {'scratch':>8}")
    for v in variants:
        r = rounds[-1][v]
        print(f"{v:<12} {walls[v]:>8.1f} {100 * r['finetune_acc']:>10.1f}% {100 * r['scratch_acc']:>7.1f}%")
    ratio = walls["ray trials"] / walls["ray trainer"]
    print(f"stage two, trials / TorchTrainer per stage = {ratio:.2f} (goal <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'})")
    return {"rounds": rounds, "medians": walls, "ratio": ratio}


PARTS = {"stage-one": part_stage_one, "fixed": part_fixed, "stage-two": part_stage_two}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--steps", type=int, default=150, help="stage-one steps of the stage-one part")
    ap.add_argument("--urls", default=str(REPO / "data" / "fractals" / "fractals-{000000..000019}.tar"))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the stage-one and fixed parts")
    ap.add_argument("--stage-two-rounds", type=int, default=1, help="rounds of the stage-two part (minutes each)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        results = {part: PARTS[part](args, Path(tmp)) for part in args.part}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
