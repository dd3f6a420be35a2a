"""Stage two's phase plans, and one sample stream through every phase of a seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.config import load_config
from pipeline.distributed import DistContext
from pipeline.inputs import TargetSettings
from pipeline.progress import Progress
from pipeline.stages.finetune import Phase, SeedRun, plan_phases
from pipeline.tracking import NullTracker

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _cfg(*overrides: str):
    return load_config(DEMO, ["launcher.kind=local", "tracking.mode=disabled", *overrides])


def test_plans_of_every_strategy():
    f = _cfg("finetune.steps=40", "finetune.optim.layer_decay=0.7", "finetune.all_lr_scale=0.2",
             "finetune.head_lr_scale=5").finetune
    assert plan_phases("linear_probe", f) == [Phase(40, "head", 5.0)]
    assert plan_phases("full", f) == [Phase(40, "all", 1.0, 0.7)]
    assert plan_phases("partial", f) == [Phase(40, "all", 1.0, 0.7)]
    assert plan_phases("head_then_all", f) == [Phase(10, "head", 5.0), Phase(30, "all", 0.2, 0.7)]
    assert plan_phases("scratch", f) == [Phase(40, "all")]  # no layer decay without pretrained weights
    with pytest.raises(ValueError, match="finetune.strategy"):
        plan_phases("everything", f)


class _Logged(Dataset):
    """Images that are their own index; every index drawn is recorded."""

    def __init__(self, n: int) -> None:
        self.n, self.drawn = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.drawn.append(i)
        return torch.full((1, 8, 8), float(i) / self.n), i % 2


def test_head_then_all_continues_the_sample_order_across_phases():
    """The second phase goes on with the stream (next epochs of a DistributedSampler), it does not
    restart at epoch 0 and replay the first phase's samples."""
    cfg = _cfg("finetune.strategy=head_then_all", "finetune.steps=8", "finetune.head_steps=3",
               "finetune.eval_every=100")
    train = _Logged(8)
    sampler = DistributedSampler(train, num_replicas=2, rank=0, shuffle=True, seed=0)  # 4 samples a rank
    loader = DataLoader(train, batch_size=2, sampler=sampler)
    test = DataLoader(_Logged(4), batch_size=4)
    meta = {"name": "resnet_tiny", "kwargs": {}}
    run = SeedRun("finetune", "head_then_all", cfg, DistContext(), NullTracker(),
                  TargetSettings(img_size=8, in_chans=1, mean=[0.5], std=[0.25]), seed=0, index=0)
    run.build_model(None, meta, num_classes=2)
    run.train(loader, test, Progress("finetune", total=8, enabled=False))

    expected = []
    for epoch in range(4):  # 8 steps x 2 samples = 4 epochs of this rank's 4 samples
        sampler.set_epoch(epoch)
        expected += list(sampler)
    assert train.drawn == expected


def _seed_run(cfg, stage: str, seed: int) -> SeedRun:
    run = SeedRun(stage, "scratch" if stage == "scratch" else "full", cfg, DistContext(), NullTracker(),
                  TargetSettings(img_size=8, in_chans=1, mean=[0.5], std=[0.25]), seed=seed, index=0)
    run.build_model(None, {"name": "resnet_tiny", "kwargs": {}}, num_classes=4)
    return run


def test_stage_two_mixes_batches_and_smooths_labels_the_same_way_for_finetune_and_scratch():
    cfg = _cfg("finetune.mix.cutmix_alpha=1.0", "finetune.mix.mixup_alpha=0.4", "finetune.label_smoothing=0.1")
    images, labels = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 2)
    engines = {stage: _seed_run(cfg, stage, seed=0).engine_for(Phase(10, "all")) for stage in ("finetune", "scratch")}
    mixed = {stage: [e.prepare_batch(images, labels) for _ in range(3)] for stage, e in engines.items()}
    for (x_ft, y_ft), (x_sc, y_sc) in zip(mixed["finetune"], mixed["scratch"]):
        assert torch.equal(x_ft, x_sc) and torch.equal(y_ft, y_sc)  # one seed, one sequence of mixes
        assert y_ft.shape == (8, 4) and torch.allclose(y_ft.sum(1), torch.ones(8))  # soft targets
    assert any(not torch.equal(x, images) for x, _ in mixed["finetune"])
    other = _seed_run(cfg, "finetune", seed=1).engine_for(Phase(10, "all")).prepare_batch(images, labels)
    assert not torch.equal(other[0], mixed["finetune"][0][0])  # another seed mixes other pairs

    logits = torch.randn(8, 4)
    loss = engines["finetune"].loss(logits, labels)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    assert not torch.isclose(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_stage_two_mixes_by_default_and_leaves_batches_alone_when_told():
    assert _seed_run(_cfg(), "finetune", seed=0).engine_for(Phase(10, "all")).prepare_batch is not None
    off = _cfg("finetune.mix.mixup_alpha=0", "finetune.mix.cutmix_alpha=0")
    engine = _seed_run(off, "finetune", seed=0).engine_for(Phase(10, "all"))
    assert engine.prepare_batch is None
    logits, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 3] * 2)
    assert torch.isclose(engine.loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_l2sp_anchors_what_came_from_the_checkpoint_and_never_the_scratch_baseline():
    meta = {"name": "resnet_tiny", "kwargs": {}}
    torch.manual_seed(7)
    from architectures import create_model

    state = create_model("resnet_tiny", num_classes=10, in_chans=1).state_dict()
    images, labels = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3] * 2)
    drift = {}
    for l2sp in (0.0, 400.0):
        cfg = _cfg(f"finetune.l2sp={l2sp}", "finetune.optim.warmup_steps=0", "finetune.optim.lr=1e-3",
                   "finetune.mix.mixup_alpha=0", "finetune.mix.cutmix_alpha=0")
        run = SeedRun("finetune", "full", cfg, DistContext(), NullTracker(),
                      TargetSettings(img_size=8, in_chans=1, mean=[0.5], std=[0.25]), seed=0, index=0)
        run.build_model(state, meta, num_classes=4)
        engine = run.engine_for(Phase(20, "all"))
        anchored = {n for g in engine.optimizer.param_groups if g["anchor"] > 0 for n in g["param_names"]}
        params = {n for n, _ in run.model.named_parameters()}
        assert anchored == (set() if l2sp == 0 else params & set(run.loaded))
        assert not any(n.startswith(run.model.head_prefix) for n in anchored)  # the new head decays to zero
        engine.fit(iter([(images, labels)] * 20), start_step=0, end_step=20, on_step=lambda *a: None)
        sd = run.model.state_dict()
        drift[l2sp] = sum((sd[n] - state[n]).norm().item() for n in params & set(run.loaded))
    assert drift[400.0] < 0.5 * drift[0.0]  # pulled back 40% of the way each step, it stays near the start

    scratch = _seed_run(_cfg("finetune.l2sp=400"), "scratch", seed=0).engine_for(Phase(10, "all"))
    assert all(g["anchor"] == 0 for g in scratch.optimizer.param_groups)


@pytest.mark.parametrize("override, key", [
    ("finetune.l2sp=-1", "finetune.l2sp"),
    ("finetune.l2sp=1000", "finetune.l2sp"),  # x lr 1e-3: all the way back every step
    ("finetune.mix.prob=2", "finetune.mix.prob"),
    ("finetune.mix.cutmix_alpha=-1", "finetune.mix.cutmix_alpha"),
    ("finetune.label_smoothing=1", "finetune.label_smoothing"),
])
def test_bad_stage_two_mix_keys_are_named(override, key):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=f"^{key.replace('.', r'[.]')}:"):
        _cfg(override)


def test_a_one_class_target_is_refused_before_training_while_mixing_is_on(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    from pipeline.config import ConfigError
    from pipeline.preflight import target_classes

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["only"])})
    split = datasets.Dataset.from_dict({"image": [Image.fromarray(np.full((8, 8), i, np.uint8)) for i in range(4)],
                                        "label": [0] * 4}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "one"))
    on = _cfg(f"finetune.data.source={tmp_path / 'one'}", "finetune.mix.mixup_alpha=0.4")
    with pytest.raises(ConfigError, match=r"^finetune[.]mix: mixing needs at least 2 classes, .* has 1"):
        target_classes(on)
    off = _cfg(f"finetune.data.source={tmp_path / 'one'}", "finetune.mix.mixup_alpha=0", "finetune.mix.cutmix_alpha=0")
    assert target_classes(off)[0] == ["only"]
