"""The stage sequence on the driver: pretrain -> targets x {finetune, scratch} -> report.

Everything that can be checked without training is checked first (pipeline/preflight.py), so a
bad run fails in seconds, before Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, save_config, stages_for
from pipeline.data.shards import absolutize_urls
from pipeline.launch.base import Trial
from pipeline.lineage import is_artifact_ref, prepare_tracking
from pipeline.preflight import check_init_checkpoint, check_output_dir, preflight
from pipeline.report import write_report
from pipeline.resume import finished_result, mark_finished
from pipeline.suite import SuiteTarget, stage_kind, suite_targets

log = logging.getLogger("transferline.runner")


def _is_url(s: str) -> bool:
    return "://" in s


#: Set by `transferline submit`: the directory a job's relative local paths resolve against
#: (where the user submitted from), not the job's temporary copy of the working_dir.
PATH_BASE_ENV = "TRANSFERLINE_PATH_BASE"


def absolutize(cfg: RunConfig, base: str | None = None) -> RunConfig:
    """Local paths made absolute on the driver, against `base` (default: $TRANSFERLINE_PATH_BASE,
    else the working directory): Ray workers may run in another directory."""
    base = base or os.environ.get(PATH_BASE_ENV) or os.getcwd()

    def fix(path: str) -> str:
        return path if not path or _is_url(path) or os.path.isabs(path) else os.path.abspath(os.path.join(base, path))

    pd = cfg.pretrain.data
    sources = [dataclasses.replace(s, urls=absolutize_urls(s.urls, base)) for s in pd.sources]
    p = dataclasses.replace(cfg.pretrain, data=dataclasses.replace(pd, urls=absolutize_urls(pd.urls or "", base),
                                                                   sources=sources))

    def fix_data(fd: Any) -> Any:
        source = fd.source or ""
        # A hub name ("user/name") is not a local path: only rewrite what exists there.
        return dataclasses.replace(fd, source=fix(source) if source and Path(fix(source)).exists() else fd.source)

    f = dataclasses.replace(
        cfg.finetune,
        init_from=cfg.finetune.init_from if is_artifact_ref(cfg.finetune.init_from) else fix(cfg.finetune.init_from),
        data=fix_data(cfg.finetune.data),
        targets=[dataclasses.replace(t, data=fix_data(t.data)) for t in cfg.finetune.targets],
    )
    return dataclasses.replace(cfg, output_dir=fix(cfg.output_dir), pretrain=p, finetune=f)


def _launcher(cfg: RunConfig) -> Any:
    if cfg.launcher.kind == "local":
        from pipeline.launch.local import LocalLauncher

        return LocalLauncher(cfg)
    from pipeline.launch.ray import RayLauncher

    return RayLauncher(cfg)


def stage_two_plan(cfg: RunConfig, stages: list[str], targets: list[SuiteTarget]) -> list[tuple[SuiteTarget, str]]:
    """(target, stage) pairs of stage two in pipeline order: each target's `finetune`, `scratch`
    and (with `finetune.assess`) `assess`, as far as `stages` asks for them."""
    def wanted(stage: str) -> bool:
        return stage in stages if stage != "assess" else "finetune" in stages and cfg.finetune.assess
    return [(t, stage) for t in targets for stage in ("finetune", "scratch", "assess") if wanted(stage)]


def run_pipeline(cfg: RunConfig, command: str = "run", *, dry_run: bool = False) -> dict[str, Any]:
    """Run the stages `command` asks for and write summary.json, report.md, curves.png. With
    `dry_run`, run every check and print what would run instead, writing nothing."""
    cfg = absolutize(cfg)
    stages = stages_for(command, cfg)
    check_output_dir(cfg, create=not dry_run)  # before anything is written there
    cfg = prepare_tracking(cfg, stages)  # W&B reachable? a `wandb:` init_from downloaded
    plan = preflight(cfg, stages)
    if dry_run:
        print("\n".join(["dry run: every check passed; nothing was trained or written", *(f"  {p}" for p in plan)]),
              flush=True)
        return {"dry_run": plan}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    # Results by stage label: `pretrain`, then per target `finetune`/`scratch` (single-target
    # form) or `finetune-<target>`/`scratch-<target>` (a suite), and `assess[-<target>]`.
    results: dict[str, Any] = {}

    def reuse(label: str, stage_cfg: RunConfig, *, stale: bool = False, say: bool = True) -> bool:
        """True (and the stored result taken) when `label` finished before with this config."""
        done = finished_result(stage_cfg, label, say=say)
        if done is not None and not stale:
            log.info("== %s: already finished in this run with this config; not %s ==", label,
                     "rerun" if stage_kind(label) == "assess" else "retrained")
            results[label] = done
            return True
        if done is not None:
            log.info("== %s: finished before, from stage one's earlier weights; running it again ==", label)
        return False

    def record(label: str, stage_cfg: RunConfig, result: dict[str, Any]) -> None:
        results[label] = result
        mark_finished(stage_cfg, label, result)

    # Fine-tuning results depend on stage one's weights, which its fingerprint cannot see (a
    # checkpoint path may stay the same): when stage one trained in this call, they are stale.
    new_weights = False
    with _launcher(cfg) as launcher:
        if "pretrain" in stages and not reuse("pretrain", cfg):
            log.info("== pretrain (%s launcher) ==", cfg.launcher.kind)
            record("pretrain", cfg, launcher.run_stage("pretrain", cfg, command))
            new_weights = results["pretrain"].get("resumed_from_step", 0) < results["pretrain"].get("steps", 0)
        targets = suite_targets(cfg)
        if "finetune" in stages and "pretrain" in results:
            cfg = dataclasses.replace(
                cfg, finetune=dataclasses.replace(cfg.finetune, init_from=results["pretrain"]["checkpoint"]))
            save_config(cfg, out / "config.yaml")
            targets = suite_targets(cfg)
            for t in targets:
                check_init_checkpoint(t.cfg, key=t.key)
        # Stage two: one checkpoint, every target with its own baseline and assessment. The
        # trials are independent; a launcher may run them at once.
        plan = stage_two_plan(cfg, stages, targets)
        trials = [Trial(t.label(stage), t.cfg) for t, stage in plan
                  if not reuse(t.label(stage), t.cfg, stale=new_weights and stage != "scratch", say=stage != "assess")]
        if trials:
            log.info("== stage two: %s (%s launcher) ==", ", ".join(tr.label for tr in trials), cfg.launcher.kind)
        launcher.run_trials(trials, command, lambda trial, result: record(trial.label, trial.cfg, result))
    # The report lists stages in pipeline order, whatever order the trials finished in.
    order = ["pretrain", *(t.label(stage) for t, stage in plan)]
    results = {k: results[k] for k in sorted(results, key=lambda k: order.index(k) if k in order else len(order))}
    summary = write_report(cfg, results)
    print(json.dumps(_headline(summary), indent=2), flush=True)
    return summary


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("transfer_gain", "summary_line")
    head = {k: summary[k] for k in keys if k in summary}
    head["outputs"] = summary.get("outputs", {})
    return head
