"""Weight transfer: compatibility refusal, channel adaptation, partial transfer, linear-probe freezing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_model import TinyNet, tiny_model  # noqa: E402

from architectures import param_in_prefix as under_prefix  # noqa: E402
from pipeline.transfer import (  # noqa: E402
    IncompatibleCheckpointError,
    adapt_input_conv,
    apply_freeze,
    check_compatible,
    clean_state_dict,
    load_backbone,
    set_backbone_eval,
)

BLOCKS = ["stem", "blocks.0", "blocks.1", "blocks.2", "norm"]


def _pretrained(in_chans: int = 3, seed: int = 1) -> TinyNet:
    """A source model whose every tensor (norm scales and BatchNorm stats too) moved off its init."""
    model = tiny_model(num_classes=10, in_chans=in_chans, seed=seed)
    model.train()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        model(torch.randn(4, in_chans, 8, 8) * 3 + 1)
    return model.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_under_prefix_respects_dot_boundaries() -> None:
    assert under_prefix("blocks.1.conv.weight", "blocks.1")
    assert under_prefix("head.weight", "head.")
    assert under_prefix("norm", "norm")
    assert not under_prefix("blocks.10.conv.weight", "blocks.1")
    assert not under_prefix("normal.weight", "norm")


def test_compatible_across_head_and_channels() -> None:
    source = _pretrained()
    check_compatible(tiny_model(num_classes=3, in_chans=1), source.state_dict())
    check_compatible(tiny_model(num_classes=3), {f"module.{k}": v for k, v in source.state_dict().items()})


def test_refusal_lists_names_shapes_and_architecture() -> None:
    source = tiny_model(width=8)
    target = tiny_model(num_classes=5, width=12, seed=3)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_backbone(target, source.state_dict(), meta={"name": "tiny_test", "kwargs": {"width": 8}})
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "blocks.0.conv.weight: checkpoint (8, 8, 3, 3) vs model (12, 12, 3, 3)" in message
    assert "stem.weight: checkpoint (8, 3, 3, 3) vs model (12, 3, 3, 3)" in message
    assert "blocks.0.bn.running_mean: checkpoint (8,) vs model (12,)" in message
    assert "head" not in message.split("\n", 1)[1].replace("(ignoring head.)", "")
    assert "checkpoint meta says 'tiny_test' {'width': 8} vs model 'tiny_test' {'width': 12}" in message
    # Nothing was copied before the refusal.
    assert not torch.equal(target.stem.weight[:8], source.stem.weight)


def test_refusal_says_when_the_same_name_and_kwargs_build_another_model() -> None:
    """A checkpoint written before the architecture's code changed: its meta matches the model's."""
    source = tiny_model(width=8)
    target = tiny_model(width=12, seed=3)
    target.pretrained_cfg = {"name": "tiny_test", "kwargs": {"width": 8}}
    with pytest.raises(IncompatibleCheckpointError, match="code or defaults changed since this checkpoint"):
        load_backbone(target, source.state_dict(), meta={"name": "tiny_test", "kwargs": {"width": 8}})


def test_refusal_lists_missing_and_unexpected_with_truncation() -> None:
    state_dict = _pretrained().state_dict()
    del state_dict["blocks.1.gamma"]
    state_dict.update({f"extra.{i}": torch.zeros(1) for i in range(13)})
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_compatible(tiny_model(), state_dict)
    message = str(info.value)
    assert "1 missing from checkpoint: blocks.1.gamma" in message
    assert "13 unexpected in checkpoint: extra.0, extra.1" in message
    assert "(+3 more)" in message and "extra.12" not in message


def test_unadaptable_channels_are_refused() -> None:
    expected = r"stem.weight: checkpoint \(8, 3, 3, 3\) vs model \(8, 4, 3, 3\) \(input channels cannot be adapted\)"
    with pytest.raises(IncompatibleCheckpointError, match=expected):
        check_compatible(tiny_model(in_chans=4), _pretrained().state_dict())
    with pytest.raises(ValueError, match="cannot adapt stem.weight from 3 to 2"):
        adapt_input_conv(torch.randn(8, 3, 3, 3), 2, name="stem.weight")


def test_adapt_rgb_to_grey_matches_grey_image_response() -> None:
    weight = torch.randn(6, 3, 3, 3)
    grey = torch.randn(2, 1, 9, 9)
    adapted = adapt_input_conv(weight, 1)
    assert adapted.shape == (6, 1, 3, 3)
    assert torch.allclose(adapted, weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(F.conv2d(grey, adapted), F.conv2d(grey.expand(-1, 3, -1, -1), weight))


def test_adapt_grey_to_rgb_matches_grey_image_response() -> None:
    weight = torch.randn(6, 1, 3, 3)
    grey = torch.randn(2, 1, 9, 9)
    adapted = adapt_input_conv(weight, 3)
    assert adapted.shape == (6, 3, 3, 3)
    assert torch.allclose(adapted, weight.expand(-1, 3, -1, -1) / 3)
    torch.testing.assert_close(F.conv2d(grey.expand(-1, 3, -1, -1), adapted), F.conv2d(grey, weight))


@pytest.mark.parametrize("target_chans", [1, 3])
def test_full_transfer_copies_backbone_and_adapts_input(target_chans: int) -> None:
    source = _pretrained(in_chans=3)
    target = tiny_model(num_classes=4, in_chans=target_chans, seed=2)
    head_before = _snapshot(target.head)

    report = load_backbone(target, source.state_dict())

    non_head = [k for k in target.state_dict() if not k.startswith("head.")]
    assert report["loaded"] == non_head
    assert report["reinitialised"] == ["head.weight", "head.bias"]
    assert report["adapted"] == (["stem.weight"] if target_chans == 1 else [])
    for name, tensor in target.state_dict().items():
        if name.startswith("head."):
            assert torch.equal(tensor, head_before[name.removeprefix("head.")])
        elif name != "stem.weight" or target_chans == 3:
            assert torch.equal(tensor, source.state_dict()[name]), name
    # Same features for a grey image, whichever way it is fed.
    grey = torch.randn(2, 1, 16, 16)
    target.eval()
    torch.testing.assert_close(
        target.forward_features(grey if target_chans == 1 else grey.expand(-1, 3, -1, -1)),
        source.forward_features(grey.expand(-1, 3, -1, -1)),
    )


@pytest.mark.parametrize("keep_blocks", range(len(BLOCKS) + 1))
def test_partial_transfer_copies_exactly_first_blocks(keep_blocks: int) -> None:
    source = _pretrained()
    target = tiny_model(num_classes=4, seed=2)
    fresh = _snapshot(target)

    report = load_backbone(target, source.state_dict(), keep_blocks=keep_blocks)

    kept = BLOCKS[:keep_blocks]
    expected_loaded = [k for k in fresh if any(under_prefix(k, p) for p in kept)]
    assert report["loaded"] == expected_loaded
    assert set(report["reinitialised"]) == set(fresh) - set(expected_loaded)
    for name, tensor in target.state_dict().items():
        expected = source.state_dict()[name] if name in expected_loaded else fresh[name]
        assert torch.equal(tensor, expected), name
        # The fixture differs everywhere it matters, so equality above is not vacuous.
        if name in expected_loaded:
            assert not torch.equal(tensor, fresh[name]), name
    if keep_blocks >= 2:  # BatchNorm buffers travel with their block
        assert "blocks.0.bn.running_var" in report["loaded"]


def test_shrink_and_perturb_mixes_checkpoint_and_fresh_init_in_copied_parameters_only() -> None:
    source = _pretrained()
    target = tiny_model(num_classes=4, seed=2)
    fresh = _snapshot(target)
    parameters = {name for name, _ in target.named_parameters()}

    report = load_backbone(target, source.state_dict(), keep_blocks=3, shrink=0.6, perturb=0.3)

    loaded = set(report["loaded"])
    assert "blocks.0.bn.running_var" in loaded and "stem.weight" in loaded and "head.weight" not in loaded
    for name, tensor in target.state_dict().items():
        if name not in loaded:  # the head and the re-initialised blocks keep their fresh init
            expected = fresh[name]
        elif name in parameters:
            expected = 0.6 * source.state_dict()[name] + 0.3 * fresh[name]
        else:  # buffers (BatchNorm's running statistics) are copied as they are
            expected = source.state_dict()[name]
        assert torch.allclose(tensor, expected), name
    # the mix is neither the checkpoint nor the fresh init
    assert not torch.allclose(target.state_dict()["stem.weight"], source.state_dict()["stem.weight"])


def test_keep_blocks_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"keep_blocks=6 is outside 0..5"):
        load_backbone(tiny_model(), _pretrained().state_dict(), keep_blocks=6)


def test_clean_state_dict_strips_wrappers() -> None:
    assert list(clean_state_dict({"module._orig_mod.a": torch.zeros(1)})) == ["a"]


def test_apply_freeze_plans() -> None:
    model = tiny_model()
    head_numel = sum(p.numel() for p in model.head.parameters())
    assert apply_freeze(model, "head") == head_numel
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert apply_freeze(model, "all") == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="'head' or 'all'"):
        apply_freeze(model, "backbone")  # type: ignore[arg-type]
    headless = tiny_model(num_classes=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        apply_freeze(headless, "head")


def _probe_steps(model: TinyNet, *, backbone_eval: bool) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        if backbone_eval:
            set_backbone_eval(model)
        images = torch.randn(8, 3, 16, 16, generator=generator) * 2 + 0.5
        labels = torch.randint(0, 4, (8,), generator=generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_linear_probe_keeps_backbone_bit_identical() -> None:
    model = tiny_model(num_classes=4)
    load_backbone(model, _pretrained().state_dict())
    before = _snapshot(model)
    apply_freeze(model, "head")

    _probe_steps(model, backbone_eval=True)

    assert model.training and model.head.training and not model.blocks[0].bn.training

    # Through a wrapper (as under DDP), the same plan still finds the head.
    wrapper = nn.Module()
    wrapper.module = model
    wrapper.train()
    set_backbone_eval(wrapper)
    assert model.head.training and not model.blocks[0].bn.training
    after = model.state_dict()
    for name, tensor in before.items():
        if name.startswith("head."):
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


def test_frozen_params_alone_do_not_freeze_batchnorm_stats() -> None:
    # The control for the test above: requires_grad=False without eval still moves BN stats.
    model = tiny_model(num_classes=4)
    before = _snapshot(model)
    apply_freeze(model, "head")
    _probe_steps(model, backbone_eval=False)
    assert not torch.equal(model.blocks[0].bn.running_mean, before["blocks.0.bn.running_mean"])


def _architectures():
    try:
        import architectures
    except ImportError:
        return None
    return architectures if hasattr(architectures, "create_model") and hasattr(architectures, "list_models") else None


_ARCH = _architectures()


@pytest.mark.skipif(_ARCH is None, reason="architectures.create_model is not available yet")
@pytest.mark.parametrize("name", _ARCH.list_models() if _ARCH is not None else [])
def test_transfer_on_registered_model(name: str) -> None:
    from pipeline.optim import param_groups

    torch.manual_seed(0)
    source = _ARCH.create_model(name, num_classes=10, in_chans=3)
    target = _ARCH.create_model(name, num_classes=4, in_chans=1)
    fresh = _snapshot(target)
    blocks = target.transfer_blocks()
    kept = blocks[: len(blocks) // 2]

    report = load_backbone(target, source.state_dict(), keep_blocks=len(kept), meta=source.pretrained_cfg)

    assert set(report["loaded"]).isdisjoint(report["reinitialised"])
    assert set(report["loaded"]) | set(report["reinitialised"]) == set(fresh)
    assert report["adapted"] == [target.input_conv_name]  # the stem is always among the kept blocks
    for key, tensor in target.state_dict().items():
        if any(under_prefix(key, prefix) for prefix in kept):
            expected = source.state_dict()[key]
            if key == target.input_conv_name:
                expected = adapt_input_conv(expected, 1)
            assert torch.equal(tensor, expected), key
        else:
            assert torch.equal(tensor, fresh[key]), key
    # Layer-wise LR decay can place every parameter of the real model.
    groups = param_groups(target, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(target.parameters()))
    # Full transfer, then a forward pass at the target's channel count.
    load_backbone(target, source.state_dict())
    target.eval()
    assert target(torch.randn(2, 1, 32, 32)).shape == (2, 4)
