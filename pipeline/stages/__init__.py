"""`run_stage`: what every worker runs, under any launcher.

Stage one (`pretrain`, stages/pretrain.py) streams webdataset shards into the architecture and
checkpoints it. Stage two (`finetune`, stages/finetune.py) starts from that checkpoint on a
small HF dataset, once per seed, with one of the transfer strategies; `scratch` is the same run
from random init (the baseline). Rank 0 writes `<output_dir>/<stage>/result.json`, which is how
results reach the driver (`read_stage_result`).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.distributed import DistContext
from pipeline.fileio import read_json, write_json_atomic
from pipeline.inputs import stage_dir
from pipeline.launch.base import Reporter
from pipeline.stages.finetune import target_stage
from pipeline.stages.pretrain import pretrain
from pipeline.lineage import input_checkpoint_source
from pipeline.storage import fetch_checkpoint
from pipeline.suite import stage_kind
from pipeline.tracking import start_tracker

RESULT_FILE = "result.json"


def write_stage_result(cfg: RunConfig, stage: str, result: dict[str, Any]) -> None:
    write_json_atomic(stage_dir(cfg, stage) / RESULT_FILE, result)


def read_stage_result(cfg: RunConfig, stage: str) -> dict[str, Any]:
    path = stage_dir(cfg, stage) / RESULT_FILE
    result = read_json(path)
    if result is None:
        raise RuntimeError(f"stage {stage} finished without writing {path}")
    return result


def run_stage(stage: str, cfg: RunConfig, reporter: Reporter, ctx: DistContext) -> dict[str, Any]:
    """Run `stage`: `pretrain`, `finetune` or `scratch`, or a suite target's label of the latter
    two (`finetune-<target>`, pipeline/suite.py), which names its directory and W&B run."""
    kind = stage_kind(stage)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    # Stage two's input: the model artifact it starts from (name + digest; lineage when online).
    source = None
    if kind == "finetune" and ctx.is_main and cfg.tracking.mode != "disabled":
        source = input_checkpoint_source(fetch_checkpoint(cfg.finetune.init_from), cfg)
    tracker = start_tracker(stage, cfg, is_main=ctx.is_main,
                            extra_config={"input_artifact": source} if source else None)
    try:
        if source:
            tracker.use_checkpoint(source)
        if stage == "pretrain":
            result = pretrain(cfg, reporter, ctx, tracker)
        elif kind in ("finetune", "scratch"):
            result = target_stage(stage, cfg, reporter, ctx, tracker)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        if source:
            result["input_artifact"] = source
        tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float, str))}
                        | ({"input_artifact": source} if source else {}))
        result["tracking"] = tracker.describe()
    finally:
        tracker.finish()
    if ctx.is_main:
        write_stage_result(cfg, stage, result)
    return result
