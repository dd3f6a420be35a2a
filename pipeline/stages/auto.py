"""`finetune.strategy: auto` and `finetune.data.recipe: auto`: pick the transfer strategy and
the data recipe (normalisation, flips) by cross-validation on the training shots.

For one seed, the k-shot training set is split into stratified folds; every candidate (a
strategy and a layer decay) fine-tunes on all folds but one and is scored on the one held out,
within a bounded budget (`finetune.auto.steps` per fold). The first option listed is the
default: another replaces it only when its gain, paired fold by fold, clears the fold noise (the
lower end of its `finetune.auto.confidence` t-interval is above zero); among those that do, the
best mean wins. A plain best-mean rule left `full` on a third of the seeds at 5 shots and lost
every time (README, "`strategy: auto` at 800 stage-two steps"): with a few dozen held-out shots,
one image is 2-3 points. The choice is then fine-tuned on all the shots as usual. Only training
images are used: the test split never informs the choice. With both, the recipe is chosen first
(for `full`, or the stage's fixed strategy), then the strategy under it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import AutoConfig, RunConfig, TargetDataConfig
from pipeline.data.target import seed_shots


@dataclass(frozen=True)
class Candidate:
    strategy: str
    layer_decay: float = 1.0

    @property
    def label(self) -> str:
        return self.strategy if self.layer_decay == 1.0 else f"{self.strategy} (layer decay {self.layer_decay:g})"


def candidates(a: AutoConfig) -> list[Candidate]:
    """Every strategy with every layer decay, in the order listed (the first is the default); a
    linear probe trains no backbone, so it takes none."""
    out: list[Candidate] = []
    for strategy in a.candidates:
        decays = [1.0] if strategy == "linear_probe" else list(dict.fromkeys(a.layer_decays))
        out += [Candidate(strategy, d) for d in decays]
    return out


def with_candidate(cfg: RunConfig, c: Candidate, *, steps: int | None = None) -> RunConfig:
    """`cfg` fine-tuning with candidate `c` (and `steps` steps: a fold's budget)."""
    f = cfg.finetune
    changes: dict[str, Any] = {"strategy": c.strategy, "optim": dataclasses.replace(f.optim, layer_decay=c.layer_decay)}
    if steps is not None:
        changes.update(steps=steps, eval_every=steps, head_steps=f.head_steps if f.head_steps < steps else 0)
    return dataclasses.replace(cfg, finetune=dataclasses.replace(f, **changes))


def cv_folds(labels: list[int], shots: list[int], folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(train, held-out) index lists over the seed's shots, stratified by class."""
    # Here, not at the top: sklearn costs ~1.7 s to import, in every stage-two process.
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray([labels[i] for i in shots])
    n = max(2, min(folds, int(np.bincount(y).min())))
    split = StratifiedKFold(n_splits=n, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    return [([shots[i] for i in tr], [shots[i] for i in va]) for tr, va in split]


#: (candidate's config, training subset, held-out subset, seed) -> held-out accuracy
FoldRunner = Callable[[RunConfig, Any, Any, int], float]


def fold_steps(cfg: RunConfig) -> int:
    """Steps of one cross-validation fit: `finetune.auto.steps`, else half of `finetune.steps`."""
    return cfg.finetune.auto.steps or max(1, cfg.finetune.steps // 2)


def cv_accuracies(cfg: RunConfig, d: TargetDataConfig, train_ds: Any, class_names: list[str], seed: int,
                  run_fold: FoldRunner, cands: list[Candidate]) -> tuple[dict[Candidate, list[float]], float]:
    """Every candidate's held-out accuracy on each fold of this seed's shots (the same folds and
    fold seeds for all candidates, so their scores pair up fold by fold), and the step one
    held-out image makes in the largest fold's accuracy (`paired_gain`'s `resolution`)."""
    a = cfg.finetune.auto
    labels = [int(v) for v in train_ds[d.label_column]]
    shots = seed_shots(train_ds, d.shots_per_class, seed, label_column=d.label_column, class_names=class_names)
    splits = cv_folds(labels, shots, a.folds, seed)
    steps = fold_steps(cfg)
    out: dict[Candidate, list[float]] = {}
    for c in cands:
        fold_cfg = with_candidate(cfg, c, steps=steps)
        accs = []
        for i, (tr, va) in enumerate(splits):
            torch.manual_seed(seed * 1000 + i)
            accs.append(run_fold(fold_cfg, train_ds.select(tr), train_ds.select(va), seed))
        out[c] = accs
    return out, 1 / max(len(va) for _, va in splits)


def paired_gain(a: list[float], b: list[float], confidence: float, resolution: float = 0.0) -> tuple[float, float, float]:
    """The mean of `a - b` over paired folds and its two-sided t-interval at `confidence`
    (0: the mean alone; one fold: unbounded). Fold accuracies move in steps of one held-out image,
    so the spread of the differences is taken as at least `resolution` (one such step): three
    folds that each differ by exactly one image are not a certain gain."""
    from scipy import stats  # here, not at the top: most stage-two processes never need it

    diffs = np.subtract(a, b)
    gain, n = float(diffs.mean()), len(diffs)
    if confidence == 0:
        return gain, gain, gain
    if n < 2:
        return gain, -math.inf, math.inf
    spread = max(float(diffs.std(ddof=1)), resolution)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * spread / math.sqrt(n))
    return gain, gain - half, gain + half


def pick_best(accs: dict[Any, list[float]], confidence: float, resolution: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """The option (a `Candidate` or `Recipe`) cross-validation picks, and the search's record for
    `per_seed[i]`. The first option is the default; another replaces it only when the lower end of
    its paired gain's interval over the default is above zero, and of those the best mean wins (the
    first of equal means). The record keeps each option's mean, its accuracy fold by fold, and its
    gain's interval over the default, so the fold noise between options can be read."""
    options = list(accs)
    default, means = options[0], {o: statistics.fmean(a) for o, a in accs.items()}
    intervals = {o: paired_gain(accs[o], accs[default], confidence, resolution)[1:] for o in options[1:]}
    clear = [o for o in options[1:] if intervals[o][0] > 0]
    best = max(clear, key=means.__getitem__) if clear else default
    return best, {"choice": best.label, "default": default.label, "confidence": confidence,
                  "cv_accuracy": {o.label: m for o, m in means.items()},
                  "cv_fold_accuracy": {o.label: a for o, a in accs.items()},
                  "cv_gain_interval": {o.label: list(i) for o, i in intervals.items()}}


def choose(cfg: RunConfig, d: TargetDataConfig, train_ds: Any, class_names: list[str], seed: int,
           run_fold: FoldRunner) -> tuple[Candidate, dict[str, Any]]:
    """The best candidate for this seed's shots and the search's record (`pick_best`)."""
    a = cfg.finetune.auto
    accs, step = cv_accuracies(cfg, d, train_ds, class_names, seed, run_fold, candidates(a))
    return pick_best(accs, a.confidence, step)


@dataclass(frozen=True)
class Recipe:
    """A data recipe `finetune.data.recipe: auto` may pick: `normalize` and `hflip`."""
    normalize: str
    hflip: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """`image+hflip` -> Recipe("image", 0.5) (the syntax `finetune.auto.recipes` validates)."""
        norm, _, flip = text.partition("+")
        return cls(norm, 0.5 if flip == "hflip" else 0.0)

    @property
    def label(self) -> str:
        return self.normalize + ("+hflip" if self.hflip else "")


def with_recipe(cfg: RunConfig, r: Recipe) -> RunConfig:
    """`cfg` with recipe `r` fixed in `finetune.data`."""
    f = cfg.finetune
    data = dataclasses.replace(f.data, normalize=r.normalize, hflip=r.hflip, recipe="fixed")
    return dataclasses.replace(cfg, finetune=dataclasses.replace(f, data=data))


def choose_recipe(cfg: RunConfig, train_ds: Any, class_names: list[str], seed: int, strategy: str,
                  runner_for: Callable[[RunConfig], FoldRunner]) -> tuple[RunConfig, dict[str, Any]]:
    """`cfg` with the recipe that scores best for `strategy` on this seed's shots (`runner_for`
    builds the fold runner of a recipe's config: its normalisation changes the inputs), and the
    search's record (`pick_best`)."""
    f = cfg.finetune
    cand = Candidate("full" if strategy == "auto" else strategy, f.optim.layer_decay)
    accs: dict[Recipe, list[float]] = {}
    for r in dict.fromkeys(Recipe.parse(t) for t in f.auto.recipes):
        rcfg = with_recipe(cfg, r)
        scores, step = cv_accuracies(rcfg, rcfg.finetune.data, train_ds, class_names, seed, runner_for(rcfg), [cand])
        accs[r] = scores[cand]
    best, record = pick_best(accs, f.auto.confidence, step)
    return with_recipe(cfg, best), record
