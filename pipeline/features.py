"""Frozen-feature extraction: the pooled pre-logit features a backbone gives a set of images.

Shared by the downstream monitor (during stage one) and `assess` (before stage two).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Pooled pre-logit features (the head's input) and labels, in eval mode."""
    model.eval().to(device)
    feats, labels = [], []
    for images, y in loader:
        f = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        feats.append(f.float().cpu().numpy())
        labels.append(np.asarray(y))
    return np.concatenate(feats).astype(np.float64), np.concatenate(labels)
