"""Exact resume: a stream interrupted after n batches and rebuilt from its saved position yields
the very samples (and augmentations) of an uninterrupted stream."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest
import torch

from pipeline.data.shards import build_shard_loader, plan_stream
from pipeline.data.transforms import build_transform
from tests.unit._shard_fixtures import good_sample, http_server, png, truncate, write_shard, write_shards

SIZES = [9, 4, 12, 7, 3, 10, 6, 8]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("resume"), SIZES)


def _augment():
    # Random crops and flips: equal images after a resume prove the augmentation RNG continued.
    return build_transform(8, 3, train=True, mean=[0.5], std=[0.25], scale=(0.3, 1.0))


def _loader(urls, steps, position=None, **kw):
    args = dict(rank=0, world_size=1, batch_size=5, num_workers=0, shuffle_buffer=16, transform=_augment(), seed=3)
    args.update(kw)
    return build_shard_loader(urls, steps=steps, position=position, **args)


def _run(loader) -> tuple[list[list[str]], list[torch.Tensor]]:
    keys, images = [], []
    for x, _ in loader:
        keys.append(list(loader.last_keys))
        images.append(x)
    return keys, images


def _through_checkpoint(position: dict) -> dict:
    """What a checkpoint does to a position: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save({"data_position": position}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["data_position"]


def _check_resume(urls, n: int, m: int, **kw) -> tuple:
    full_keys, full_images = _run(_loader(urls, n + m, **kw))
    first = _loader(urls, n, **kw)
    head_keys, head_images = _run(first)
    saved = _through_checkpoint(first.gather_state())
    rest = _loader(urls, m, position=saved, **kw)
    tail_keys, tail_images = _run(rest)
    assert rest.resumed == "exact"
    assert head_keys + tail_keys == full_keys
    assert all(torch.equal(a, b) for a, b in zip(head_images + tail_images, full_images))
    return first, rest


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers, n", [(0, 7), (1, 6), (2, 5), (3, 8)])
def test_resume_equals_uninterrupted(shards, num_workers, n):
    # n is chosen so the interruption falls mid-shard and, with several workers, mid-turn.
    _check_resume(shards, n, 9, num_workers=num_workers)


def test_resume_without_shuffle_buffer(shards):
    _check_resume(shards, 4, 6, shuffle_buffer=0, num_workers=2)


def test_resampled_resume_continues_the_draws(shards):
    _check_resume(plan_stream(shards, resampled=True), 6, 6, num_workers=2)


def test_weighted_sources_resume(shards, tmp_path):
    other = write_shards(tmp_path / "other", [11, 5, 9], name="o")
    plan = plan_stream(sources=[(shards, 2.0), (other, 1.0)])
    _check_resume(plan, 5, 7, num_workers=1)


def test_second_iteration_continues_the_stream(shards):
    full_keys, _ = _run(_loader(shards, 10, num_workers=2))
    loader = _loader(shards, 5, num_workers=2)
    assert _run(loader)[0] + _run(loader)[0] == full_keys


def test_every_rank_resumes_its_own_position(shards):
    # Two ranks without a process group: their states are what gather_state collects on rank 0.
    kw = dict(world_size=2, num_workers=2)
    firsts = [_loader(shards, 3, rank=r, **kw) for r in range(2)]
    heads = [_run(f)[0] for f in firsts]
    saved = _through_checkpoint({"version": 1, "ranks": [f.state_dict() for f in firsts]})
    for r in range(2):
        full, _ = _run(_loader(shards, 7, rank=r, **kw))
        rest = _loader(shards, 4, rank=r, position=saved, **kw)
        assert heads[r] + _run(rest)[0] == full


def test_a_new_world_size_restarts_the_stream_at_a_fresh_epoch_and_keeps_the_counts(shards):
    """What an elastic stage one's stream does when Ray resizes it (2 ranks saved, 1 resumes): no rank's
    position fits the new sharding, so every rank starts the epoch after the last one any worker reached
    (fresh shard orders, not epoch 0's batches again) and rank 0 carries the counts seen so far."""
    kw = dict(world_size=2, num_workers=2)
    firsts = [_loader(shards, 3, rank=r, **kw) for r in range(2)]
    for f in firsts:
        _run(f)
    saved = _through_checkpoint({"version": 1, "ranks": [f.state_dict() for f in firsts]})
    resized = _loader(shards, 3, position=saved, num_workers=2)
    keys, _ = _run(resized)
    summary = resized.summary()
    assert summary["resumed_position"] == "inexact"
    assert summary["samples_used"] == 3 * 5 * 3  # 2 ranks x 3 batches of 5 carried, plus this rank's 3
    epoch0, _ = _run(_loader(shards, 3, num_workers=2))
    assert keys != epoch0  # a fresh epoch's order, not the first batches replayed
    from pipeline.data.position import max_epoch

    fresh_next, _ = _run(_loader(shards, 3, num_workers=2, start_epoch=max_epoch(saved) + 1))
    assert keys == fresh_next


def test_resume_over_http_fetches_only_the_buffered_samples(shards):
    root = Path(shards).parent
    with http_server(root) as (base, faults):
        urls = f"{base}/part-{{000..007}}.tar"
        first, rest = _check_resume(urls, 6, 5, num_workers=0)
    # The shuffle buffer was refilled with Range requests for its samples, the current shard continued
    # at its byte offset: not one shard re-read from the start by the resumed stream.
    assert faults.ranges, "a resumed http stream must use Range requests"


def test_compressed_shards_resume_by_sample_index(tmp_path):
    for i in range(4):
        write_shard(tmp_path / f"z-{i}.tar", [good_sample(i, j) for j in range(9)])
        raw = (tmp_path / f"z-{i}.tar").read_bytes()
        (tmp_path / f"z-{i}.tar.gz").write_bytes(gzip.compress(raw, mtime=0))
    _check_resume(str(tmp_path / "z-{0..3}.tar.gz"), 5, 6, num_workers=2)


def test_resume_keeps_bad_data_counts(tmp_path):
    for i in range(4):
        samples = [good_sample(i, j) for j in range(10)]
        samples[4] = {"__key__": f"s{i:03d}_004", "jpg": b"<html>oops</html>", "cls": b"0"}
        write_shard(tmp_path / f"b-{i}.tar", samples)
    truncate(tmp_path / "b-2.tar", (tmp_path / "b-2.tar").read_bytes().index(b"s002_007.png") + 600)
    urls = str(tmp_path / "b-{0..3}.tar")
    full = _loader(urls, 12, num_workers=2)
    _run(full)
    first, rest = _check_resume(urls, 5, 7, num_workers=2)
    assert rest.local_counters() == full.local_counters()
    assert full.local_counters()["partial_shards"] >= 1 and full.local_counters()["skipped_undecodable"] >= 3


def test_changed_layout_restarts_fresh_and_carries_counts(shards):
    first = _loader(shards, 6, num_workers=2)
    head, _ = _run(first)
    saved = first.gather_state()
    other = _loader(shards, 4, num_workers=1, position=saved)  # one loader worker now, not two
    assert other.resumed == "inexact"
    assert other.dataset.start_epoch >= 1  # fresh shard orders after the epochs already read
    keys, _ = _run(other)
    assert keys[0] != head[0]
    assert other.local_counters()["samples_used"] == 6 * 5 + 4 * 5


def test_position_survives_weights_only_checkpoint(shards, tmp_path):
    from pipeline.checkpoint import load_train_state, save_checkpoint
    from architectures import create_model

    first = _loader(shards, 3, num_workers=2)
    _run(first)
    model = create_model("resnet_tiny", num_classes=8, in_chans=3)
    meta = {"name": "resnet_tiny", "kwargs": {}, "num_classes": 8, "in_chans": 3, "img_size": 8,
            "mean": [0.5], "std": [0.25]}
    path = save_checkpoint(tmp_path / "ckpt", 3, model, meta, {"data_position": first.gather_state()})
    restored = load_train_state(path)["data_position"]
    rest = _loader(shards, 2, num_workers=2, position=restored)
    assert rest.resumed == "exact" and len(_run(rest)[0]) == 2


def test_images_decode_the_same_as_png(shards):
    # Guard for the fixtures: PNG members decode to the values they were written with.
    from PIL import Image

    assert Image.open(io.BytesIO(png(42))).getpixel((0, 0)) == (42, 42, 42)
