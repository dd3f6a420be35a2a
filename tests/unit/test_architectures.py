"""Contract tests for every registered architecture, plus the registry's behaviour.

Every model added with `@register_model` is tested here for free: shapes at several input
sizes and channel counts, gradients, head reset, the block partition used for partial
transfer and layer-wise LR decay, checkpoint round trips and deterministic init.
GPU-sized variants run at 64 px so the file stays fast on two CPU cores.
"""

from __future__ import annotations

import ast
import copy
import itertools
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import architectures
from architectures import (
    _registry,
    create_model,
    is_model,
    list_models,
    param_in_prefix,
    partition_parameters,
    register_model,
)

NUM_CLASSES = 7
ALL_MODELS = list_models()


def input_sizes(name: str) -> tuple[int, int]:
    """Two sizes per model: its native scale for CPU variants, 64 px-ish for the GPU ones.

    The second size is odd on purpose: strided convs must cope with it.
    """
    return (32, 47) if "tiny" in name else (64, 71)


def make(name: str, num_classes: int = NUM_CLASSES, in_chans: int = 3, **kwargs) -> nn.Module:
    """A freshly created model (through the registry, seeded)."""
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


_PRISTINE: dict[tuple[str, int], nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _module_setup() -> Iterator[None]:
    # One intra-op thread: these tensors are small, and with two OpenMP threads on a
    # two-core machine that is busy elsewhere (parallel test runs) the file ran ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _PRISTINE.clear()


def built(name: str, in_chans: int = 3) -> nn.Module:
    """A private copy of a default model: building the GPU variants (~28M params) is the
    slow part of this file, so tests that need no fresh init share one build per shape."""
    key = (name, in_chans)
    if key not in _PRISTINE:
        _PRISTINE[key] = make(name, in_chans=in_chans)
    return copy.deepcopy(_PRISTINE[key])


def images(batch: int, in_chans: int, size: int) -> torch.Tensor:
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(1))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_families_are_registered() -> None:
    for name in ("hybrid_tiny", "hybrid_base", "resnet_tiny", "resnet18"):
        assert name in ALL_MODELS and is_model(name)
    hybrids = list_models("hybrid_*")
    assert {"hybrid_base", "hybrid_tiny"} <= set(hybrids)
    assert all(n.startswith("hybrid_") for n in hybrids)
    assert not is_model("no_such_model")


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shapes(name: str, in_chans: int) -> None:
    model = built(name, in_chans).eval()
    assert (model.num_classes, model.in_chans) == (NUM_CLASSES, in_chans)
    with torch.no_grad():
        for size in (16, *input_sizes(name)):  # 16 px is the smallest size the contract promises
            out = model(images(2, in_chans, size))
            assert out.shape == (2, NUM_CLASSES), (size, out.shape)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_features_and_head(name: str) -> None:
    model = built(name).eval()
    x = images(2, 3, input_sizes(name)[0])
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        assert feats.shape[0] == 2
        assert pooled.shape == (2, model.num_features)
        assert torch.equal(logits, model(x))
        assert torch.allclose(logits, model.get_classifier()(pooled), atol=1e-6)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = make(name, drop_path_rate=0.1).train()
    out = model(images(2, 3, input_sizes(name)[0]))
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_reset_classifier(name: str) -> None:
    model = built(name).eval()
    x = images(2, 3, input_sizes(name)[0])
    old_head = model.get_classifier()

    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier() is not old_head
    head_params = {n: p for n, p in model.named_parameters() if n.startswith(model.head_prefix)}
    assert head_params, f"no parameters under head_prefix {model.head_prefix!r}"
    assert all(p.shape[0] == 5 for p in head_params.values())
    assert model(x).shape == (2, 5)

    # Re-init, not a copy: a second reset to the same size draws new weights.
    before = {n: p.detach().clone() for n, p in head_params.items() if p.ndim > 1}
    model.reset_classifier(5)
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)

    model.reset_classifier(0)
    assert not any(n.startswith(model.head_prefix) for n, _ in model.named_parameters())
    with torch.no_grad():
        feats = model(x)
        assert feats.shape == (2, model.num_features)
        assert torch.equal(feats, model.forward_head(model.forward_features(x), pre_logits=True))


def test_reset_classifier_follows_backbone_dtype() -> None:
    # Stage two resets the head after moving the model; the new head must follow it.
    model = make("hybrid_tiny").to(torch.float64)
    model.reset_classifier(3)
    assert model.get_classifier().weight.dtype == torch.float64
    assert model(images(1, 3, 32).double()).dtype == torch.float64


def test_param_in_prefix_respects_dot_boundary() -> None:
    assert param_in_prefix("stages.1.blocks.0.weight", "stages.1")
    assert param_in_prefix("stages.1", "stages.1")
    assert not param_in_prefix("stages.10.blocks.0.weight", "stages.1")
    assert param_in_prefix("head.weight", "head.")
    assert not param_in_prefix("header.weight", "head.")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_parameter_in_exactly_one_block(name: str) -> None:
    model = built(name)
    blocks = model.transfer_blocks()
    assert blocks and len(set(blocks)) == len(blocks)
    assert not any(param_in_prefix(b, model.head_prefix) for b in blocks), "head listed as a block"
    # Checked here independently of partition_parameters, with plain string logic.
    for pname, _ in model.named_parameters():
        owners = [b for b in blocks if pname == b or pname.startswith(b + ".")]
        in_head = pname.startswith(model.head_prefix)
        assert len(owners) + in_head == 1, f"{pname}: blocks {owners}, head {in_head}"
    # Every block owns something (an empty block would skew partial transfer counts),
    # and the library helper agrees with the check above.
    partition = partition_parameters(model)
    assert list(partition.blocks) == blocks
    assert all(partition.blocks.values()), [b for b, ps in partition.blocks.items() if not ps]
    assert sorted(itertools.chain(*partition.blocks.values(), partition.head)) == sorted(
        n for n, _ in model.named_parameters()
    )


def test_partition_rejects_orphans_and_overlaps() -> None:
    model = make("hybrid_tiny")
    model.transfer_blocks = lambda: ["stem", "stages"]  # misses "norm"
    with pytest.raises(ValueError, match=r"norm\.weight"):
        partition_parameters(model)
    model.transfer_blocks = lambda: ["stem", "stages", "stages.0", "norm"]
    with pytest.raises(ValueError, match="more than one block"):
        partition_parameters(model)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_input_conv_and_no_weight_decay_names(name: str, in_chans: int) -> None:
    model = built(name, in_chans)
    params = dict(model.named_parameters())
    assert params[model.input_conv_name].ndim == 4
    assert params[model.input_conv_name].shape[1] == in_chans
    assert set(model.no_weight_decay()) <= set(params)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_rebuild_from_pretrained_cfg(name: str) -> None:
    model = make(name, drop_path_rate=0.05)
    # A checkpoint stores the cfg as JSON (tuples become lists); the rebuild must still work.
    cfg = json.loads(json.dumps(model.pretrained_cfg))
    # The factory's own defaults are recorded too (when it reports them), so a checkpoint rebuilds
    # its model even after a default changes.
    defaults = json.loads(json.dumps(getattr(model, "resolved_kwargs", {})))
    assert cfg == {"name": name, "kwargs": {**defaults, "drop_path_rate": 0.05}}
    rebuilt = create_model(cfg["name"], NUM_CLASSES, 3, **cfg["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}


def test_strata_checkpoints_record_the_defaults_they_were_built_with() -> None:
    kwargs = make("hybrid_tiny").pretrained_cfg["kwargs"]
    assert kwargs["conv_norm"] == "batch" and kwargs["dims"] == [16, 48, 96]
    old = create_model("hybrid_tiny", NUM_CLASSES, 3, **{**kwargs, "conv_norm": "layer"})
    assert old.pretrained_cfg["kwargs"]["conv_norm"] == "layer"
    assert not any("running_mean" in k for k in old.state_dict())


def test_rebuild_with_sequence_kwargs_through_json() -> None:
    model = make("hybrid_tiny", dims=(16, 32, 64), depths=(1, 1, 1), conv_stages=2, num_heads=(2,))
    cfg = json.loads(json.dumps(model.pretrained_cfg))
    rebuilt = create_model(cfg["name"], NUM_CLASSES, 1, **cfg["kwargs"])
    assert rebuilt.num_features == 64
    assert model.state_dict().keys() == rebuilt.state_dict().keys()


def test_pretrained_cfg_does_not_alias_caller_kwargs() -> None:
    dims = [16, 32, 64]
    model = make("hybrid_tiny", dims=dims, num_heads=2)
    dims.append(128)
    assert model.pretrained_cfg["kwargs"]["dims"] == [16, 32, 64]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_deterministic_init(name: str) -> None:
    a, b = make(name).state_dict(), make(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_batch_size_independence(name: str) -> None:
    """Models without BatchNorm give a sample the same output alone or within a batch, in train mode."""
    model = built(name).train()
    if has_batchnorm(model):
        pytest.skip("BatchNorm couples samples in train mode by design")
    x = images(4, 3, input_sizes(name)[0])
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_hybrid_variants_and_kwargs() -> None:
    tiny = make("hybrid_tiny")
    n_params = sum(p.numel() for p in tiny.parameters())
    assert 0.15e6 <= n_params <= 0.6e6, n_params
    # Stem /2 then two /2 downsamples: a 32 px image ends as 4x4 tokens.
    assert tiny.forward_features(images(1, 3, 32)).shape == (1, tiny.num_features, 4, 4)
    # The default is all-conv; attention-last and all-attention variants are the same family.
    for conv_stages in (0, 2):
        model = make("hybrid_tiny", conv_stages=conv_stages, num_heads=2)
        assert model(images(2, 3, 32)).shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match="num_heads"):
        make("hybrid_tiny", num_heads=(2, 2, 2))
    with pytest.raises(ValueError, match="dims"):
        make("hybrid_tiny", dims=(16, 32))


def test_strata_norm_kwargs() -> None:
    """down_norm picks the norm before each downsampling conv, head_norm the pooled vector's;
    without parameters in the head norm, `norm` is no transfer block (every block owns some)."""
    model = make("hybrid_tiny", down_norm="batch", head_norm="none")
    assert isinstance(model.stages[1].downsample[0], nn.BatchNorm2d)
    assert isinstance(model.norm, nn.Identity) and "norm" not in model.transfer_blocks()
    assert all(partition_parameters(model).blocks.values())
    assert model(images(2, 3, 32)).shape == (2, NUM_CLASSES)
    cfg = json.loads(json.dumps(model.pretrained_cfg))
    rebuilt = create_model(cfg["name"], NUM_CLASSES, 3, **cfg["kwargs"])
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert isinstance(make("hybrid_tiny", head_norm="batch").norm, nn.BatchNorm1d)
    with pytest.raises(ValueError, match="head_norm"):
        make("hybrid_tiny", head_norm="group")
    with pytest.raises(ValueError, match="norm must be layer or batch"):
        make("hybrid_tiny", down_norm="none")


def test_unknown_name_lists_models() -> None:
    with pytest.raises(ValueError) as err:
        create_model("hybird_tiny", num_classes=3)
    message = str(err.value)
    assert "'hybird_tiny'" in message
    assert all(name in message for name in ALL_MODELS)


USER_MODULE = '''
from torch import nn
from architectures import TransferModel


class LinearProbeNet(TransferModel):
    """A user's own model outside the package: one conv, pooled, linear head."""

    def __init__(self, num_classes, in_chans, width=8):
        super().__init__()
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, width
        self.input_conv_name = "conv.weight"
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.head = self._make_head(num_classes)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def transfer_blocks(self):
        return ["conv"]


def build(num_classes, in_chans, **kwargs):
    return LinearProbeNet(num_classes, in_chans, **kwargs)


def build_incomplete(num_classes, in_chans):
    return nn.Conv2d(in_chans, num_classes, 1)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module written to tmp_path and put on sys.path, as a user's own package would be."""
    name = "transferline_user_models"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_import_path_model(user_module: str) -> None:
    path = f"{user_module}:build"
    assert is_model(path)
    model = create_model(path, num_classes=4, in_chans=1, width=6)
    assert model.pretrained_cfg == {"name": path, "kwargs": {"width": 6}}
    assert model(images(2, 1, 16)).shape == (2, 4)
    assert model.num_features == 6


def test_import_path_errors(user_module: str) -> None:
    with pytest.raises(TypeError, match=r"forward_features.*reset_classifier"):
        create_model(f"{user_module}:build_incomplete", num_classes=4)
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        create_model("no_such_module_xyz:build", num_classes=4)
    with pytest.raises(ValueError, match="missing_factory"):
        create_model(f"{user_module}:missing_factory", num_classes=4)
    with pytest.raises(ValueError, match="not callable"):
        create_model(f"{user_module}:NOT_CALLABLE", num_classes=4)
    assert not is_model(f"{user_module}:missing_factory")


def test_register_model_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    # Work on a copy so the test's registrations do not leak into other tests.
    monkeypatch.setattr(_registry, "_MODEL_FACTORIES", dict(_registry._MODEL_FACTORIES))

    @register_model(name="contract_test_net")
    def factory(num_classes: int, in_chans: int = 3) -> nn.Module:
        return architectures.hybrid.hybrid_tiny(num_classes, in_chans, dims=(8, 16, 32), num_heads=1)

    assert "contract_test_net" in list_models()
    assert create_model("contract_test_net", 2).pretrained_cfg["name"] == "contract_test_net"
    with pytest.raises(ValueError, match="already registered"):
        register_model(factory, name="contract_test_net")
    with pytest.raises(ValueError, match="already registered"):
        register_model(architectures.hybrid.hybrid_tiny)


def test_architectures_never_imports_pipeline() -> None:
    package_dir = Path(architectures.__file__).parent
    for source in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "pipeline" for m in modules), source.name
