"""report.verdict: one plain sentence, losses and too-easy targets said as plainly as wins."""

from __future__ import annotations

import pytest

from pipeline.report import verdict


def _result(acc: float, std: float = 0.01, steps: float | None = 50.0) -> dict:
    return {"test_accuracy": acc, "test_accuracy_std": std, "runs": [{}, {}, {}], "target_accuracy": 0.8,
            "steps_to_target": steps}


def test_gain_loss_and_no_difference():
    assert verdict(_result(0.90), _result(0.80)).startswith("Pretraining bought +10.0 points")
    assert verdict(_result(0.70), _result(0.80)).startswith("Pretraining cost 10.0 points")
    assert verdict(_result(0.805, 0.02), _result(0.80, 0.02)).startswith("Pretraining made no clear difference")


def test_a_target_scratch_masters_is_called_too_easy():
    easy = verdict(_result(0.99), _result(0.985))
    assert "too easy for transfer to show" in easy and "98.5%" in easy
    assert "too easy" not in verdict(_result(0.99), _result(0.97))


def _seeded(accs: list[float], std: float) -> dict:
    return {**_result(sum(accs) / len(accs), std), "runs": [{"seed": i, "test_accuracy": a} for i, a in enumerate(accs)]}


def test_the_gain_is_also_given_seed_by_seed():
    """The k-shot subset moves both arms of a seed alike: the paired differences say how steady a
    gain is when the arms' own spreads (which hold the subsets' noise) overlap."""
    line = verdict(_seeded([0.937, 0.963, 0.943], 0.014), _seeded([0.924, 0.941, 0.919], 0.012))
    assert "paired by seed +2.0 ± 0.6, fine-tuned ahead on 3 of 3" in line
    mixed = verdict(_seeded([0.90, 0.80], 0.07), _seeded([0.85, 0.85], 0.0))
    assert "paired by seed +0.0 ± 7.1, fine-tuned ahead on 1 of 2" in mixed
    assert "paired" not in verdict(_seeded([0.9], 0.0), _seeded([0.8], 0.0))  # one seed: no spread to give


def _curved(acc: float, rise: float, n: int = 21) -> dict:
    """Three seeds whose curves end at `acc` after gaining `rise` over their last quarter."""
    quarter = int(0.75 * (n - 1))
    curve = [[10 * i, acc - rise if i <= quarter else acc - rise * (n - 1 - i) / (n - 1 - quarter)] for i in range(n)]
    return {**_result(acc, 0.005), "runs": [{"seed": s, "test_accuracy": acc, "curve": curve} for s in range(3)]}


def test_a_win_over_a_scratch_run_still_improving_says_so() -> None:
    line = verdict(_curved(0.85, 0.01), _curved(0.80, 0.05))
    assert line.startswith("Pretraining bought +5.0 points")
    assert "Scratch was still improving when training stopped (+5.0 points over the last quarter" in line
    assert "fine-tuned +1.0" in line and "finetune.steps" in line
    assert "still improving" not in verdict(_curved(0.85, 0.01), _curved(0.80, 0.01))  # converged
    assert "still improving" not in verdict(_curved(0.70, 0.0), _curved(0.80, 0.05))  # a loss: nothing to qualify
    assert "still improving" not in verdict(_result(0.90), _result(0.80))  # no curves recorded


def _linear(final: float, reach_step: int, n: int = 11, every: int = 10) -> dict:
    """Three seeds whose curves climb linearly from 0.1 to `final` at `reach_step`, then stay."""
    curve = [[every * i, 0.1 + (final - 0.1) * min(1.0, every * i / reach_step)] for i in range(n)]
    return {**_result(final, 0.005), "runs": [{"seed": s, "test_accuracy": final, "curve": curve} for s in range(3)]}


def test_faster_learning_is_measured_against_where_scratch_ends() -> None:
    """A fine-tune that ends level with scratch can still learn faster: the step at which each mean
    curve first reaches scratch's final accuracy, and the ratio, whatever the final gap says."""
    from pipeline.report import steps_to_scratch_final

    fast, slow = _linear(0.80, reach_step=20), _linear(0.80, reach_step=80)
    measured = steps_to_scratch_final(fast["runs"], slow["runs"])
    assert measured.pop("faster_seeds") == "3/3"
    assert measured == pytest.approx({"accuracy": 0.80, "finetune_steps": 20, "scratch_steps": 80, "speedup": 4.0})
    line = verdict(fast, slow)
    assert line.startswith("Pretraining made no clear difference")
    assert ("reached scratch's final mean accuracy (80.0%, reached by scratch at step 80) at step 20: 4.0x fewer "
            "steps (seed by seed, faster on 3 of 3)") in line
    assert steps_to_scratch_final(slow["runs"], slow["runs"])["faster_seeds"] == "0/3"  # level is not faster
    never = verdict(_linear(0.70, reach_step=20), slow)
    assert "The fine-tuned mean curve never reached scratch's final mean accuracy (80.0%" in never
    assert steps_to_scratch_final(_result(0.9)["runs"], slow["runs"]) is None  # no curves: nothing said
    assert "mean curve" not in verdict(_result(0.90), _result(0.80))
