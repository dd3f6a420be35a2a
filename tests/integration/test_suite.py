"""A transfer suite: two targets fine-tuned from one stage-one checkpoint, each with its own
from-scratch baseline, on the local launcher (real data, real W&B offline runs)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runner import run_pipeline
from tests.conftest import REPO, tiny_overrides
from tests.wandb_reader import runs_by_job_type

DEMO = REPO / "configs" / "demo.yaml"


def _targets(digits: str, bad: str | None = None) -> str:
    second = bad or digits
    return ("finetune.targets=[{name: few, data: {source: " + digits + ", shots_per_class: 2, in_chans: 1, "
            "batch_size: 8}}, {name: more, strategy: linear_probe, data: {source: " + second
            + ", shots_per_class: 4, in_chans: 1, batch_size: 8}}]")


def test_suite_of_two_targets(tiny_data, tmp_path):
    out = tmp_path / "suite_run"
    overrides = tiny_overrides(tiny_data, out, **{"finetune.data.source": "null", "tracking.mode": "offline"})
    cfg = load_config(DEMO, [*overrides, _targets(tiny_data["digits"])])
    summary = run_pipeline(cfg)

    on_disk = json.loads((out / "summary.json").read_text())
    assert list(on_disk["targets"]) == ["few", "more"]
    few, more = on_disk["targets"]["few"], on_disk["targets"]["more"]
    # Two rows, two baselines: each target has its own fine-tune and scratch over both seeds.
    for t, shots, strategy in ((few, 2, "full"), (more, 4, "linear_probe")):
        f, s = t["finetune"], t["scratch"]
        assert f["init_from"] == on_disk["pretrain"]["checkpoint"] and s["init_from"] is None
        assert f["strategy"] == strategy and s["strategy"] == "scratch"
        assert f["shots_per_class"] == shots == s["shots_per_class"] and f["train_size"] == 10 * shots
        assert len(f["per_seed"]) == 2 and len(s["per_seed"]) == 2
        assert t["transfer_gain"] == pytest.approx(f["test_accuracy"] - s["test_accuracy"])
        assert t["assess"]["samples"] == 10 * shots
    # Old readers: the first target's results stay at the top level.
    assert on_disk["finetune"] == few["finetune"] and on_disk["transfer_gain"] == few["transfer_gain"]
    assert summary["targets"]["more"]["scratch"]["train_size"] == 40

    # Per-target stage directories; no plain finetune/scratch ones.
    for label in ("finetune-few", "scratch-few", "finetune-more", "scratch-more"):
        assert (out / label / "result.json").is_file() and (out / label / "seed_1").is_dir()
    assert not (out / "finetune").exists() and not (out / "scratch").exists()

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| few |", "| more |"))]
    assert len(rows) == 2 and "linear_probe" in rows[1] and "±" in rows[0]
    assert "## Predicted vs measured: few" in report and "## Predicted vs measured: more" in report
    assert (out / "curves.png").stat().st_size > 0

    # One W&B run per stage and target; job types stay the stage, ids carry the target.
    runs = runs_by_job_type(out / "wandb")
    assert sorted(r.run_id for r in runs["finetune"]) == [f"{out.name}-finetune-few", f"{out.name}-finetune-more"]
    assert sorted(r.run_id for r in runs["scratch"]) == [f"{out.name}-scratch-few", f"{out.name}-scratch-more"]
    assert {r.group for r in runs["finetune"] + runs["scratch"]} == {out.name}


def test_suite_preflight_names_the_bad_target(tiny_data, tmp_path):
    out = tmp_path / "bad_suite"
    overrides = tiny_overrides(tiny_data, out, **{"finetune.data.source": "null"})
    cfg = load_config(DEMO, [*overrides, _targets(tiny_data["digits"], bad=str(tmp_path / "nowhere"))])
    with pytest.raises(ConfigError, match=r"^finetune\.targets\[1\]\.data\.source: "):
        run_pipeline(cfg)
    assert not (out / "pretrain").exists()  # refused before any training
