"""scripts/bench_transfer.py's check of `assess`: a call counts as right only with the measured
sign, a miss is named, and a gain inside its spread over seeds decides nothing."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_transfer as bench  # noqa: E402


def _row(full: list[float], scratch: list[float], call: str, gain: float = 0.05) -> dict:
    seeds = lambda accs: [{"seed": s, "test_accuracy": a} for s, a in enumerate(accs)]  # noqa: E731
    return {"a/full": {"per_seed": seeds(full)}, "a/scratch": {"per_seed": seeds(scratch)},
            "a/assess": {"gain": gain, "interval": [gain - 0.02, gain + 0.02], "call": call}}


def test_assess_outcomes():
    clear_gain = ([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])  # +10 points, paired spread 1
    assert bench.assess_row(_row(*clear_gain, "likely to help"), "a")[2] == "right"
    assert bench.assess_row(_row(*clear_gain, "likely to hurt"), "a")[2] == "**wrong**"
    assert bench.assess_row(_row(*clear_gain, "uncertain"), "a")[2] == "missed (uncertain)"
    clear_loss = ([0.60, 0.61, 0.62], [0.70, 0.71, 0.72])
    assert bench.assess_row(_row(*clear_loss, "likely to hurt"), "a")[2] == "right"
    noisy = ([0.80, 0.60, 0.75], [0.70, 0.72, 0.70])  # +1 point, spread 11
    assert bench.assess_row(_row(*noisy, "likely to help"), "a")[2] == "inside the spread"
    predicted, measured, _ = bench.assess_row(_row(*clear_gain, "likely to help"), "a")
    assert predicted == "+5.0 [+3.0, +7.0] likely to help" and measured == "+10.0 ± 1.0"
    assert bench.assess_row({"a/full": {"per_seed": []}}, "a") is None  # no assess job: no row


def test_default_budget_matches_the_configs_samples():
    """The bench's one-process stage one sees as many samples as the config's own: the demo's
    800 steps on 2 Ray workers are 1600 local steps; a local launcher is one worker."""
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert bench.config_samples_steps(demo, []) == 1600
    assert bench.config_samples_steps(demo, ["launcher.kind=local"]) == 800
    assert bench.config_samples_steps(demo, ["pretrain.steps=50", "launcher.num_workers=4"]) == 200
    assert bench.config_samples_steps(demo, ["finetune.steps=5"]) == 1600  # stage two's keys do not count


def test_budget_columns_show_scratch_once_per_architecture():
    cols = bench.method_columns({"hybrid_tiny@400": ["scratch", "full"], "hybrid_tiny@800": ["full"]})
    assert cols[3:] == [("hybrid_tiny@400/scratch", "hybrid_tiny scratch"),
                        ("hybrid_tiny@400/full", "hybrid_tiny@400 full"),
                        ("hybrid_tiny@800/full", "hybrid_tiny@800 full")]
    assert bench.parse_args(["--pretrain-steps", "400", "800"]).pretrain_steps == [400, 800]
