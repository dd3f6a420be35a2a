"""Before fine-tuning: will this checkpoint beat training from scratch on the target?

The call comes from `gain_over_scratch`: the configured strategy and a scratch model, each
trained briefly on the same folds of the training shots and scored on the fold held out (a
paired comparison; "uncertain" when its interval spans zero). Beside it, in seconds, the
feature-space view (which compares with random features, not with a scratch fit):

On frozen features of a target's training split, for the pretrained backbone and for a
randomly initialised backbone of the same architecture (the control):

- kNN accuracy (cosine, cross-validated on the training split),
- a closed-form linear probe (ridge classifier, cross-validated),
- LogME (You et al., ICML 2021): the log marginal evidence of a Bayesian linear model on the
  features, per sample, averaged over classes. Higher means the labels are easier to explain
  linearly from these features; no training, no hyper-parameters.

The report puts the call beside the fine-tuning gain that was measured, so users can see how
well it predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import RidgeClassifierCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from torch.utils.data import DataLoader, Subset

from pipeline.checkpoint import load_checkpoint
from pipeline.config import RunConfig
from pipeline.data.target import TorchImageDataset, k_shot_indices
from pipeline.data.transforms import build_transform
from pipeline.distributed import DistContext
from pipeline.features import extract_features
from pipeline.inputs import TargetSettings, load_target_data, model_from_meta
from pipeline.results import EASY_TARGET
from pipeline.transfer import load_backbone


def _folds(labels: np.ndarray, seed: int) -> StratifiedKFold:
    smallest = int(np.bincount(labels).min(initial=0)) if labels.size else 0
    n = max(2, min(5, smallest))
    return StratifiedKFold(n_splits=n, shuffle=True, random_state=seed)


def knn_accuracy(feats: np.ndarray, labels: np.ndarray, *, k: int = 5, seed: int = 0) -> float:
    """Cross-validated k-NN accuracy with cosine similarity (L2-normalised features)."""
    cv = _folds(labels, seed)
    k = max(1, min(k, int(len(labels) * (cv.n_splits - 1) / cv.n_splits) - 1))
    clf = make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k))
    return float(cross_val_score(clf, feats, labels, cv=cv).mean())


def linear_probe_accuracy(feats: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """Cross-validated accuracy of a closed-form ridge classifier (its own LOO picks alpha)."""
    clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-3, 3, 13)))
    return float(cross_val_score(clf, feats, labels, cv=_folds(labels, seed)).mean())


def _evidence(s: np.ndarray, z: np.ndarray, residual_out: float, n: int, d: int,
              alpha: float, beta: float) -> float:
    """Log evidence of y given F = U diag(s) V^T, with z = U^T y and |y|^2 - |z|^2 = residual_out."""
    sigma = s**2
    m = beta * s * z / (alpha + beta * sigma)  # posterior mean of w, in the V basis
    err = float(np.sum((s * m - z) ** 2)) + residual_out
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(s)) * math.log(alpha)
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * err - alpha / 2 * float(m @ m) - log_det / 2)


def _maximise_evidence(s: np.ndarray, z: np.ndarray, residual_out: float, n: int,
                       max_iter: int = 100, tol: float = 1e-5) -> tuple[float, float]:
    """MacKay's fixed point: alpha = gamma / |m|^2, beta = (N - gamma) / |F m - y|^2."""
    sigma = s**2
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
        m = beta * s * z / (alpha + beta * sigma)
        err = float(np.sum((s * m - z) ** 2)) + residual_out
        new_alpha = gamma / max(float(m @ m), 1e-12)
        new_beta = (n - gamma) / max(err, 1e-12)
        done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def logme(feats: np.ndarray, labels: np.ndarray) -> float:
    """LogME score (You et al., ICML 2021): mean over classes of the maximised log evidence per
    sample of y_k = F w + noise with prior w ~ N(0, 1/alpha), noise ~ N(0, 1/beta).

    Everything happens in the SVD basis of F, so each class costs O(N r), not O(D^3).
    """
    f = feats - feats.mean(axis=0, keepdims=True)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max(initial=0.0) * 1e-10
    u, s = u[:, keep], s[keep]
    scores = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        z = u.T @ y
        residual_out = float(y @ y - z @ z)  # the part of y no linear map of F reaches
        alpha, beta = _maximise_evidence(s, z, residual_out, n)
        scores.append(_evidence(s, z, residual_out, n, d, alpha, beta) / n)
    return float(np.mean(scores))


@dataclass
class Scores:
    knn: float
    linear: float
    logme: float

    def as_dict(self) -> dict[str, float]:
        return {"knn": self.knn, "linear_probe": self.linear, "logme": self.logme}


def score_features(feats: np.ndarray, labels: np.ndarray, seed: int = 0) -> Scores:
    return Scores(knn_accuracy(feats, labels, seed=seed), linear_probe_accuracy(feats, labels, seed=seed),
                  logme(feats, labels))


def verdict(pre: dict[str, float], rnd: dict[str, float]) -> str:
    """One plain sentence from the kNN gap (the most direct view of the feature space)."""
    gap = 100 * (pre["knn"] - rnd["knn"])
    logme_word = "higher" if pre["logme"] > rnd["logme"] else "lower"
    if gap >= 5:
        outlook = "fine-tuning from this checkpoint is likely to help"
    elif gap > -5:
        outlook = "expect little from this checkpoint over training from scratch"
    else:
        outlook = "this checkpoint may hurt: its features suit the target worse than random ones"
    return (f"pretrained features {'beat' if gap >= 0 else 'trail'} random ones by {abs(gap):.0f} points on kNN "
            f"(LogME {logme_word}): {outlook}.")


def gain_over_scratch(cfg: RunConfig, state: dict[str, torch.Tensor], meta: dict[str, Any], train_ds: Any,
                      class_names: list[str], settings: TargetSettings, seed: int, *, device: str = "cpu",
                      confidence: float = 0.9) -> dict[str, Any]:
    """Fine-tuning vs training from scratch, each trained briefly on all folds of the seed's shots
    but one and scored on the one held out (the folds and budget of `finetune.auto`). The folds
    pair the two, so the gain's interval is a paired t-interval over folds; when it spans zero,
    the prediction is "uncertain"."""
    from pipeline.stages.auto import Candidate, cv_accuracies, fold_steps
    from pipeline.stages.finetune import fold_runner

    f, d = cfg.finetune, cfg.finetune.data
    strategy = "full" if f.strategy == "auto" else f.strategy  # auto's own search is not repeated here
    tuned, scratch = Candidate(strategy, f.optim.layer_decay), Candidate("scratch")
    run_fold = fold_runner("assess", DistContext(device=torch.device(device)), settings, state, meta, len(class_names))
    accs, step = cv_accuracies(cfg, d, train_ds, class_names, seed, run_fold, [tuned, scratch])
    return {"strategy": tuned.label, "folds": len(accs[tuned]), "steps": fold_steps(cfg),
            "finetuned": accs[tuned], "scratch": accs[scratch],
            **gain_call(accs[tuned], accs[scratch], confidence=confidence, resolution=step)}


def gain_call(finetuned: list[float], scratch: list[float], *, confidence: float = 0.9,
              resolution: float = 0.0) -> dict[str, Any]:
    """The mean paired gain over folds, its two-sided t-interval, and the call it supports: help
    or hurt only when the interval excludes zero; "too easy to tell" when scratch is near 100%."""
    from pipeline.stages.auto import paired_gain

    gain, low, high = paired_gain(finetuned, scratch, confidence, resolution)
    if float(np.mean(scratch)) >= EASY_TARGET:
        call = "too easy to tell"
    elif low > 0:
        call = "likely to help"
    elif high < 0:
        call = "likely to hurt"
    else:
        call = "uncertain"
    return {"gain": gain, "interval": [low, high], "confidence": confidence, "call": call}


def gain_verdict(g: dict[str, Any]) -> str:
    """One plain sentence from the cross-validated gain over scratch."""
    pts = f"{100 * g['gain']:+.1f} points ({100 * g['confidence']:.0f}% interval {100 * g['interval'][0]:+.1f} to " \
          f"{100 * g['interval'][1]:+.1f}, {g['folds']} folds of {g['steps']} steps)"
    if g["call"] == "too easy to tell":
        return (f"a short scratch fit already reaches {100 * float(np.mean(g['scratch'])):.0f}% on held-out shots: "
                "the target is too easy for transfer to show.")
    what = {"likely to help": "fine-tuning from this checkpoint is likely to help",
            "likely to hurt": "fine-tuning from this checkpoint is likely to hurt; train from scratch",
            "uncertain": "uncertain, the difference is inside the noise of this many shots"}[g["call"]]
    return f"cross-validated on the training shots, {g['strategy']} vs scratch: {pts}: {what}."


def assess(cfg: RunConfig, checkpoint: str, *, seed: int | None = None, batch_size: int = 256,
           device: str = "cpu") -> dict[str, Any]:
    """Scores of `checkpoint` and of a random backbone on `cfg.finetune`'s target training split
    (the k-shot subset of the first seed when `shots_per_class` is set: what fine-tuning sees),
    and (with 2+ shots per class) the cross-validated gain of fine-tuning over scratch on those shots."""
    f, d = cfg.finetune, cfg.finetune.data
    seed = f.seeds[0] if seed is None else seed
    state, meta = load_checkpoint(checkpoint)
    train_ds, _, class_names = load_target_data(d)
    settings = TargetSettings.resolve(cfg, meta, train_ds).for_seed(d, train_ds, class_names, seed)  # as fine-tuning sees it
    tf = build_transform(settings.img_size, settings.in_chans, train=False, mean=settings.mean, std=settings.std,
                         normalize="image" if settings.normalize == "image" else "dataset")
    dataset = TorchImageDataset(train_ds, tf, d.image_column, d.label_column)
    indices = k_shot_indices(dataset.labels, d.shots_per_class, seed, class_names=class_names)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False)
    dev = torch.device(device)

    rows = {}
    for name in ("pretrained", "random"):
        torch.manual_seed(seed)
        model = model_from_meta(meta, num_classes=len(class_names), in_chans=settings.in_chans)
        if name == "pretrained":
            load_backbone(model, state, meta=meta)
        feats, labels = extract_features(model, loader, dev)
        rows[name] = score_features(feats, labels, seed).as_dict()
    features = verdict(rows["pretrained"], rows["random"])
    result = {
        "checkpoint": str(checkpoint),
        "target": d.source,
        "samples": len(indices),
        "num_classes": len(class_names),
        "pretrained": rows["pretrained"],
        "random": rows["random"],
        "gap": {k: rows["pretrained"][k] - rows["random"][k] for k in rows["pretrained"]},
        "verdict": features,
    }
    if len(indices) and min(np.bincount(labels, minlength=len(class_names))) >= 2:  # folds need 2 per class
        result["vs_scratch"] = gain_over_scratch(cfg, state, meta, train_ds, class_names, settings, seed, device=device)
        result["verdict"] = gain_verdict(result["vs_scratch"])
        result["feature_verdict"] = features
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"target {result['target']} ({result['samples']} training images, {result['num_classes']} classes)",
             f"{'backbone':<11} {'kNN acc':>8} {'linear':>8} {'LogME':>8}"]
    for name in ("pretrained", "random"):
        r = result[name]
        lines.append(f"{name:<11} {100 * r['knn']:>7.1f}% {100 * r['linear_probe']:>7.1f}% {r['logme']:>8.3f}")
    if "vs_scratch" in result:
        g = result["vs_scratch"]
        lines.append(f"{g['strategy']} vs scratch, held-out fold accuracy: "
                     + ", ".join(f"{100 * a:.0f}/{100 * b:.0f}" for a, b in zip(g["finetuned"], g["scratch"])))
        lines.append(f"feature space: {result['feature_verdict']}")
    lines.append(result["verdict"])
    return "\n".join(lines)
