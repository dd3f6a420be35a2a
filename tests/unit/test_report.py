"""report.verdict: one plain sentence, losses and too-easy targets said as plainly as wins."""

from __future__ import annotations

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
