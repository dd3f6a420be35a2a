"""Transfer suites: stage two on several targets from one stage-one checkpoint.

`finetune.targets` lists targets; each runs the ordinary `finetune` and `scratch` stages with a
per-target copy of the config (its `finetune.data` and `strategy`, `targets` emptied) under a
stage label `<stage>-<target>` (e.g. `finetune-digits5`), which names the stage directory, the
W&B run id and the Ray run. The single-target form (`finetune.data`) is a suite of one unnamed
target whose labels are the plain stage names, so its outputs are what they always were.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import RunConfig, target_name


@dataclass(frozen=True)
class SuiteTarget:
    name: str
    """The target's name; empty in the single-target form."""
    key: str
    """Config key of this target (`finetune` or `finetune.targets[i]`), for error messages."""
    cfg: RunConfig
    """The run config as this target's stages see it."""

    def label(self, stage: str) -> str:
        """Stage label: directory, W&B run id and Ray run name of `stage` on this target."""
        return f"{stage}-{self.name}" if self.name else stage


def stage_run_name(run: str, stage: str) -> str:
    """`<run name>-<stage label>`: one stage of one run, as W&B run ids and Ray runs name it."""
    return f"{run}-{stage}"


def stage_kind(label: str) -> str:
    """`finetune-digits5` -> `finetune` (stage names hold no `-`)."""
    return label.split("-", 1)[0]


def suite_targets(cfg: RunConfig) -> list[SuiteTarget]:
    """The targets of stage two, each with its own config copy, in config order."""
    f = cfg.finetune
    if not f.targets:
        return [SuiteTarget(name="", key="finetune", cfg=cfg)]
    out = []
    for i, t in enumerate(f.targets):
        ft = dataclasses.replace(f, data=t.data, strategy=t.strategy or f.strategy, targets=[])
        out.append(SuiteTarget(name=target_name(t), key=f"finetune.targets[{i}]",
                               cfg=dataclasses.replace(cfg, finetune=ft)))
    return out
