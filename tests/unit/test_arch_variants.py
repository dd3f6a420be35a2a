"""scripts/arch_variants.py: every screening variant builds through the registry's import path,
keeps the model contract, and makes the one change it names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import arch_variants  # noqa: E402
from architectures import create_model  # noqa: E402

NAMES = ["stem1", "wide24", "stem1_four_stages", "depths122", "down_batchnorm", "dense", "dense_batchnorm",
         "torch_init", "resnet_half_res", "narrow32", "stem32"]


@pytest.mark.parametrize("name", NAMES)
def test_each_variant_builds_by_import_path_and_classifies(name: str) -> None:
    model = create_model(f"arch_variants:{name}", num_classes=9, in_chans=3)  # runs the contract check
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 9)


def test_the_structural_variants_change_what_they_name() -> None:
    x = torch.randn(1, 3, 32, 32)
    base = create_model("hybrid_tiny", num_classes=9)
    dense = arch_variants.dense(num_classes=9)
    depthwise = [m for m in dense.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (3, 3)]
    assert not depthwise and sum(p.numel() for p in dense.parameters()) > sum(p.numel() for p in base.parameters())
    assert arch_variants.stem1(num_classes=9).forward_features(x).shape[-1] == 2 * base.forward_features(x).shape[-1]
    half = arch_variants.resnet_half_res(num_classes=9).forward_features(x).shape[-1]
    assert half * 2 == create_model("resnet_tiny", num_classes=9).forward_features(x).shape[-1]
    torch.manual_seed(0)
    default_init = arch_variants.torch_init(num_classes=9).stem[0].weight.std()
    assert default_init > 3 * base.stem[0].weight.std()  # Kaiming-uniform, not trunc-normal(0.02)


def test_the_32px_variants_add_full_resolution_work_and_keep_the_16px_stages() -> None:
    x = torch.randn(1, 3, 32, 32)
    base = create_model("hybrid_tiny", num_classes=9)
    narrow, stem32 = arch_variants.narrow32(num_classes=9), arch_variants.stem32(num_classes=9)
    # narrow32: an 8-channel stage at 32 px, then hybrid_tiny's stages; same final map.
    assert narrow.stages[0](narrow.stem(x)).shape == (1, 8, 32, 32)
    assert narrow.forward_features(x).shape == base.forward_features(x).shape
    # stem32: one more 3x3 conv at full resolution before the stem's stride-2 conv.
    convs = [m for m in stem32.stem if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1), (1, 1), (2, 2)] and convs[1].in_channels == convs[1].out_channels
    assert stem32.forward_features(x).shape == base.forward_features(x).shape
