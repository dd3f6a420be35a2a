#!/usr/bin/env python
"""The step loop's hiccup at a checkpoint under Ray with S3 storage: `launcher.checkpoint_upload`
`sync` vs `async`, in one run, against an S3 server on loopback (moto's; the one stand-in, for a
cloud this machine cannot reach).

    make data && .venv/bin/python scripts/bench_checkpoint.py [--model hybrid_base] [--rounds 2]

Each round runs the same short stage one twice on a private Ray (1 worker), checkpointing every
`--every` steps to `s3://.../ray`: once with `sync` (the loop waits until the upload is done),
once with `async` (Ray uploads in a background thread). Stage one records how long the loop
waited at each checkpoint (`checkpoint_s` in its result: state gathered, saved locally,
reported; with `sync`, uploaded). The table shows medians over the non-final checkpoints of all
rounds, the checkpoint's size and the median step time between checkpoints; the ratio is
async / sync. On 2 cores the background upload competes with training for CPU, which this
measures too (the steps right after an async checkpoint are slower).
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
sys.path.insert(0, str(REPO))
DEMO = REPO / "configs" / "demo.yaml"
BUCKET = "transferline-bench"


def start_s3() -> tuple[Any, Any]:
    """moto's S3 server on 127.0.0.1 with one bucket; the environment points every client at it."""
    import logging

    from moto.server import ThreadedMotoServer
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    return server, client


def stage_one(mode: str, run: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    cfg = load_config(DEMO, [
        f"name={run}", f"output_dir={out}", "launcher.kind=ray", "launcher.num_workers=1",
        f"launcher.storage_path=s3://{BUCKET}/ray", f"launcher.checkpoint_upload={mode}",
        f"pretrain.model.name={args.model}", f"pretrain.data.urls={args.urls}", f"pretrain.steps={args.steps}",
        f"pretrain.checkpoint_every={args.every}", "pretrain.keep_checkpoints=2", "pretrain.monitor_every=0",
        f"pretrain.data.batch_size={args.batch}", "pretrain.data.num_workers=1", "engine.log_every=1",
        "tracking.mode=disabled",
    ], command="pretrain")
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, "pretrain")
    wall = time.perf_counter() - t0
    result = json.loads((out / "pretrain" / "result.json").read_text())
    waits = [s for step, s in result["checkpoint_s"] if step != args.steps]
    loop_s = result["samples_seen"] / result["samples_per_s"]
    step_s = (loop_s - sum(s for _, s in result["checkpoint_s"])) / args.steps
    return {"waits": waits, "step_s": step_s, "wall_s": wall, "checkpoint": summary["pretrain"]["checkpoint"]}


def checkpoint_mib(client: Any, run: str) -> float:
    """Size of one checkpoint of `run` in the bucket (its newest)."""
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix=f"ray/{run}-pretrain/checkpoint_").get("Contents", [])
    by_dir: dict[str, int] = {}
    for obj in objects:
        folder = obj["Key"].split("/")[2]
        by_dir[folder] = by_dir.get(folder, 0) + obj["Size"]
    return max(by_dir.values(), default=0) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="hybrid_base")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--urls", default=str(REPO / "data" / "fractals" / "fractals-{000000..000019}.tar"))
    args = ap.parse_args()
    server, client = start_s3()
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    size = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
            for r in range(args.rounds):
                for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                    run = f"ckpt-{mode}-{r}"
                    res = stage_one(mode, run, Path(tmp) / run, args)
                    size[mode] = checkpoint_mib(client, run)
                    runs[mode].append(res)
                    print(f"round {r} {mode}: waits {[round(w, 3) for w in res['waits']]} s, "
                          f"step {res['step_s']:.3f} s, wall {res['wall_s']:.1f} s", flush=True)
    finally:
        server.stop()
    med = {m: statistics.median([w for res in rs for w in res["waits"]]) for m, rs in runs.items()}
    step = {m: statistics.median([res["step_s"] for res in rs]) for m, rs in runs.items()}
    print(f"\n{args.model}, {args.steps} steps, a checkpoint every {args.every}, batch {args.batch}, 1 Ray worker, "
          f"S3 on loopback (moto), {args.rounds} round(s)\n")
    print("| upload | checkpoint size | loop's wait at a checkpoint (median) | step time (median) |")
    print("|---|---|---|---|")
    for m in ("sync", "async"):
        print(f"| `{m}` | {size.get(m, 0):.1f} MiB | {med[m]:.3f} s | {step[m]:.3f} s |")
    print(f"\nasync / sync wait at a checkpoint: {med['async'] / med['sync']:.2f}x "
          f"(goal: the loop does not wait for the upload)")


if __name__ == "__main__":
    main()
