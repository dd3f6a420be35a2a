"""Parameter groups, optimiser, schedule, and their resume through a checkpoint."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_model import TinyNet, tiny_model  # noqa: E402

from pipeline.checkpoint import capture_rng_state, load_checkpoint, load_train_state, save_checkpoint  # noqa: E402
from pipeline.optim import AnchorDecay, LrFactor, build_optimizer, build_scheduler, param_groups  # noqa: E402
from pipeline.transfer import apply_freeze  # noqa: E402

LR, WD = 0.1, 0.05


def _names(group: dict) -> list[str]:
    return [name for name, _ in group["params"]]


def test_groups_cover_each_trainable_param_once() -> None:
    model = tiny_model()
    groups = param_groups(model, lr=LR, weight_decay=WD, layer_decay=0.5)
    grouped = [param for group in groups for _, param in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    for group in groups:
        assert set(group) >= {"params", "lr", "lr_scale", "weight_decay"}
        assert group["lr"] == pytest.approx(LR * group["lr_scale"])


def test_weight_decay_split() -> None:
    model = tiny_model()
    groups = param_groups(model, lr=LR, weight_decay=WD)
    assert len(groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    by_decay = {g["weight_decay"]: set(_names(g)) for g in groups}
    # ndim <= 1 (biases, norm/BN scales) and no_weight_decay() names (4-D layer scales) take none.
    vectors = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert by_decay[0.0] == vectors | {"blocks.1.gamma", "blocks.2.gamma"}
    convs = {f"blocks.{i}.conv.weight" for i in range(3)}
    assert by_decay[WD] == convs | {"stem.weight", "head.weight"}


def test_anchored_params_decay_toward_their_start_and_the_rest_toward_zero() -> None:
    """L2-SP, decoupled: with no gradient (Adam's update is then zero) each step moves an anchored
    parameter lr x anchor of the way back to its start, and another one lr x wd toward zero."""
    model = tiny_model()
    anchored = {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    groups = param_groups(model, lr=LR, weight_decay=WD, anchored=anchored, anchor=2.0)
    by_name = {name: g for g in groups for name in _names(g)}
    assert all(by_name[n]["anchor"] == 2.0 and by_name[n]["weight_decay"] == 0.0 for n in anchored)
    assert by_name["head.weight"]["anchor"] == 0.0 and by_name["head.weight"]["weight_decay"] == WD
    optimizer = build_optimizer(groups, lr=LR)
    hook = AnchorDecay(optimizer)
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)  # a fine-tune's drift
    for p in params.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.step()
    for name, p in params.items():
        if name in anchored:  # the drift of 1 shrinks by (1 - lr x anchor) per step
            assert torch.allclose(p - start[name], torch.full_like(p, (1 - LR * 2.0) ** 2), atol=1e-6), name
    head = params["head.weight"]
    assert torch.allclose(head, (start["head.weight"] + 1) * (1 - LR * WD) ** 2, atol=1e-6)
    assert len(hook.start) == len(anchored)


def test_no_anchor_means_no_hook_and_plain_groups() -> None:
    model = tiny_model()
    names = {n for n, _ in model.named_parameters()}
    assert param_groups(model, lr=LR, weight_decay=WD, anchored=names) == \
        param_groups(model, lr=LR, weight_decay=WD)  # anchor 0: the names change nothing
    assert AnchorDecay(build_optimizer(param_groups(model, lr=LR, weight_decay=WD), lr=LR)).handle is None
    with pytest.raises(ValueError, match="anchor"):
        param_groups(model, lr=LR, weight_decay=WD, anchored=names, anchor=-1.0)


def test_layer_decay_scales_follow_depth() -> None:
    model = tiny_model()
    decay = 0.5
    groups = param_groups(model, lr=LR, weight_decay=WD, layer_decay=decay)
    scale_of = {name: g["lr_scale"] for g in groups for name in _names(g)}
    blocks = model.transfer_blocks()
    expected_by_block = {prefix: decay ** (len(blocks) - i) for i, prefix in enumerate(blocks)}
    for name, scale in scale_of.items():
        prefix = "head" if name.startswith("head.") else next(b for b in blocks if name.startswith(b + "."))
        assert scale == pytest.approx(expected_by_block.get(prefix, 1.0)), name
    assert scale_of["head.weight"] == 1.0 and scale_of["stem.weight"] == decay**5
    ordered = [scale_of[name] for name, _ in model.named_parameters()]  # named_parameters runs input -> head
    assert ordered == sorted(ordered)


def test_frozen_params_are_excluded() -> None:
    model = tiny_model()
    apply_freeze(model, "head")
    groups = param_groups(model, lr=LR, weight_decay=WD, layer_decay=0.7)
    assert sorted(n for g in groups for n in _names(g)) == ["head.bias", "head.weight"]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    for param in model.head.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, lr=LR, weight_decay=WD)


def test_unplaced_param_is_named_under_layer_decay() -> None:
    model = tiny_model()
    model.extra = torch.nn.Linear(2, 2)
    param_groups(model, lr=LR, weight_decay=WD)  # no decay: placement does not matter
    with pytest.raises(ValueError, match="'extra.weight' belongs to no transfer_blocks"):
        param_groups(model, lr=LR, weight_decay=WD, layer_decay=0.5)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer_keeps_group_settings(name: str, cls: type) -> None:
    model = tiny_model()
    groups = param_groups(model, lr=LR, weight_decay=WD, layer_decay=0.5)
    optimizer = build_optimizer(groups, name=name, lr=LR)
    assert isinstance(optimizer, cls)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [g["weight_decay"] for g in groups]
    assert all(not g["fused"] for g in optimizer.param_groups)  # CPU params: never the fused kernels
    saved_names = [n for g in optimizer.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(saved_names) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(groups, name="lamb", lr=LR)  # type: ignore[arg-type]


def test_warmup_cosine_values() -> None:
    model = tiny_model()
    optimizer = build_optimizer(param_groups(model, lr=LR, weight_decay=WD, layer_decay=0.5), lr=LR)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    factors = []
    for _ in range(21):
        factors.append(optimizer.param_groups[0]["lr"] / (LR * optimizer.param_groups[0]["lr_scale"]))
        for group in optimizer.param_groups:  # one factor for every group
            assert group["lr"] == pytest.approx(LR * group["lr_scale"] * factors[-1])
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(0.25)  # warmup start: the first step already learns
    assert factors[3] == pytest.approx(1.0) and factors[4] == pytest.approx(1.0)  # warmup end
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert factors[19] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))  # final step
    assert factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_constant_schedule_and_validation() -> None:
    factor = LrFactor(warmup_steps=2, total_steps=10, schedule="constant")
    assert [factor(s) for s in (0, 1, 2, 9, 10)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert LrFactor(warmup_steps=0, total_steps=10)(0) == 1.0
    optimizer = build_optimizer(param_groups(tiny_model(), lr=LR, weight_decay=WD), name="sgd", lr=LR)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(optimizer, warmup_steps=11, total_steps=10)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        build_scheduler(optimizer, warmup_steps=0, total_steps=10, schedule="step")  # type: ignore[arg-type]


def _train(model: TinyNet, optimizer, scheduler, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        images = torch.randn(4, 3, 16, 16, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        scheduler.step()


def _stack(model: TinyNet):
    optimizer = build_optimizer(param_groups(model, lr=1e-2, weight_decay=WD, layer_decay=0.8), lr=1e-2)
    return optimizer, build_scheduler(optimizer, warmup_steps=2, total_steps=8, min_lr_ratio=0.05)


def test_optimizer_and_scheduler_resume_through_checkpoint(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = _stack(model)
    _train(model, optimizer, scheduler, steps=3, seed=0)
    train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path, 3, model, model.pretrained_cfg, train_state=train_state)

    resumed = tiny_model(seed=5)
    state_dict, meta = load_checkpoint(path)
    resumed.load_state_dict(state_dict)
    resumed_optimizer, resumed_scheduler = _stack(resumed)
    state = load_train_state(path)
    assert state is not None
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])

    assert meta["step"] == 3
    assert resumed_scheduler.last_epoch == 3
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    _train(model, optimizer, scheduler, steps=4, seed=1)
    _train(resumed, resumed_optimizer, resumed_scheduler, steps=4, seed=1)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
