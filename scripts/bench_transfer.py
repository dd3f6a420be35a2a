#!/usr/bin/env python
"""Transfer that pays off: does transferline's pretrain -> fine-tune beat simple baselines on small
real targets? One command, one markdown table and one plot, every figure from the same run.

Over a suite of real small image targets built offline (`scripts/bench_targets.py`: UCI digits,
texture photographs, which-photograph scene patches in colour and in grey), for k shots per
class and several seeds (the same k-shot subsets for every method: transferline's own
`k_shot_indices`), side by side:

- **logreg**: logistic regression on the raw pixels (the classical floor);
- **yardstick** (plain PyTorch, below): a plain 4-block CNN from scratch, and the same CNN
  pretrained on the demo's fractal shards;
- **transferline** `hybrid_tiny` and `resnet_tiny`: `scratch` (its from-scratch baseline),
  `linear_probe`, `full` and `head_then_all`, each fine-tuned from that architecture's stage-one
  checkpoint on the demo's fractal shards, driven through the CLI in subprocesses
  (`transferline pretrain|finetune configs/demo.yaml launcher.kind=local ...`). Every transferline
  setting except target, shots, strategy, seeds (and the input channels of the target) comes from
  the config, so a better recipe there is what this measures.

The yardstick: conv3x3-BN-ReLU-maxpool x 4 (widths 32/64/128/256, 0.39 M parameters), global
average pool + linear head, grayscale input with per-image standardisation, reflect-pad random
crop + horizontal flip, AdamW (lr 1e-3, wd 0.05) with a one-cycle schedule, 200 full-batch steps
at the target's own resolution. "Pretrained" = the same CNN first trained 1,500 steps (batch 128,
same recipe) on the fractal shards at 32 px; its weights are cached under the work dir
(safetensors), and the head is re-created for each target.

    .venv/bin/python scripts/bench_transfer.py --quick        # a few minutes (caches built once)
    .venv/bin/python scripts/bench_transfer.py                 # everything (hours on 2 cores)
    .venv/bin/python scripts/bench_transfer.py --jobs 2 --override finetune.steps=300
    # transfer against stage one's budget: one stage one per value, the kNN monitor's curve beside
    .venv/bin/python scripts/bench_transfer.py --pretrain-steps 400 800 1600 --override pretrain.monitor_every=200

Writes `<out>/bench_transfer.md` (printed too), `<out>/bench_transfer.json` (every per-seed
number, timings, the commands) and `<out>/bench_transfer.png`. Caches (targets, both stages-one,
the yardstick's pretrained weights) live under `--work`; stage-two outputs are redone every run
unless `--resume` (then transferline skips a stage it finished with the same config).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_targets, also in spawned workers

ALL_TARGETS = ("digits", "textures", "scenes", "surfaces")
ALL_ARCHS = ("hybrid_tiny", "resnet_tiny")
ALL_STRATEGIES = ("scratch", "linear_probe", "full", "head_then_all")
YARDSTICK_VERSION = 1

# Environment of every child: one intra-op thread per process (the machine is shared), offline.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
             "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _one_thread() -> None:
    os.environ.update(CHILD_ENV)
    import torch

    torch.set_num_threads(1)


# =============================================================================================
# The yardstick: a plain CNN in plain PyTorch
# =============================================================================================

def plain_cnn(num_classes: int, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256)):
    """conv3x3-BN-ReLU-maxpool blocks, global average pool, linear head (``head``). The pools use
    ``ceil_mode`` so that any resolution works (8 px digits: 8 -> 4 -> 2 -> 1 -> 1)."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    c = in_chans
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2, ceil_mode=True)]
        c = w

    class PlainCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(c, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    return PlainCNN()


def to_gray_standardised(x_uint8):
    """uint8 ``[N, H, W, C]`` -> float ``[N, 1, H, W]``: grey (ITU-R 601 luma, as PIL's "L"),
    then per-image standardisation (mean 0, std 1; std floored at 1/sqrt(pixels))."""
    import torch

    x = torch.as_tensor(x_uint8).float().div_(255.0)
    if x.shape[-1] == 3:
        x = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    else:
        x = x[..., 0]
    x = x[:, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1.0 / math.sqrt(x[0].numel()))
    return (x - mean) / std


def crop_flip(x, gen):
    """Reflect-pad (size // 8, at least 1 px) random crop back to size, and a horizontal flip with
    probability 1/2, independently per image; ``x`` is ``[N, C, H, W]``."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    p = max(1, min(h, w) // 8)
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = oy[:, None] + torch.arange(h)
    cols = ox[:, None] + torch.arange(w)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def train_cnn(model, x, y, *, steps: int, batch_size: int | None, lr: float = 1e-3, weight_decay: float = 0.05,
              seed: int = 0, log=None) -> list[float]:
    """AdamW + one-cycle; full-batch when ``batch_size`` is None, else epoch-shuffled batches.
    Fresh crop/flip every step. Returns the loss per step."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    losses, order, pos = [], torch.randperm(len(x), generator=gen), 0
    t0 = time.perf_counter()
    for step in range(steps):
        if batch_size is None:
            xb, yb = x, y
        else:
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(x), generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(model(crop_flip(xb, gen)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps} loss {loss:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(step + 1) / (time.perf_counter() - t0):.1f} steps/s")
    return losses


def accuracy(model, x, y, batch: int = 1024) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))


def read_fractal_shards(folder: Path) -> tuple[Any, Any, int]:
    """Every ``.png``/``.cls`` sample of the demo's fractal shards (``_info.json`` lists them) as
    uint8 ``[N, H, W, 1]`` grey images and labels."""
    import io

    import numpy as np
    from PIL import Image

    info = json.loads((folder / "_info.json").read_text())
    images, labels = [], []
    for shard in info["shards"]:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(folder / shard["url"]) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.rpartition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(samples):
            s = samples[key]
            if "png" in s and "cls" in s:
                images.append(np.asarray(Image.open(io.BytesIO(s["png"])).convert("L")))
                labels.append(int(s["cls"].decode().strip()))
    return np.stack(images)[..., None], np.asarray(labels, dtype=np.int64), int(info["num_classes"])


def yardstick_pretrain(fractals: str, cache_dir: str, steps: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Pretrain the yardstick on the fractal shards once; cached as safetensors + json by settings."""
    _one_thread()
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(fractals)
    info = json.loads((folder / "_info.json").read_text())
    key = hashlib.sha1(json.dumps({"v": YARDSTICK_VERSION, "steps": steps, "batch": batch_size, "seed": seed,
                                   "info": info}, sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(cache_dir)
    weights, meta_path = cache / f"pretrained-{key}.safetensors", cache / f"pretrained-{key}.json"
    if weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        load_file(str(weights))  # readable
        return {**meta, "cached": True, "wall_s": 0.0}
    t0 = time.perf_counter()
    x_np, y_np, num_classes = read_fractal_shards(folder)
    read_s = time.perf_counter() - t0
    x, y = to_gray_standardised(x_np), torch.as_tensor(y_np)
    torch.manual_seed(seed)
    model = plain_cnn(num_classes)
    log_path = cache / f"pretrained-{key}.log"
    cache.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        def log(msg: str) -> None:
            print(msg, file=log_file, flush=True)

        t1 = time.perf_counter()
        losses = train_cnn(model, x, y, steps=steps, batch_size=batch_size, seed=seed, log=log)
        train_s = time.perf_counter() - t1
        train_acc = accuracy(model, x, y)
        log(f"train accuracy (no augmentation) {train_acc:.4f}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights.with_suffix(".tmp")))
    os.replace(weights.with_suffix(".tmp"), weights)
    meta = {"weights": str(weights), "steps": steps, "batch_size": batch_size, "num_classes": num_classes,
            "num_images": int(len(x)), "img_size": int(x.shape[-1]), "final_loss": losses[-1],
            "train_accuracy": train_acc, "read_s": read_s, "train_s": train_s,
            "num_params": sum(p.numel() for p in model.parameters()), "log": str(log_path)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return {**meta, "cached": False, "wall_s": time.perf_counter() - t0}


def yardstick_finetune(target_dir: str, k: int, seeds: list[int], weights: str | None, steps: int) -> dict[str, Any]:
    """The yardstick on one target at k shots, per seed: scratch (``weights`` None) or pretrained.
    Cached beside the weights by (target build, k, seeds, steps, weights, script version): it
    does not depend on transferline's code, so recipe variants do not redo it."""
    stamp = Path(target_dir).with_suffix(".json")  # what bench_targets.ensure_target built
    build = json.loads(stamp.read_text()) if stamp.is_file() else {"unstamped": time.time()}  # no stamp: no reuse
    key = hashlib.sha1(json.dumps({"v": YARDSTICK_VERSION, "target": str(target_dir), "build": build, "k": k,
                                   "seeds": seeds, "steps": steps, "weights": weights}, sort_keys=True).encode())
    cache = Path(target_dir).parent.parent / "yardstick" / "finetune" / f"{key.hexdigest()[:12]}.json"
    if cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}
    result = _yardstick_finetune(target_dir, k, seeds, weights, steps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def _yardstick_finetune(target_dir: str, k: int, seeds: list[int], weights: str | None, steps: int) -> dict[str, Any]:
    _one_thread()
    import torch
    from safetensors.torch import load_file

    from bench_targets import target_arrays
    from pipeline.data.target import k_shot_indices

    t0 = time.perf_counter()
    a = target_arrays(target_dir)
    x_train, x_test = to_gray_standardised(a["x_train"]), to_gray_standardised(a["x_test"])
    y_train, y_test = torch.as_tensor(a["y_train"]), torch.as_tensor(a["y_test"])
    state = load_file(weights) if weights else None
    per_seed = []
    for seed in seeds:
        idx = torch.as_tensor(k_shot_indices(a["y_train"].tolist(), k, seed))
        torch.manual_seed(seed)
        model = plain_cnn(len(a["classes"]))
        if state is not None:
            missing, unexpected = model.load_state_dict(
                {n: v for n, v in state.items() if not n.startswith("head.")}, strict=False)
            assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected, (missing, unexpected)
        t1 = time.perf_counter()
        losses = train_cnn(model, x_train[idx], y_train[idx], steps=steps, batch_size=None, seed=seed)
        per_seed.append({"seed": seed, "test_accuracy": accuracy(model, x_test, y_test),
                         "final_train_loss": losses[-1], "wall_s": time.perf_counter() - t1})
    return {"per_seed": per_seed, "wall_s": time.perf_counter() - t0, "test_size": int(len(y_test)),
            "img_size": int(x_train.shape[-1])}


def logreg(target_dir: str, k: int, seeds: list[int]) -> dict[str, Any]:
    """Logistic regression (L2, C=1, lbfgs) on the raw pixels in [0, 1], stored channels."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from bench_targets import target_arrays
    from pipeline.data.target import k_shot_indices

    t0 = time.perf_counter()
    a = target_arrays(target_dir)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0  # noqa: E731
    x_train, x_test = flat(a["x_train"]), flat(a["x_test"])
    per_seed = []
    for seed in seeds:
        idx = k_shot_indices(a["y_train"].tolist(), k, seed)
        clf = LogisticRegression(C=1.0, max_iter=5000).fit(x_train[idx], a["y_train"][idx])
        per_seed.append({"seed": seed, "test_accuracy": float((clf.predict(x_test) == a["y_test"]).mean())})
    return {"per_seed": per_seed, "wall_s": time.perf_counter() - t0}


# =============================================================================================
# transferline through its CLI
# =============================================================================================

TRANSFERLINE = str(Path(sys.executable).with_name("transferline"))


def code_fingerprint(config: str | os.PathLike) -> str:
    """sha1 of transferline's source (pipeline/, architectures/) and the config: the checkout is
    shared, so every transferline job records the code it ran, and the report says if it changed."""
    h = hashlib.sha1()
    files = sorted(p for d in ("pipeline", "architectures") for p in (REPO / d).rglob("*.py"))
    for path in [*files, Path(config)]:
        try:
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
        except OSError:  # a file moved away mid-walk: it is part of a change anyway
            h.update(str(path).encode())
    return h.hexdigest()[:10]


def config_samples_steps(config: str | os.PathLike, overrides: list[str]) -> int:
    """Stage-one steps of one local process that see as many samples as the config's own stage one:
    `pretrain.steps` x the launcher's data-parallel workers (each rank keeps its batch size), so the
    bench measures the checkpoint `transferline run` on that config would hand on (the demo: 800 steps
    on 2 Ray workers -> 1600)."""
    from pipeline.config import load_config

    cfg = load_config(config, overrides, command="pretrain")
    return cfg.pretrain.steps * (1 if cfg.launcher.kind == "local" else cfg.launcher.num_workers)


def run_cli(cmd: list[str], log_path: str) -> float:
    """Run one transferline command (one thread per process), its output to ``log_path``."""
    _one_thread()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV})
    if proc.returncode != 0:
        tail = Path(log_path).read_text().splitlines()[-15:]
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def tl_pretrain(cmd: list[str], output_dir: str, log_path: str) -> dict[str, Any]:
    """Stage one, unless this output dir already holds its finished checkpoint (cached)."""
    summary_path = Path(output_dir) / "summary.json"
    if summary_path.is_file():
        p = json.loads(summary_path.read_text()).get("pretrain") or {}
        if p.get("checkpoint") and Path(p["checkpoint"]).is_dir():
            return {**p, "cached": True, "cli_wall_s": 0.0}
    code = code_fingerprint(cmd[2])
    wall = run_cli(cmd, log_path)
    p = json.loads(summary_path.read_text())["pretrain"]
    return {**p, "cached": False, "cli_wall_s": wall, "code": code}


def tl_finetune(cmd: list[str], output_dir: str, log_path: str, fresh: bool) -> dict[str, Any]:
    """Stage two (and its from-scratch baseline when the command asks for it)."""
    if fresh:
        shutil.rmtree(output_dir, ignore_errors=True)
    code = code_fingerprint(cmd[2])
    wall = run_cli(cmd, log_path)
    summary = json.loads((Path(output_dir) / "summary.json").read_text())
    out: dict[str, Any] = {"cli_wall_s": wall, "code": code}
    for stage in ("finetune", "scratch"):
        if stage in summary:
            s = summary[stage]
            out[stage] = {"per_seed": [{"seed": r["seed"], "test_accuracy": r["test_accuracy"]} for r in s["per_seed"]],
                          "test_accuracy": s["test_accuracy"], "test_accuracy_std": s["test_accuracy_std"],
                          **{k: s.get(k) for k in ("strategy", "steps", "img_size", "in_chans", "train_size",
                                                   "test_size", "num_classes", "wall_s")}}
    return out


def tl_assess(cmd: list[str], log_path: str) -> dict[str, Any]:
    """`transferline assess --json`: its prediction of fine-tuning's gain over scratch."""
    code = code_fingerprint(cmd[5])
    wall = run_cli(cmd, log_path)
    text = Path(log_path).read_text()
    start = next(m.start() for m in re.finditer(r"^\{$", text, flags=re.M))
    result, _ = json.JSONDecoder().raw_decode(text[start:])
    g = result.get("vs_scratch") or {}
    return {"cli_wall_s": wall, "code": code, "verdict": result["verdict"], "knn_gap": result["gap"]["knn"],
            **{k: g.get(k) for k in ("gain", "interval", "call", "folds", "steps", "strategy")}}


def assess_row(row: dict, arch: str) -> tuple[str, str, str] | None:
    """(predicted, measured, outcome) of one target and k: assess's cross-validated call
    against the measured full - scratch over seeds (paired by seed: the same shots). The call
    must have the measured sign wherever the measured gain exceeds its spread over seeds."""
    a, ft, sc = row.get(f"{arch}/assess"), row.get(f"{arch}/full"), row.get(f"{arch}/scratch")
    if not a or a.get("error") or not ft or ft.get("error") or not sc or sc.get("error") or a.get("gain") is None:
        return None
    by_seed = {r["seed"]: r["test_accuracy"] for r in sc["per_seed"]}
    diffs = [r["test_accuracy"] - by_seed[r["seed"]] for r in ft["per_seed"] if r["seed"] in by_seed]
    mean, spread = statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
    lo, hi = a["interval"]
    predicted = f"{100 * a['gain']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {a['call']}"
    measured = f"{100 * mean:+.1f} ± {100 * spread:.1f}"
    if abs(mean) <= spread:
        outcome = "inside the spread"
    elif a["call"] in ("likely to help", "likely to hurt"):
        outcome = "right" if (a["call"] == "likely to help") == (mean > 0) else "**wrong**"
    else:
        outcome = f"missed ({a['call']})"
    return predicted, measured, outcome


def assess_markdown(results: dict, meta: dict) -> list[str]:
    """Part 6's table: does `assess` predict the sign of the gain over scratch?"""
    lines: list[str] = []
    for arch in meta["archs"]:
        rows = [(t, k, assess_row(results.get(t, {}).get(str(k), {}), arch))
                for t in meta["targets"] for k in meta["shots"]]
        rows = [(t, k, r) for t, k, r in rows if r]
        if not rows:
            continue
        decided = [r for _, _, r in rows if r[2] != "inside the spread"]
        right = sum(r[2] == "right" for r in decided)
        lines += ["", f"### Does `assess` predict the gain over scratch? ({arch}, `full`)", "",
                  "Predicted: `transferline assess` on seed 0's shots (fine-tuning vs scratch, cross-validated, "
                  "90% paired interval). Measured: full - scratch on the test split, mean ± std over seeds.", "",
                  "| target | k | predicted gain [interval] call | measured gain | outcome |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {k} | {r[0]} | {r[1]} | {r[2]} |" for t, k, r in rows]
        lines += ["", f"Right on {right} of the {len(decided)} rows where the measured gain exceeds its spread "
                  f"({len(rows) - len(decided)} rows inside the spread)."]
    return lines


# =============================================================================================
# A small dependency-aware process pool
# =============================================================================================

@dataclass
class Job:
    key: str
    fn: Any
    args: tuple
    deps: tuple[str, ...] = ()
    priority: float = 0.0              # larger first among ready jobs
    bind: Any = None                   # (results of deps) -> extra args, resolved at submit time
    cache: Path | None = None          # the finished result is kept here (reused by --resume)
    result: Any = None
    error: str | None = None
    wall_s: float = 0.0
    reused: bool = False
    started: float = field(default=0.0, repr=False)


def run_jobs(jobs: list[Job], workers: int, say, on_done=None) -> dict[str, Job]:
    """Run ``jobs`` on ``workers`` spawned processes, each job once its ``deps`` are done (highest
    ``priority`` first); ``on_done(done)`` after every finished job. Returns the jobs by key."""
    by_key = {j.key: j for j in jobs}
    pending, running, done = dict(by_key), {}, {}
    for job in jobs:  # finished in an earlier, interrupted call (only with --resume: see main)
        if job.cache is not None and job.cache.is_file():
            saved = json.loads(job.cache.read_text())
            job.result, job.wall_s, job.reused = saved["result"], saved["wall_s"], True
            done[job.key] = pending.pop(job.key)
    if done:
        say(f"  {len(done)} jobs finished in an earlier call of this run: kept")
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_one_thread) as pool:
        while pending or running:
            for key, job in list(pending.items()):  # a failed dependency fails its dependents
                bad = [d for d in job.deps if d in done and done[d].error]
                if bad:
                    job.error = f"dependency {bad[0]} failed"
                    done[key] = pending.pop(key)
                    say(f"  skip {key}: {job.error}")
            ready = sorted((j for j in pending.values() if all(d in done for d in j.deps)),
                           key=lambda j: -j.priority)
            while ready and len(running) < workers:
                job = ready.pop(0)
                pending.pop(job.key)
                args = job.args + (tuple(job.bind({d: done[d].result for d in job.deps})) if job.bind else ())
                job.started = time.perf_counter()
                running[pool.submit(job.fn, *args)] = job
                say(f"  start {job.key}")
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                job.wall_s = time.perf_counter() - job.started
                try:
                    job.result = fut.result()
                    say(f"  done  {job.key} ({job.wall_s:.0f} s)")
                    if job.cache is not None:
                        job.cache.parent.mkdir(parents=True, exist_ok=True)
                        tmp = job.cache.with_suffix(".tmp")
                        tmp.write_text(json.dumps({"key": job.key, "wall_s": job.wall_s, "result": job.result}))
                        os.replace(tmp, job.cache)
                except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
                    job.error = f"{type(e).__name__}: {e}"
                    say(f"  FAIL  {job.key} ({job.wall_s:.0f} s): {job.error}")
                    if not isinstance(e, RuntimeError):
                        traceback.print_exception(e)
                done[job.key] = job
            if on_done is not None:
                try:
                    on_done(done)
                except Exception:  # noqa: BLE001 - a partial report must never stop the run
                    traceback.print_exc()
    return done


# =============================================================================================
# Report
# =============================================================================================

def stats(per_seed: list[dict]) -> tuple[float, float]:
    accs = [r["test_accuracy"] for r in per_seed]
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def cell(entry: dict | None, best: float | None) -> str:
    if entry is None:
        return "—"
    if entry.get("error"):
        return "failed"
    m, s = stats(entry["per_seed"])
    text = f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"**{text}**" if best is not None and abs(m - best) < 1e-12 else text


def method_columns(strategies: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The baselines, then each transferline label's strategies (``{label: [strategy, ...]}``)."""
    cols = [("logreg", "logreg floor"), ("yardstick/scratch", "yardstick scratch"),
            ("yardstick/pretrained", "yardstick pretrained")]
    # From scratch is one column per architecture, whatever the stage-one budget in its label.
    cols += [(f"{a}/{s}", f"{a.split('@')[0] if s == 'scratch' else a} {s}")
             for a, strats in strategies.items() for s in strats]
    return cols


def markdown(results: dict, meta: dict, cols: list[tuple[str, str]]) -> str:
    from pipeline.results import monitor_readings

    lines = ["# Transfer that pays off: transferline vs baselines on small real targets", ""]
    if not meta.get("complete", True):
        lines += [f"**Partial: {meta['jobs_done']} jobs finished so far; the run is still going.**", ""]
    lines += [
             f"- command: `{meta['command']}`",
             f"- git commit: `{meta['commit']}`{' (working tree has uncommitted changes)' if meta['dirty'] else ''}",
             f"- date: {meta['date']}; host: {meta['host']}; torch {meta['torch']}; {meta['jobs']} parallel jobs, "
             f"1 thread each",
             f"- transferline: `{meta['config']}` (sha1 {meta['config_sha1'][:10]}) + "
             f"`{' '.join(meta['tl_fixed_overrides'])}`"
             + (f" + user overrides `{' '.join(meta['overrides'])}`" if meta["overrides"] else ""),
             f"- transferline source + config fingerprint at start `{meta['code_at_start']}`"
             + (f"; **transferline's source or config changed during the run: stage-two jobs ran versions "
                f"{meta['code_seen']} (each job's in the JSON)**"
                if set(meta["code_seen"]) - {meta["code_at_start"]} else ""),
             f"- seeds {meta['seeds']}; k-shot subsets drawn per seed by transferline's `k_shot_indices` "
             f"(identical for every method); accuracy on each target's full test split, mean ± std over seeds (%)"]
    for arch, p in meta.get("tl_pretrain", {}).items():
        if p.get("error"):
            lines.append(f"- stage one `{arch}`: failed: {p['error']}")
        else:
            lines.append(f"- stage one `{arch}`: {p['steps']} steps, final loss {p['final_loss']:.3f}, "
                         f"{p['num_params'] / 1e6:.2f} M params, {p['wall_s']:.0f} s, checkpoint `{os.path.relpath(p['checkpoint'], REPO)}`"
                         f"{' (cached)' if p.get('cached') else ''}"
                         + (f"; kNN monitor: {monitor_readings(p['monitor_curve'])}" if p.get("monitor_curve") else ""))
    y = meta.get("yardstick_pretrain")
    if y and not y.get("error"):
        lines.append(f"- yardstick: {y['num_params'] / 1e6:.2f} M params (fractal head); pretrained {y['steps']} steps "
                     f"x batch {y['batch_size']} on {y['num_images']} fractal images ({y['num_classes']} classes, "
                     f"grey, {y['img_size']} px): train accuracy {100 * y['train_accuracy']:.1f}%, final loss "
                     f"{y['final_loss']:.3f}, {y['train_s']:.0f} s{' (cached)' if y.get('cached') else ''}; fine-tune "
                     f"{meta['yardstick_steps']} full-batch steps")
    lines.append("- targets: " + "; ".join(f"`{t}` {d['classes']} classes, {d['img_size']} px {d['mode']}, "
                                            f"{d['train']} train / {d['test']} test"
                                            for t, d in meta["targets"].items()))
    if meta.get("jobs_reused"):
        lines.append(f"- resumed (`--resume`): {len(meta['jobs_reused'])} jobs were kept from an earlier, interrupted "
                     f"call of this run (listed in the JSON; each job's source fingerprint is its own)")
    lines += ["", "| target | k | " + " | ".join(label for _, label in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for target in meta["targets"]:
        for k in meta["shots"]:
            row = results.get(target, {}).get(str(k), {})
            means = [stats(row[c]["per_seed"])[0] for c, _ in cols
                     if c in row and not row[c].get("error")]
            best = max(means) if means else None
            lines.append(f"| {target} | {k} | " + " | ".join(cell(row.get(c), best) for c, _ in cols) + " |")
    lines.append("")
    lines.append("Best mean per row in bold.")
    lines += assess_markdown(results, meta)
    lines += ["", "Timings (wall seconds; jobs overlap, so parts sum to more than the total):", ""]
    lines += [f"- {name}: {secs:.0f} s" for name, secs in meta["timings"].items()]
    if meta.get("failures"):
        lines += ["", "Failures:", ""] + [f"- `{k}`: {v.splitlines()[0]}" for k, v in meta["failures"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, meta: dict, cols: list[tuple[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, shots = list(meta["targets"]), meta["shots"]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets) + 2.5, 4.2), squeeze=False)
    palette = {"hybrid_tiny": plt.cm.Blues, "resnet_tiny": plt.cm.Oranges}
    strategies = ALL_STRATEGIES
    styles: dict[str, dict] = {"logreg": dict(color="0.55", ls=":", marker="s"),
                               "yardstick/scratch": dict(color="k", ls="--", marker="o", mfc="white"),
                               "yardstick/pretrained": dict(color="k", ls="-", marker="o")}
    for c, _ in cols:
        if c.count("/") and not c.startswith("yardstick"):
            label, strategy = c.split("/")
            arch = label.split("@")[0]
            cmap = palette.get(arch, plt.cm.Greens)
            shade = 0.45 + 0.5 * strategies.index(strategy) / (len(strategies) - 1)
            styles[c] = dict(color=cmap(shade), ls="--" if strategy == "scratch" else "-",
                             marker="^" if arch == "hybrid_tiny" else "v",
                             mfc="white" if strategy == "scratch" else None)
    width = 0.5 / max(1, len(cols))
    for ax, target in zip(axes[0], targets):
        for i, (c, label) in enumerate(cols):
            xs, ms, ss = [], [], []
            for j, k in enumerate(shots):
                entry = results.get(target, {}).get(str(k), {}).get(c)
                if entry and not entry.get("error"):
                    m, s = stats(entry["per_seed"])
                    xs.append(j + (i - (len(cols) - 1) / 2) * width)
                    ms.append(100 * m)
                    ss.append(100 * s)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, label=label, capsize=2, ms=5, lw=1.2, **styles[c])
        d = meta["targets"][target]
        ax.set_title(f"{target} ({d['classes']} classes, {d['img_size']} px {d['mode']})")
        ax.set_xticks(range(len(shots)), [f"k={k}" for k in shots])
        ax.set_xlim(-0.5, len(shots) - 0.5)
        ax.axhline(100 / d["classes"], color="0.8", lw=0.8, zorder=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"transfer on small real targets ({meta['commit'][:10]}; grey line = chance)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================
# Main
# =============================================================================================

def git_commit() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a few-minute subset: digits + scenes, k=5, hybrid_tiny, scratch/linear_probe/full "
                         "(explicit --targets/--shots/--archs/--strategies/--seeds still win)")
    ap.add_argument("--targets", nargs="+", choices=ALL_TARGETS)
    ap.add_argument("--shots", nargs="+", type=int, help="k shots per class (default 2 5 10)")
    ap.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2")
    ap.add_argument("--archs", nargs="+", help="transferline architectures (default hybrid_tiny resnet_tiny)")
    ap.add_argument("--strategies", nargs="+", choices=ALL_STRATEGIES, help="default: all four")
    ap.add_argument("--no-transferline", action="store_true", help="baselines only")
    ap.add_argument("--no-assess", dest="assess", action="store_false",
                    help="skip `transferline assess` (run by default where full and scratch both run: its call "
                         "on the gain over scratch is checked against the measured gain)")
    ap.add_argument("--config", default="configs/demo.yaml", help="transferline config (default configs/demo.yaml)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra transferline override, passed to every transferline call (repeatable)")
    ap.add_argument("--pretrain-steps", nargs="+", type=int, default=None,
                    help="stage-one steps of one local process (default: as many samples as the config's own stage "
                         "one, pretrain.steps x launcher.num_workers: 800 for the demo); several values "
                         "give one stage one per budget and columns `<arch>@<steps>` (from scratch once per arch): "
                         "transfer against the pretraining budget, in one run")
    ap.add_argument("--keep-eval-every", action="store_true",
                    help="keep the config's finetune.eval_every (default: evaluate only at step 0 and the end, "
                         "which changes no reported number and saves up to half of stage two's time)")
    ap.add_argument("--yardstick-pretrain-steps", type=int, default=1500)
    ap.add_argument("--yardstick-batch", type=int, default=128)
    ap.add_argument("--yardstick-steps", type=int, default=200)
    ap.add_argument("--fractals", default="data/fractals", help="the demo's fractal shards (built if missing)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes, one thread each (default 2)")
    ap.add_argument("--work", default="runs/bench_transfer", help="caches: targets, stage-one checkpoints, "
                    "yardstick weights")
    ap.add_argument("--out", default=None, help="results (default <work>/quick or <work>/full)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run into the same --out: keep the jobs it finished "
                         "(<out>/jobs/*.json) and transferline's finished stages, instead of redoing them")
    args = ap.parse_args(argv)
    quick = args.quick
    args.targets = args.targets or (["digits", "scenes"] if quick else list(ALL_TARGETS))
    args.shots = args.shots or ([5] if quick else [2, 5, 10])
    args.seeds = args.seeds or [0, 1, 2]
    args.archs = [] if args.no_transferline else (args.archs or (["hybrid_tiny"] if quick else list(ALL_ARCHS)))
    args.strategies = args.strategies or (["scratch", "linear_probe", "full"] if quick else list(ALL_STRATEGIES))
    args.out = args.out or str(Path(args.work) / ("quick" if quick else "full"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    _one_thread()
    import numpy as np
    import torch
    from datasets import load_from_disk

    from bench_targets import TARGETS, ensure_target, in_chans

    t_start = time.perf_counter()
    work, out = (REPO / args.work).resolve(), (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    command = shlex.join([".venv/bin/python", os.path.relpath(__file__, REPO),
                          *(argv if argv is not None else sys.argv[1:])])
    config_path = (REPO / args.config).resolve()
    config_text = config_path.read_text()
    timings: dict[str, float] = {}

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # ---- data ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    fractals = (REPO / args.fractals).resolve()
    if not (fractals / "_info.json").is_file():
        say(f"building the embedded data under {fractals.parent} (transferline data embedded)")
        subprocess.run([TRANSFERLINE, "data", "embedded", "--root", str(fractals.parent)], cwd=REPO, check=True,
                       env={**os.environ, **CHILD_ENV}, stdout=subprocess.DEVNULL)
    target_dirs: dict[str, str] = {}
    target_info: dict[str, dict] = {}
    for name in args.targets:
        path, built = ensure_target(name, work / "targets")
        target_dirs[name] = str(path)
        spec = TARGETS[name]
        ds = load_from_disk(str(path))
        target_info[name] = {"classes": len(spec.classes), "img_size": spec.img_size, "mode": spec.mode,
                             "train": len(ds["train"]), "test": len(ds["test"]), "path": str(path)}
        smallest = int(np.bincount(ds["train"]["label"]).min())
        if max(args.shots) > smallest:
            raise SystemExit(f"{name}: k={max(args.shots)} exceeds its smallest training class ({smallest})")
        say(f"target {name}: {target_info[name]} ({'built' if built else 'cached'})")
    timings["targets (build or load)"] = time.perf_counter() - t0

    # ---- the classical floor, in this process (milliseconds per fit) -------------------------
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {t: {str(k): {} for k in args.shots} for t in args.targets}
    for name in args.targets:
        for k in args.shots:
            results[name][str(k)]["logreg"] = logreg(target_dirs[name], k, args.seeds)
    timings["logreg floor"] = time.perf_counter() - t0
    say(f"logreg floor done ({timings['logreg floor']:.1f} s)")

    # ---- the jobs: stage ones first, then everything that depends on them -------------------
    fixed = ["launcher.kind=local", "tracking.mode=disabled"]
    ft_fixed = ["finetune.assess=false"] + ([] if args.keep_eval_every else ["finetune.eval_every=1000000"])
    # One stage one per (architecture, budget); the label names its columns and jobs.
    from pipeline.config import ConfigError

    try:  # also checks the config and every --override before any job starts
        config_budget = config_samples_steps(config_path, args.override)
    except ConfigError as e:
        raise SystemExit(f"{os.path.relpath(config_path, REPO)} with --override: {e}") from None
    budgets = args.pretrain_steps or [config_budget]
    runs = [(arch if len(budgets) == 1 else f"{arch}@{steps}", arch, steps, i == 0)
            for arch in args.archs for i, steps in enumerate(budgets)]
    jobs: list[Job] = []
    jobs.append(Job("yardstick/pretrain", yardstick_pretrain,
                    (str(fractals), str(work / "yardstick"), args.yardstick_pretrain_steps, args.yardstick_batch),
                    priority=100))
    for name in args.targets:
        for k in args.shots:
            jobs.append(Job(f"yardstick/scratch/{name}/k{k}", yardstick_finetune,
                            (target_dirs[name], k, args.seeds, None, args.yardstick_steps), priority=1))
            jobs.append(Job(f"yardstick/pretrained/{name}/k{k}", yardstick_finetune,
                            (target_dirs[name], k, args.seeds), deps=("yardstick/pretrain",), priority=1,
                            bind=lambda r: (r["yardstick/pretrain"]["weights"], args.yardstick_steps)))
    # The strategy whose job also runs the from-scratch baseline (same command: scratch.enabled=true).
    carrier = next((s for s in ("full", "head_then_all", "linear_probe") if s in args.strategies), "full")
    shown = [s for s in args.strategies if s != "scratch"]
    # Stage two's overrides do not change stage one: variants of a fine-tuning recipe share its checkpoint.
    stage_one_over = [o for o in args.override if not o.split("=", 1)[0].startswith(("finetune.", "scratch."))]
    # Scratch does not depend on stage one: with several budgets it runs beside the first one only,
    # and the later labels borrow it (scratch_of) for their gains and `assess` rows.
    scratch_of: dict[str, str] = {}
    shown_strats: dict[str, list[str]] = {}
    for label, arch, steps, first in runs:
        pre_over = [f"pretrain.steps={steps}"]
        runs_scratch = "scratch" in args.strategies and first
        if "scratch" in args.strategies and not first:
            scratch_of[label] = next(lab for lab, a, _, f in runs if a == arch and f)
        shown_strats[label] = [s for s in ALL_STRATEGIES if s in shown or (s == "scratch" and runs_scratch)]
        tl_strats = list(shown)
        if runs_scratch and carrier not in tl_strats:
            tl_strats.append(carrier)  # scratch needs a fine-tune beside it; that one is run but not shown
        # The code is part of the key: a changed architecture default must not reuse an old checkpoint.
        fingerprint = hashlib.sha1(json.dumps([config_text, arch, pre_over, stage_one_over,
                                               code_fingerprint(config_path)]).encode()).hexdigest()[:8]
        pdir = work / "pretrain" / f"{arch}-{fingerprint}"
        cmd = [TRANSFERLINE, "pretrain", str(config_path), *fixed, f"name=bench-{arch}-{fingerprint}",
               f"output_dir={pdir}", f"pretrain.model.name={arch}", *pre_over, *stage_one_over]
        jobs.append(Job(f"{label}/pretrain", tl_pretrain, (cmd, str(pdir), str(pdir / "bench.log")), priority=90))
        for name in args.targets:
            for k in args.shots:
                for strategy in tl_strats:
                    odir = out / "finetune" / label / name / f"k{k}" / strategy
                    with_scratch = runs_scratch and strategy == carrier
                    base = [TRANSFERLINE, "finetune", str(config_path), *fixed, f"name=bench-{arch}-{name}-k{k}-{strategy}",
                            f"output_dir={odir}", f"finetune.data.source={target_dirs[name]}",
                            f"finetune.data.shots_per_class={k}", f"finetune.data.in_chans={in_chans(name)}",
                            f"finetune.strategy={strategy}", f"finetune.seeds=[{','.join(map(str, args.seeds))}]",
                            f"scratch.enabled={'true' if with_scratch else 'false'}", *ft_fixed]
                    jobs.append(Job(
                        f"{label}/{strategy}/{name}/k{k}", tl_finetune, (), deps=(f"{label}/pretrain",),
                        priority=10 + (5 if with_scratch else 0) + k / 10,
                        bind=lambda r, base=base, label=label, odir=odir: (
                            [*base, f"finetune.init_from={r[f'{label}/pretrain']['checkpoint']}", *args.override],
                            str(odir), str(odir.parent / f"{odir.name}.log"), not args.resume)))
        if args.assess and {"full", "scratch"} <= set(args.strategies):
            for name in args.targets:
                for k in args.shots:
                    odir = out / "assess" / label / name / f"k{k}"
                    base = [TRANSFERLINE, "assess", "--json", "--checkpoint", None, str(config_path), *fixed,
                            f"finetune.data.source={target_dirs[name]}", f"finetune.data.shots_per_class={k}",
                            f"finetune.data.in_chans={in_chans(name)}", "finetune.strategy=full",
                            f"finetune.seeds=[{args.seeds[0]}]", *ft_fixed]
                    jobs.append(Job(
                        f"{label}/assess/{name}/k{k}", tl_assess, (), deps=(f"{label}/pretrain",), priority=5,
                        bind=lambda r, base=base, label=label, odir=odir: (
                            [*base[:4], r[f"{label}/pretrain"]["checkpoint"], *base[5:], *args.override],
                            str(odir.with_suffix(".log")))))
    jobs_dir = out / "jobs"
    if not args.resume:
        shutil.rmtree(jobs_dir, ignore_errors=True)
    for job in jobs:
        if not job.key.endswith("/pretrain"):  # the stages one have their own caches
            job.cache = jobs_dir / (job.key.replace("/", "__") + ".json")
    say(f"{len(jobs)} jobs on {args.jobs} processes (one thread each); logs under {out}/finetune and {work}")
    labels = [label for label, *_ in runs]
    cols = method_columns(shown_strats)
    n_jobs = len(jobs)
    code_at_start = code_fingerprint(config_path)

    def collect(done: dict[str, Job], final: bool) -> dict[str, str]:
        """Table, JSON and plot from the jobs finished so far (rewritten after every job: a long
        run shows its partial table, marked as such, in <out>/bench_transfer.md)."""
        res = json.loads(json.dumps(results))  # the logreg floor, then every finished job
        failures = {k: j.error for k, j in done.items() if j.error}
        times = dict(timings)

        def add_time(part: str, secs: float) -> None:
            times[part] = times.get(part, 0.0) + secs

        ypre = done.get("yardstick/pretrain")
        yardstick_meta = None if ypre is None else (ypre.result if not ypre.error else {"error": ypre.error})
        if ypre is not None:
            add_time("yardstick pretrain (fractals)" + (" [cached]" if (ypre.result or {}).get("cached") else ""),
                     ypre.wall_s)
        tl_pre_meta: dict[str, dict] = {}
        codes: set[str] = set()
        for key, job in done.items():
            parts = key.split("/")
            if key == "yardstick/pretrain":
                continue
            if parts[0] == "yardstick":
                _, init, name, kk = parts
                res[name][kk[1:]][f"yardstick/{init}"] = {"error": job.error} if job.error else job.result
                add_time(f"yardstick fine-tune ({init})", job.wall_s)
            elif parts[1] == "pretrain":
                tl_pre_meta[parts[0]] = {"error": job.error} if job.error else {
                    k: job.result.get(k) for k in ("checkpoint", "steps", "final_loss", "num_params", "wall_s",
                                                   "samples_per_s", "cached", "cli_wall_s", "monitor_curve")}
                add_time(f"transferline {parts[0]} stage one"
                         + (" [cached]" if (job.result or {}).get("cached") else ""), job.wall_s)
            elif parts[1] == "assess":
                arch, _, name, kk = parts
                res[name][kk[1:]][f"{arch}/assess"] = {"error": job.error} if job.error else job.result
                add_time(f"transferline {arch} assess", job.wall_s)
            else:
                arch, strategy, name, kk = parts
                row = res[name][kk[1:]]
                add_time(f"transferline {arch} stage two", job.wall_s)
                if job.error:
                    row.setdefault(f"{arch}/{strategy}", {"error": job.error})
                    if "scratch" in args.strategies and strategy == carrier:
                        row[f"{arch}/scratch"] = {"error": job.error}
                    continue
                if strategy in args.strategies:
                    row[f"{arch}/{strategy}"] = {**job.result["finetune"], "cli_wall_s": job.result["cli_wall_s"],
                                                 "code": job.result["code"]}
                if "scratch" in job.result:
                    row[f"{arch}/scratch"] = {**job.result["scratch"], "code": job.result["code"]}
                codes.add(job.result["code"])
        for label, base_label in scratch_of.items():  # later budgets: the same from-scratch runs
            for row in (r for by_k in res.values() for r in by_k.values()):
                if f"{base_label}/scratch" in row:
                    row[f"{label}/scratch"] = row[f"{base_label}/scratch"]
        times["total" + (" (this call; kept jobs not included)" if any(j.reused for j in done.values()) else "")] = (
            time.perf_counter() - t_start)
        meta = {"command": command, "commit": commit, "dirty": dirty,
                "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "host": f"{platform.node()} ({os.cpu_count()} CPUs)", "torch": torch.__version__, "jobs": args.jobs,
                "config": os.path.relpath(config_path, REPO),
                "config_sha1": hashlib.sha1(config_text.encode()).hexdigest(),
                "tl_fixed_overrides": fixed + ft_fixed, "overrides": args.override, "seeds": args.seeds,
                "shots": args.shots, "archs": labels, "pretrain_steps": budgets, "strategies": args.strategies,
                "targets": target_info,
                "yardstick_steps": args.yardstick_steps, "yardstick_pretrain": yardstick_meta,
                "tl_pretrain": tl_pre_meta, "timings": times, "failures": failures,
                "complete": final, "jobs_done": f"{len(done)}/{n_jobs}", "code_at_start": code_at_start,
                "jobs_reused": sorted(k for k, j in done.items() if j.reused),
                "code_seen": sorted(codes)}
        md = markdown(res, meta, cols)
        (out / "bench_transfer.md").write_text(md)
        (out / "bench_transfer.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
        plot(res, meta, cols, out / "bench_transfer.png")
        return {"md": md, "failures": failures}

    done = run_jobs(jobs, args.jobs, say, on_done=lambda d: collect(d, final=False))
    final = collect(done, final=True)
    failures = final["failures"]
    print("\n" + final["md"])
    print(f"wrote {out / 'bench_transfer.md'}, {out / 'bench_transfer.json'}, {out / 'bench_transfer.png'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
