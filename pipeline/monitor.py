"""Downstream monitor: while stage one trains, how good are its features for the targets?

Every N steps rank 0 embeds a small fixed subset of each target with the current backbone (no
gradients, eval mode) and records kNN accuracy: `shots` training images per class are the
memory, a fixed slice of the test split the queries. The curve shows when more pretraining
stops paying for the targets. Its cost is timed and reported as a share of training time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from torch.utils.data import DataLoader, Subset

from pipeline.data.target import TorchImageDataset, k_shot_indices
from pipeline.features import extract_features
from pipeline.inputs import load_target_data
from pipeline.data.transforms import build_transform


@dataclass
class MonitorTarget:
    name: str
    memory: DataLoader
    queries: DataLoader


class DownstreamMonitor:
    def __init__(self, targets: list[tuple[str, object]], *, img_size: int, in_chans: int, mean: list[float],
                 std: list[float], shots: int = 10, queries: int = 200, seed: int = 0, batch_size: int = 256) -> None:
        """`targets`: (name, TargetDataConfig-like with source/splits/columns) pairs. Images are
        converted to the pretraining model's channels and size, so no adaptation is needed."""
        tf = build_transform(img_size, in_chans, train=False, mean=mean, std=std)
        self.targets: list[MonitorTarget] = []
        for name, d in targets:
            train_ds, test_ds, names = load_target_data(d)
            train = TorchImageDataset(train_ds, tf, d.image_column, d.label_column)
            test = TorchImageDataset(test_ds, tf, d.image_column, d.label_column)
            mem_idx = k_shot_indices(train.labels, shots, seed, class_names=names)
            rng = np.random.default_rng(seed)
            q_idx = sorted(rng.choice(len(test), size=min(queries, len(test)), replace=False).tolist())
            self.targets.append(MonitorTarget(
                name,
                DataLoader(Subset(train, mem_idx), batch_size=batch_size),
                DataLoader(Subset(test, q_idx), batch_size=batch_size),
            ))
        self.seconds = 0.0
        self.calls = 0

    @torch.no_grad()
    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        t0 = time.perf_counter()
        was_training = model.training
        out = {}
        for t in self.targets:
            mem_x, mem_y = extract_features(model, t.memory, device)
            q_x, q_y = extract_features(model, t.queries, device)
            k = max(1, min(5, len(mem_y) // len(np.unique(mem_y))))
            knn = KNeighborsClassifier(n_neighbors=k).fit(normalize(mem_x), mem_y)
            out[t.name] = float((knn.predict(normalize(q_x)) == q_y).mean())
        model.train(was_training)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out
