"""`finetune.strategy: auto` and `finetune.data.recipe: auto`: candidates, stratified folds of
the shots, the choice."""

from __future__ import annotations

import math
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.stages.auto import (Candidate, Recipe, candidates, choose, choose_recipe, cv_folds, paired_gain, pick_best,
                                  with_candidate)

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _cfg(*overrides: str):
    return load_config(DEMO, ["launcher.kind=local", "tracking.mode=disabled", "finetune.strategy=auto", *overrides])


def _dataset(per_class: int = 6, classes: int = 3) -> datasets.Dataset:
    labels = [c for c in range(classes) for _ in range(per_class)]
    images = [Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8)) for i, c in enumerate(labels)]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{c}" for c in range(classes)])})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_candidates_expand_layer_decays_where_the_backbone_trains():
    a = _cfg("finetune.auto.candidates=[linear_probe,full,head_then_all]",
             "finetune.auto.layer_decays=[1.0,0.7,0.7]").finetune.auto
    assert candidates(a) == [Candidate("linear_probe"), Candidate("full"), Candidate("full", 0.7),
                             Candidate("head_then_all"), Candidate("head_then_all", 0.7)]
    assert Candidate("full", 0.7).label == "full (layer decay 0.7)"


def test_with_candidate_sets_strategy_decay_and_the_fold_budget():
    cfg = with_candidate(_cfg("finetune.steps=200", "finetune.head_steps=150"), Candidate("head_then_all", 0.7),
                         steps=50)
    f = cfg.finetune
    assert (f.strategy, f.optim.layer_decay, f.steps, f.eval_every) == ("head_then_all", 0.7, 50, 50)
    assert f.head_steps == 0  # 150 does not fit a 50-step fold: the default quarter instead


def test_folds_are_stratified_disjoint_and_cover_the_shots():
    labels = [0] * 5 + [1] * 5 + [2] * 5
    shots = [0, 1, 2, 5, 6, 7, 10, 11, 12]  # 3 per class
    folds = cv_folds(labels, shots, folds=5, seed=0)
    assert len(folds) == 3  # no more folds than the smallest class has shots
    held = [i for _, va in folds for i in va]
    assert sorted(held) == shots
    for tr, va in folds:
        assert not set(tr) & set(va) and sorted(tr + va) == shots
        assert sorted(labels[i] for i in va) == [0, 1, 2]  # one of each class held out


def test_default_candidates_put_full_first():
    assert candidates(_cfg().finetune.auto)[0] == Candidate("full")


def test_choose_scores_every_candidate_on_training_shots_only():
    cfg = _cfg("finetune.data.shots_per_class=4", "finetune.auto.folds=2", "finetune.steps=20",
               "finetune.auto.candidates=[linear_probe,full]", "finetune.auto.layer_decays=[1.0,0.5]",
               "finetune.auto.confidence=0")
    train = _dataset()
    seen: list[tuple[str, float, int, int]] = []
    score = {("linear_probe", 1.0): 0.4, ("full", 1.0): 0.7, ("full", 0.5): 0.7}

    def run_fold(fold_cfg, train_part, held_out, seed):
        f = fold_cfg.finetune
        seen.append((f.strategy, f.optim.layer_decay, len(train_part), len(held_out)))
        assert f.steps == 10  # half of finetune.steps by default
        assert set(train_part["image"][0].getdata()) <= set(range(256))  # real rows of the training split
        return score[(f.strategy, f.optim.layer_decay)]

    best, record = choose(cfg, cfg.finetune.data, train, ["c0", "c1", "c2"], seed=0, run_fold=run_fold)
    assert best == Candidate("full")  # confidence 0: the best mean wins; of equal means, the earlier
    assert record == {"choice": "full", "default": "linear_probe", "confidence": 0.0,
                      "cv_accuracy": {"linear_probe": 0.4, "full": 0.7, "full (layer decay 0.5)": 0.7},
                      "cv_fold_accuracy": {"linear_probe": [0.4, 0.4], "full": [0.7, 0.7],
                                           "full (layer decay 0.5)": [0.7, 0.7]},
                      "cv_gain_interval": {"full": [pytest.approx(0.3)] * 2,
                                           "full (layer decay 0.5)": [pytest.approx(0.3)] * 2}}
    # 3 candidates x 2 folds, each fold 6 of the 12 shots held out.
    assert seen == [(s, d, 6, 6) for s, d in [("linear_probe", 1.0), ("full", 1.0), ("full", 0.5)] for _ in (0, 1)]


FULL, PROBE, HTA = Candidate("full"), Candidate("linear_probe"), Candidate("head_then_all")


@pytest.mark.parametrize("accs, confidence, choice", [
    # A higher mean that one fold carries (one held-out image in ten) is noise: the default stays.
    ({FULL: [0.8, 0.9, 0.8], PROBE: [0.9, 0.9, 0.8]}, 0.9, FULL),
    # ... unless the noise is not asked about.
    ({FULL: [0.8, 0.9, 0.8], PROBE: [0.9, 0.9, 0.8]}, 0.0, PROBE),
    # A gain on every fold, steady against its spread, clears the interval.
    ({FULL: [0.5, 0.6, 0.55], PROBE: [0.8, 0.85, 0.8]}, 0.9, PROBE),
    # Of two that clear it, the better mean; one that loses on average never replaces the default.
    ({FULL: [0.5, 0.6, 0.55], PROBE: [0.7, 0.8, 0.76], HTA: [0.8, 0.9, 0.84]}, 0.9, HTA),
    ({FULL: [0.5, 0.6, 0.55], PROBE: [0.4, 0.5, 0.45]}, 0.0, FULL),
    # Equal means: the default.
    ({FULL: [0.5, 0.6], PROBE: [0.6, 0.5]}, 0.0, FULL),
    # One more held-out image right on each of three 10-image folds: no spread, but not certain.
    ({FULL: [0.7, 0.8, 0.7], PROBE: [0.8, 0.9, 0.8]}, 0.9, FULL),
    # Two more on each: clears it even with the spread taken as one image.
    ({FULL: [0.6, 0.7, 0.6], PROBE: [0.8, 0.9, 0.8]}, 0.9, PROBE),
])
def test_pick_best_keeps_the_default_unless_a_gain_clears_the_fold_noise(accs, confidence, choice):
    best, record = pick_best(accs, confidence, resolution=0.1)
    assert best == choice and record["choice"] == choice.label and record["default"] == "full"
    assert set(record["cv_gain_interval"]) == {c.label for c in list(accs)[1:]}


def test_paired_gain_is_a_t_interval_over_folds():
    gain, low, high = paired_gain([0.9, 0.8, 0.7], [0.7, 0.7, 0.7], 0.9)
    # diffs 0.2, 0.1, 0.0: mean 0.1, sd 0.1, t(0.95, 2 dof) = 2.920
    assert gain == pytest.approx(0.1) and (low, high) == pytest.approx((0.1 - 0.1686, 0.1 + 0.1686), abs=1e-4)
    assert paired_gain([0.9], [0.7], 0.9)[1:] == (-math.inf, math.inf)  # one fold says nothing about noise
    assert paired_gain([0.9, 0.8], [0.7, 0.7], 0.0) == pytest.approx((0.15, 0.15, 0.15))
    # No spread between folds: exact without a resolution, one image's step wide with one.
    assert paired_gain([0.8, 0.8, 0.8], [0.7, 0.7, 0.7], 0.9)[1:] == pytest.approx((0.1, 0.1))
    assert paired_gain([0.8, 0.8, 0.8], [0.7, 0.7, 0.7], 0.9, resolution=0.1)[1] == pytest.approx(0.1 - 0.1686, abs=1e-4)


def test_recipe_search_scores_each_recipe_for_the_stages_strategy_and_fixes_the_winner():
    cfg = load_config(DEMO, ["launcher.kind=local", "tracking.mode=disabled", "finetune.data.recipe=auto",
                             "finetune.data.shots_per_class=4", "finetune.auto.folds=2", "finetune.steps=20",
                             "finetune.optim.layer_decay=0.8", "finetune.auto.confidence=0"])
    assert [Recipe.parse(r) for r in cfg.finetune.auto.recipes] == [
        Recipe("checkpoint"), Recipe("checkpoint", 0.5), Recipe("image"), Recipe("image", 0.5)]
    train = _dataset()
    built, seen = [], []
    score = {("checkpoint", 0.0): 0.5, ("checkpoint", 0.5): 0.6, ("image", 0.0): 0.8, ("image", 0.5): 0.8}

    def runner_for(rcfg):  # one fold runner per recipe: normalisation changes the inputs
        d = rcfg.finetune.data
        built.append((d.normalize, d.hflip))

        def run_fold(fold_cfg, train_part, held_out, seed):
            f = fold_cfg.finetune
            assert (f.data.normalize, f.data.hflip) == built[-1] and f.steps == 10
            seen.append((f.strategy, f.optim.layer_decay, len(train_part), len(held_out)))
            return score[(f.data.normalize, f.data.hflip)]
        return run_fold

    for strategy, expect in (("scratch", ("scratch", 0.8)), ("auto", ("full", 0.8)), ("head_then_all", None)):
        built.clear(), seen.clear()
        chosen, record = choose_recipe(cfg, train, ["c0", "c1", "c2"], 0, strategy, runner_for)
        d = chosen.finetune.data
        assert (d.normalize, d.hflip, d.recipe) == ("image", 0.0, "fixed")  # a tie goes to the earlier recipe
        assert record["choice"] == "image" and record["default"] == "checkpoint"
        assert record["cv_accuracy"] == {"checkpoint": 0.5, "checkpoint+hflip": 0.6, "image": 0.8, "image+hflip": 0.8}
        assert record["cv_fold_accuracy"] == {"checkpoint": [0.5] * 2, "checkpoint+hflip": [0.6] * 2,
                                              "image": [0.8] * 2, "image+hflip": [0.8] * 2}
        assert built == [("checkpoint", 0.0), ("checkpoint", 0.5), ("image", 0.0), ("image", 0.5)]
        # `auto` picks its recipe with `full`; the strategy search follows under the recipe.
        assert {s[:2] for s in seen} == {expect or (strategy, 0.8)} and len(seen) == 4 * 2


@pytest.mark.parametrize("override, key", [
    ("finetune.data.shots_per_class=1", "finetune.auto"),
    ("finetune.strategy=full finetune.data.recipe=auto finetune.data.shots_per_class=1", "finetune.data.recipe"),
    ("finetune.data.recipe=sometimes", "finetune.data.recipe"),
    ("finetune.data.recipe=auto finetune.auto.recipes=[image+vflip]", "finetune.auto.recipes"),
    ("finetune.data.recipe=auto finetune.auto.recipes=[]", "finetune.auto.recipes"),
    ("finetune.auto.candidates=[auto]", "finetune.auto.candidates"),
    ("finetune.auto.candidates=[partial]", "finetune.auto.candidates"),
    ("finetune.auto.folds=1", "finetune.auto.folds"),
    ("finetune.auto.layer_decays=[0]", "finetune.auto.layer_decays"),
    ("finetune.auto.confidence=1", "finetune.auto.confidence"),
    ("finetune.auto.confidence=-0.1", "finetune.auto.confidence"),
])
def test_bad_auto_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}"):
        _cfg(*override.split())
