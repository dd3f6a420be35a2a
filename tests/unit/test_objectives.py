"""Label-free stage one: NT-Xent, the SimCLR objective, view augmentation, streams without labels,
and the dead-leaves corpus."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from architectures import create_model
from pipeline.config import ConfigError, load_config
from pipeline.data.augment import BatchNormalize, ViewAugment
from pipeline.data.deadleaves import leaf_radii, make_deadleaves_shards, render_dead_leaves
from pipeline.data.shards import NO_LABEL, DataConfigError, build_shard_loader, plan_stream, probe_stream
from pipeline.distributed import DistContext
from pipeline.engine import Engine
from pipeline.objectives import DINO, BatchMix, SimCLR, build_objective, nt_xent, objective_param_groups, view_augment
from pipeline.optim import build_optimizer, build_scheduler
from tests.conftest import REPO
from tests.unit._shard_fixtures import png, write_shard

DEMO = REPO / "configs" / "demo.yaml"


# --------------------------------------------------------------------------- NT-Xent


def test_nt_xent_is_near_zero_for_matching_views_and_log_n_for_uninformative_ones():
    z = torch.eye(16)[:8] * 3  # 8 samples with orthogonal features, each view identical to its partner
    assert nt_xent(torch.repeat_interleave(z, 2, 0), temperature=0.05).item() < 1e-6
    # All views equal: each row's positive is one of 2N - 1 equally likely candidates.
    flat = torch.ones(16, 4)
    assert nt_xent(flat, temperature=0.5).item() == pytest.approx(math.log(15), rel=1e-5)


def test_nt_xent_pairs_rows_2i_and_2i_plus_1():
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    swapped = z[[0, 2, 1, 3]]  # row 0's partner is now a different sample's view
    good = torch.stack([z[0], z[0] + 0.01, z[1], z[1] + 0.01])
    bad = torch.stack([z[0], z[1], z[0] + 0.01, z[1] + 0.01])
    assert nt_xent(good, 0.1) < nt_xent(bad, 0.1)
    assert torch.isfinite(nt_xent(swapped, 0.1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_rank(rank: int, port: int, z: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = z[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        loss = nt_xent(mine, 0.2)
        # DDP averages gradients over ranks: the mean of the ranks' losses is the global-batch loss.
        (loss / 2).backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nt_xent_over_two_ranks_equals_one_process_over_the_global_batch(tmp_path):
    """Every rank's views are the negatives: 2 ranks x 2 samples = the loss and gradients of 4 samples."""
    z = torch.randn(8, 6)
    mp.start_processes(_gathered_rank, args=(_free_port(), z, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = z.clone().requires_grad_(True)
    loss = nt_xent(whole, 0.2)
    loss.backward()
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), atol=1e-6)
    # Each rank's gradient reaches only its own rows here; all-reduce (DDP) sums the others' share in.
    assert torch.allclose(torch.cat([ranks[0]["grad"], ranks[1]["grad"]]), whole.grad, atol=1e-6)


# --------------------------------------------------------------------------- the objective


def _simclr(width: int = 16) -> SimCLR:
    torch.manual_seed(0)
    backbone = create_model("resnet_tiny", num_classes=0, in_chans=3)
    return SimCLR(backbone, proj_hidden=32, proj_dim=width, temperature=0.2)


def test_simclr_keeps_its_projection_head_out_of_the_backbone():
    objective = _simclr()
    extra = objective.extra_state()
    assert extra and all(k.startswith("projector.") for k in extra)
    assert "projector.1.running_mean" in extra  # buffers too: a resumed run continues bit-identically
    other = _simclr()
    with torch.no_grad():
        for p in other.projector.parameters():
            p.add_(1.0)
    other.load_extra_state(extra)
    assert all(torch.equal(a, b) for a, b in zip(other.projector.state_dict().values(), extra.values()))
    with pytest.raises(ValueError, match="objective state does not fit"):
        other.load_extra_state({"projector.9.weight": torch.zeros(1)})


def test_objective_groups_keep_backbone_names_and_add_the_projector():
    objective = _simclr()
    groups = objective_param_groups(objective, lr=1e-3, weight_decay=0.05)
    names = [n for g in groups for n, _ in g["params"]]
    assert set(names) == {n for n, _ in objective.backbone.named_parameters()} | {
        f"projector.{n}" for n, _ in objective.projector.named_parameters()}
    decay = {n for g in groups if g["weight_decay"] for n, _ in g["params"]}
    assert "projector.0.weight" in decay and "projector.0.bias" not in decay


def test_simclr_loss_falls_on_tiny_data():
    """Two views of 8 dead-leaves images, trained by the engine as stage one trains it. (Views of
    uniform noise share nothing at 50% crops: its loss stays at chance, log 15.)"""
    objective = _simclr()
    views = ViewAugment(16, 3, views=2, min_scale=0.5, jitter_p=0.0, grayscale_p=0.0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(render_dead_leaves(rng, 16)) for _ in range(8)]
    norm = BatchNormalize([0.5], [0.25], 3)
    optimizer = build_optimizer(objective_param_groups(objective, lr=3e-3, weight_decay=0.0), name="adamw", lr=3e-3)
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=40, schedule="constant")
    engine = Engine(objective, optimizer, scheduler, DistContext(), loss=objective.loss, log_every=10)
    torch.manual_seed(1)

    def batches():
        while True:
            yield norm(torch.stack([views(im) for im in images])), torch.full((8,), NO_LABEL)

    first = objective.loss(objective(next(batches())[0].flatten(0, 1)), None).item()
    windows: list[float] = []
    engine.fit(batches(), start_step=0, end_step=40, on_step=lambda step, st: st and windows.append(st.loss))
    assert windows[-1] < 0.5 * first and windows[-1] < windows[0], (first, windows)
    assert engine.samples_seen == 40 * 8  # samples, not views


def test_build_objective_follows_the_config():
    cfg = load_config(DEMO, ["pretrain.objective=simclr", "pretrain.simclr.proj_dim=32"], command="pretrain")
    objective = build_objective(cfg.pretrain, create_model("hybrid_tiny", num_classes=0, in_chans=3))
    assert isinstance(objective, SimCLR) and objective.projector[-1].out_features == 32 and objective.views == 2
    assert not cfg.pretrain.labeled


@pytest.mark.parametrize("override, key", [
    ("pretrain.objective=byol", "pretrain.objective"),
    ("pretrain.simclr.temperature=0", "pretrain.simclr.temperature"),
    ("pretrain.views.jitter_p=1.5", "pretrain.views.jitter_p"),
    ("pretrain.views.min_scale=0", "pretrain.views.min_scale"),
])
def test_bad_objective_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(DEMO, ["pretrain.objective=simclr", override], command="pretrain")


def test_device_decode_is_refused_for_views():
    with pytest.raises(ConfigError, match="^pretrain.data.decode: simclr draws its views in the loader workers"):
        load_config(DEMO, ["pretrain.objective=simclr", "pretrain.data.decode=device"], command="pretrain")


# --------------------------------------------------------------------------- views


def test_views_are_independent_draws_governed_by_the_rng():
    views = ViewAugment(16, 3, views=2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    torch.manual_seed(0)
    a = views(image)
    torch.manual_seed(0)
    b = views(image)
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    grey = ViewAugment(16, 1, views=3)(image)
    assert grey.shape == (3, 1, 16, 16)
    assert BatchNormalize([0.5], [0.25], 1)(grey.unsqueeze(0)).shape == (1, 3, 1, 16, 16)


# --------------------------------------------------------------------------- streams without labels


def _unlabelled(root: Path, *, text: bool = False, image: bool = True) -> str:
    for s in range(2):
        samples = []
        for j in range(8):
            sample = {"__key__": f"s{s}_{j:02d}"}
            if image:
                sample["png"] = png(10 * s + j)
            if text:
                sample["txt"] = f"a photo of thing {j}".encode()
                sample["json"] = json.dumps({"caption": "x"}).encode()
            samples.append(sample)
        write_shard(root / f"u-{s}.tar", samples)
    return str(root / "u-{0..1}.tar")


@pytest.mark.parametrize("text", [False, True])
def test_a_stream_without_label_key_reads_shards_with_no_labels(tmp_path, text):
    urls = _unlabelled(tmp_path, text=text)
    loader = build_shard_loader(urls, rank=0, world_size=1, batch_size=4, num_workers=0, steps=4,
                                shuffle_buffer=0, transform=ViewAugment(8, 3), label_key="")
    batches = list(loader)
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == (4, 2, 3, 8, 8) and labels.tolist() == [NO_LABEL] * 4
    assert loader.summary()["skipped_samples"] == 0
    assert probe_stream(plan_stream(urls, read_index=True), image_key="png;jpg", label_key="")["usable"] == 16


def test_label_free_shards_still_need_labels_for_a_supervised_run(tmp_path):
    urls = _unlabelled(tmp_path)
    with pytest.raises(DataConfigError, match="^pretrain.data.label_key: none of the first 16 samples"):
        probe_stream(plan_stream(urls, read_index=True), image_key="png", label_key="cls")


def test_a_label_free_stream_without_images_names_image_key(tmp_path):
    urls = _unlabelled(tmp_path, text=True, image=False)
    with pytest.raises(DataConfigError, match="^pretrain.data.image_key: none of the first 16 samples"):
        probe_stream(plan_stream(urls, read_index=True), image_key="png;jpg", label_key="")


# --------------------------------------------------------------------------- dead leaves


def test_leaf_radii_follow_the_inverse_cube_law():
    r = leaf_radii(np.random.default_rng(0), 200_000, 0.05, 0.5)
    assert r.min() >= 0.05 and r.max() <= 0.5
    # p(r) ~ r^-3 on [a, b]: P(r < 2a) = (a^-2 - (2a)^-2) / (a^-2 - b^-2) = 0.75 / 0.99
    assert (r < 0.1).mean() == pytest.approx(0.75 / 0.99, abs=0.005)


def test_dead_leaves_shards_are_deterministic_label_free_and_indexed(tmp_path):
    a = make_deadleaves_shards(tmp_path / "a", num_samples=30, img_size=16, samples_per_shard=12, seed=3)
    b = make_deadleaves_shards(tmp_path / "b", num_samples=30, img_size=16, samples_per_shard=12, seed=3, workers=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["_info.json", "deadleaves-000000.tar", "deadleaves-000001.tar", "deadleaves-000002.tar"]
    for name in names[1:]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["num_samples"] == 30 and [s["num_samples"] for s in a["shards"]] == [12, 12, 6]
    assert "num_classes" not in a and a["mean"] == b["mean"] and all(0.1 < s < 0.5 for s in a["std"])
    loader = build_shard_loader(a["urls"], rank=0, world_size=1, batch_size=5, num_workers=0, steps=2,
                                shuffle_buffer=0, transform=ViewAugment(16, 3), label_key="")
    images, labels = next(iter(loader))
    assert images.shape == (5, 2, 3, 16, 16) and (labels == NO_LABEL).all()
    # Not noise: most neighbouring pixels lie inside one leaf (uniform noise: a median step of ~75).
    image = render_dead_leaves(np.random.default_rng(0), 32).astype(np.float32)
    assert image.shape == (32, 32, 3) and np.median(np.abs(np.diff(image, axis=1))) < 10


# --------------------------------------------------------------------------- DINO


def _dino(local_crops: int = 0, **kwargs) -> DINO:
    torch.manual_seed(0)
    backbone = create_model("resnet_tiny", num_classes=0, in_chans=3)
    settings = dict(out_dim=32, hidden=16, bottleneck=8, student_temp=0.1, teacher_temp=0.04,
                    center_momentum=0.9, momentum=0.9, local_crops=local_crops)
    return DINO(backbone, **{**settings, **kwargs})


def test_dino_loss_is_each_student_view_against_the_teachers_other_global_view():
    dino = _dino(local_crops=1)
    student, teacher = torch.randn(3, 3, 32), torch.softmax(torch.randn(3, 2, 32), -1)
    log_p = torch.log_softmax(student / 0.1, -1)
    ce = lambda g, v: -(teacher[:, g] * log_p[:, v]).sum(-1).mean()  # noqa: E731
    expected = (ce(0, 1) + ce(0, 2) + ce(1, 0) + ce(1, 2)) / 4  # never a global view against itself
    assert dino.loss((student, teacher), None).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dino_teacher_sees_global_views_and_the_centre_follows_its_output():
    dino = _dino(local_crops=2)
    assert dino.views == 4
    student, teacher = dino(torch.randn(3 * 4, 3, 16, 16))
    assert student.shape == (3, 4, 32) and teacher.shape == (3, 2, 32)
    assert torch.allclose(teacher.sum(-1), torch.ones(3, 2))
    assert dino.center.abs().sum() > 0  # moved 10% of the way to the batch mean
    centre = dino.center.clone()
    dino.eval()
    dino(torch.randn(3 * 4, 3, 16, 16))
    assert torch.equal(dino.center, centre)  # evaluation leaves the centre alone


def test_dino_teacher_is_an_ema_of_the_student_and_is_what_stage_two_gets():
    dino = _dino()
    assert not any(p.requires_grad for p in dino.teacher_backbone.parameters())
    with torch.no_grad():
        for p in dino.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in dino.teacher_backbone.parameters()]
    dino.after_step(0, 10)  # momentum 0.9 at the start of the cosine
    for t, b, s in zip(dino.teacher_backbone.parameters(), before, dino.backbone.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    moved = [p.clone() for p in dino.teacher_backbone.parameters()]
    dino.after_step(10, 10)  # momentum 1 at the end: the teacher stands still
    assert all(torch.equal(a, b) for a, b in zip(moved, dino.teacher_backbone.parameters()))
    assert dino.handed_on() is dino.teacher_backbone
    student = _dino(hand_on="student")
    assert student.handed_on() is student.backbone
    extra = dino.extra_state()  # the student too: the checkpoint's model is the teacher
    assert any(k.startswith("backbone.") for k in extra) and "center" in extra
    assert any(k.startswith("teacher_head.") for k in extra)
    groups = objective_param_groups(dino, lr=1e-3, weight_decay=0.05)
    names = {n for g in groups for n, _ in g["params"]}
    assert not any(n.startswith("teacher") for n in names) and "head.prototypes" in names


def test_dino_views_are_two_global_then_local_crops():
    cfg = load_config(DEMO, ["pretrain.objective=dino", "pretrain.dino.local_crops=3"], command="pretrain")
    views = view_augment(cfg.pretrain, 16, 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    assert views(image).shape == (5, 3, 16, 16)
    assert views.crop.scale == (0.4, 1.0) and views.local.scale == (0.05, 0.4)
    with pytest.raises(ConfigError, match=r"^pretrain.dino.local_scale: "):
        load_config(DEMO, ["pretrain.objective=dino", "pretrain.dino.local_scale=[0.5,0.1]"], command="pretrain")


def test_supervised_label_smoothing_follows_the_config():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    cfg = load_config(DEMO, ["pretrain.label_smoothing=0.1"], command="pretrain")
    objective = build_objective(cfg.pretrain, create_model("resnet_tiny", num_classes=5, in_chans=3))
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert objective.loss(logits, labels).item() == pytest.approx(expected.item())
    plain = build_objective(load_config(DEMO, [], command="pretrain").pretrain, objective.backbone)
    assert plain.loss(logits, labels).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    with pytest.raises(ConfigError, match=r"^pretrain.label_smoothing: "):
        load_config(DEMO, ["pretrain.label_smoothing=1"], command="pretrain")


# --------------------------------------------------------------------------- the stronger supervised recipe


def _supervised(*overrides: str, num_classes: int = 5):
    cfg = load_config(DEMO, list(overrides), command="pretrain")
    return build_objective(cfg.pretrain, create_model("resnet_tiny", num_classes=num_classes, in_chans=3))


def test_weight_ema_warms_up_follows_the_weights_and_is_handed_on():
    objective = _supervised("pretrain.ema.decay=0.99")
    assert objective.weights == "ema" and objective.handed_on() is objective.ema
    start = {k: v.clone() for k, v in objective.ema.state_dict().items()}
    with torch.no_grad():
        for p in objective.backbone.parameters():
            p.add_(1.0)
    objective.after_step(1, 100)  # warm-up: min(0.99, 2 / 11)
    d = 2 / 11
    for (name, ema), now in zip(objective.ema.named_parameters(), objective.backbone.parameters()):
        assert torch.allclose(ema, d * start[name] + (1 - d) * now), name
    objective.after_step(10_000, 100)  # long after: the configured decay
    first = next(objective.ema.parameters()).clone()
    objective.after_step(10_001, 100)
    assert torch.allclose(next(objective.ema.parameters()), 0.99 * first + 0.01 * next(objective.backbone.parameters()))
    # Not trained: outside the optimiser; and with the EMA handed on, the trained backbone is stage-one state.
    groups = objective_param_groups(objective, lr=1e-3, weight_decay=0.05)
    assert not any(n.startswith("ema.") for g in groups for n, _ in g["params"])
    assert {k.split(".")[0] for k in objective.extra_state()} == {"backbone", "ema"}
    kept = _supervised("pretrain.ema.decay=0.99", "pretrain.ema.hand_on=model")
    assert kept.weights == "model" and kept.handed_on() is kept.backbone
    assert {k.split(".")[0] for k in kept.extra_state()} == {"ema"}
    assert _supervised().ema is None and _supervised().weights == "model" and _supervised().extra_state() == {}


def test_batch_mix_is_seeded_per_call_leaves_the_rng_alone_and_mixes_labels():
    objective = _supervised("pretrain.mix.mixup_alpha=0.4", "pretrain.mix.cutmix_alpha=1.0")
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    rng = torch.get_rng_state()
    x1, y1 = objective.prepare_batch(images, labels)
    assert torch.equal(torch.get_rng_state(), rng)  # the training process's RNG is untouched
    assert y1.shape == (8, 5) and torch.allclose(y1.sum(1), torch.ones(8)) and not torch.equal(x1, images)
    x2, _ = objective.prepare_batch(images, labels)
    assert not torch.equal(x1, x2) and int(objective.mix_calls) == 2  # a fresh draw per call
    again = _supervised("pretrain.mix.mixup_alpha=0.4", "pretrain.mix.cutmix_alpha=1.0")
    assert torch.equal(again.prepare_batch(images, labels)[0], x1)  # the same call count mixes the same way
    again.load_extra_state(objective.extra_state())  # a resumed run continues the count
    assert torch.equal(again.prepare_batch(images, labels)[0], objective.prepare_batch(images, labels)[0])
    objective.eval()
    assert objective.prepare_batch(images, labels)[1] is labels  # never at evaluation
    assert _supervised("pretrain.mix.mixup_alpha=0.4", "pretrain.mix.prob=0").mix is None
    skipped = BatchMix(5, mixup_alpha=0.4, cutmix_alpha=0.0, prob=1e-12, seed=0)  # a batch left unmixed
    x, y = skipped(images, labels, call=1)
    assert torch.equal(x, images) and torch.equal(y.argmax(1), labels)  # one-hot: a loss like any batch's
    logits = torch.randn(8, 5)
    assert objective.loss(logits, y).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


@pytest.mark.parametrize("overrides, key", [
    (["pretrain.objective=simclr", "pretrain.mix.cutmix_alpha=1"], "pretrain.mix"),
    (["pretrain.objective=simclr", "pretrain.data.auto_augment=trivialaugment"], "pretrain.data.auto_augment"),
    (["pretrain.objective=dino", "pretrain.ema.decay=0.99"], "pretrain.ema.decay"),
    (["pretrain.data.auto_augment=autoaugment"], "pretrain.data.auto_augment"),
    (["pretrain.data.auto_augment=randaugment", "pretrain.data.decode=device"], "pretrain.data.auto_augment"),
    (["pretrain.ema.decay=1"], "pretrain.ema.decay"),
    (["pretrain.ema.hand_on=teacher"], "pretrain.ema.hand_on"),
    (["pretrain.mix.prob=2"], "pretrain.mix.prob"),
])
def test_recipe_settings_that_cannot_apply_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(DEMO, overrides, command="pretrain")


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_auto_augment_draws_from_the_stream_rng(policy):
    from pipeline.data.augment import SampleAugment

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    auto = SampleAugment(16, 3, auto_augment=policy)
    plain = SampleAugment(16, 3)

    def draws(transform, seed):
        torch.manual_seed(seed)
        return [transform(image) for _ in range(6)]

    assert all(torch.equal(a, b) for a, b in zip(draws(auto, 1), draws(auto, 1)))  # the RNG governs it
    assert any(not torch.equal(a, b) for a, b in zip(draws(auto, 1), draws(plain, 1)))
    assert SampleAugment(16, 3, augment=False, auto_augment=policy).auto is None  # never at evaluation
