"""The downstream monitor measures what it claims: kNN accuracy of a fixed target subset."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from architectures import create_model
from pipeline.monitor import DownstreamMonitor


class PixelFeatures(nn.Module):
    """Features = the normalised pixels themselves: kNN on digits pixels is known to be strong."""

    def forward_features(self, x):
        return x.flatten(1)

    def forward_head(self, x, pre_logits=False):
        return x


def _target(tiny_data):
    return SimpleNamespace(source=tiny_data["digits"], train_split="train", test_split="test",
                           image_column="image", label_column="label")


def test_monitor_scores_pixels_high_and_records_cost(tiny_data):
    mon = DownstreamMonitor([("digits", _target(tiny_data))], img_size=8, in_chans=1, mean=[0.5], std=[0.5],
                            shots=10, queries=200)
    assert len(mon.targets[0].memory.dataset) == 100 and len(mon.targets[0].queries.dataset) == 200
    pixels = mon(PixelFeatures(), torch.device("cpu"))["digits"]
    assert pixels > 0.8  # 10-shot kNN on raw 8x8 digits
    model = create_model("hybrid_tiny", num_classes=5, in_chans=1)
    model.train()
    random_feats = mon(model, torch.device("cpu"))["digits"]
    assert 0.0 <= random_feats <= 1.0
    assert model.training, "the monitor must hand the model back in train mode"
    assert mon.calls == 2 and mon.seconds > 0
    # Fixed subset: the same model scores the same every time.
    assert mon(model, torch.device("cpu"))["digits"] == random_feats
