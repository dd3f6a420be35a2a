"""Stage-one shard stream: exact step counts, rank splits, determinism, sources, http, config errors."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.data.shards import (
    DataConfigError,
    build_shard_loader,
    check_shards,
    describe_epoch,
    epoch_shards,
    expand_urls,
    plan_stream,
    probe_stream,
    read_shard_info,
)
from pipeline.data.transforms import build_transform
from tests.unit._shard_fixtures import IMG, http_server, write_shards

SIZES = [7, 3, 10, 5, 1, 9]  # deliberately uneven shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), SIZES)


def _transform():
    return build_transform(IMG, 3, train=False, mean=[0.5], std=[0.25])


def _loader(urls, **overrides):
    kwargs = dict(
        rank=0, world_size=1, batch_size=4, num_workers=0, steps=5, shuffle_buffer=8, transform=_transform(), seed=0
    )
    kwargs.update(overrides)
    return build_shard_loader(urls, **kwargs)


def _labels(loader) -> list[list[int]]:
    out = []
    for images, labels in loader:
        assert images.shape == (4, 3, IMG, IMG) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        out.append(labels.tolist())
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_steps_on_every_rank_with_uneven_shards(shards, num_workers):
    # 35 samples over 6 uneven shards; 13 steps x 4 = 52 samples per rank forces several epochs.
    for rank in range(2):
        loader = _loader(shards, rank=rank, world_size=2, num_workers=num_workers, steps=13)
        assert len(loader) == 13
        batches = _labels(loader)
        assert len(batches) == 13
        assert all(len(b) == 4 for b in batches)


def test_rank_splits_are_disjoint_and_cover_every_shard():
    urls = expand_urls("part-{000..006}.tar")
    for epoch in range(3):
        parts = [epoch_shards(urls, epoch=epoch, seed=3, rank=r, world_size=2, worker=w, num_workers=2)
                 for r in range(2) for w in range(2)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(urls)  # disjoint and complete
    orders = {tuple(epoch_shards(urls, epoch=e, seed=3)) for e in range(5)}
    assert len(orders) > 1  # the order changes between epochs


def test_ranks_read_disjoint_shards_in_first_epoch(shards):
    # Epoch 0 gives each rank 3 shards; 2 batches of 4 stay inside every rank's first shards.
    seen = []
    for rank in range(2):
        mine = {int(Path(u).stem.split("-")[1]) for u in
                epoch_shards(expand_urls(shards), epoch=0, seed=0, rank=rank, world_size=2)}
        labels = {lab for b in _labels(_loader(shards, rank=rank, world_size=2, steps=1, shuffle_buffer=0))
                  for lab in b}
        assert labels <= mine
        seen.append(labels)
    assert not seen[0] & seen[1]


def test_same_seed_same_stream_other_seed_other_stream(shards):
    a = _labels(_loader(shards, seed=1))
    b = _labels(_loader(shards, seed=1))
    c = _labels(_loader(shards, seed=2))
    assert a == b
    assert a != c


def test_one_epoch_reads_every_sample_once(shards):
    # Without a shuffle buffer, one worker and one rank: 35 samples = the first 35 of the stream.
    loader = _loader(shards, batch_size=5, steps=7, shuffle_buffer=0)
    keys = []
    for _ in loader:
        keys += loader.last_keys
    assert len(keys) == 35 == len(set(keys))


def test_http_loopback(shards):
    root = Path(expand_urls(shards)[0]).parent
    with http_server(root) as (base, faults):
        url = f"{base}/part-{{000..{len(SIZES) - 1:03d}}}.tar"
        assert read_shard_info(url) == json.loads((root / "_info.json").read_text())
        assert _labels(_loader(url, steps=6)) == _labels(_loader(shards, steps=6))
        assert read_shard_info(url.replace("part-", "sub/part-")) is None  # 404 -> no info
    assert faults.requests["part-000.tar"] >= 1


def test_read_shard_info_local(shards, tmp_path):
    assert read_shard_info(shards)["num_samples"] == sum(SIZES)
    assert read_shard_info(str(tmp_path / "x-{0..1}.tar")) is None


def test_too_few_shards_is_refused(shards):
    with pytest.raises(DataConfigError, match=r"^pretrain.data.urls: 6 shard\(s\).*world_size=2 x num_workers=4 = 8"):
        _loader(shards, world_size=2, num_workers=4)


def test_resampled_needs_one_shard_and_draws_from_all(shards):
    plan = plan_stream(shards, resampled=True)
    loader = _loader(plan, world_size=2, rank=1, num_workers=0, steps=12)  # 2 ranks, 6 shards: fine either way
    labels = Counter(lab for b in _labels(loader) for lab in b)
    assert len(labels) >= 4  # with replacement, every rank draws from the whole list
    one = plan_stream(expand_urls(shards)[:1], resampled=True)
    assert len(_labels(_loader(one, world_size=4, rank=3, num_workers=2, steps=3))) == 3


def test_weighted_sources_mix_in_proportion(tmp_path):
    a = write_shards(tmp_path / "a", [40, 40], name="a")
    b = write_shards(tmp_path / "b", [40, 40], name="b")
    plan = plan_stream(sources=[(a, 3.0), (b, 1.0)])
    sources = Counter("a" if "/a/" in url else "b" for url in _source_urls(plan, steps=50))
    assert 0.65 < sources["a"] / sum(sources.values()) < 0.85  # 3:1 -> 0.75
    assert len(_labels(_loader(plan, steps=5))) == 5


def _source_urls(plan, *, steps):
    """URLs of the samples a plan's stream yields (through the worker stream itself)."""
    from pipeline.data.shards import SampleSpec, ShardStreamDataset, _WorkerStream

    spec = SampleSpec(("png",), "cls", 0, _transform())
    ds = ShardStreamDataset(plan, spec=spec, rank=0, world_size=1, num_workers=0, batch_size=4,
                            shuffle_buffer=0, seed=0)
    stream = _WorkerStream(ds, 0, None)
    return [stream._next_raw()["__url__"] for _ in range(steps * 4)]


def test_sources_and_urls_are_exclusive(shards):
    with pytest.raises(DataConfigError, match="^pretrain.data.sources: give"):
        plan_stream(shards, sources=[(shards, 1.0)])
    with pytest.raises(DataConfigError, match=r"^pretrain.data.sources\[0\].weight"):
        plan_stream(sources=[(shards, 0.0)])


def test_each_source_needs_enough_shards(shards, tmp_path):
    small = write_shards(tmp_path / "small", [5], name="small")
    with pytest.raises(DataConfigError, match=r"^pretrain.data.sources\[1\].urls: 1 shard\(s\)"):
        _loader(plan_stream(sources=[(shards, 1.0), (small, 1.0)]), world_size=2)


def test_check_shards_validates_without_a_loader(shards):
    assert len(check_shards(shards, world_size=3, num_workers=2)) == 6
    assert check_shards([shards]) == expand_urls(shards)
    with pytest.raises(DataConfigError, match="world_size=7"):
        check_shards(shards, world_size=7)


def test_missing_local_shard_is_named(shards):
    missing = shards.replace("{000..005}", "{000..007}")
    with pytest.raises(DataConfigError, match="part-006.tar"):
        _loader(missing)


def test_pipe_urls_are_refused_unless_allowed(shards):
    first = expand_urls(shards)[0]
    with pytest.raises(DataConfigError, match="pipe: URLs run shell commands.*allow_pipe"):
        plan_stream(f"pipe:cat {first}")
    from pipeline.data.sources import OpenOptions

    plan = plan_stream(f"pipe:cat {first}", opts=OpenOptions(allow_pipe=True), read_index=False)
    assert len(_labels(_loader(plan, steps=1, shuffle_buffer=0))) == 1


def test_unknown_scheme_is_refused():
    with pytest.raises(DataConfigError, match="unsupported URL scheme 'ftp'"):
        plan_stream("ftp://host/a.tar")


def test_wrong_label_key_is_a_config_error_not_bad_data(shards):
    with pytest.raises(DataConfigError, match=r"^pretrain.data.label_key: none of the first 64 samples.*'missing_label': 64"):
        _labels(_loader(shards, label_key="label"))
    with pytest.raises(DataConfigError, match=r"^pretrain.data.label_key: .*it has \['cls', 'png'\]"):
        probe_stream(plan_stream(shards), image_key="png", label_key="label")


def test_wrong_image_key_is_a_config_error(shards):
    with pytest.raises(DataConfigError, match=r"^pretrain.data.image_key: none of the first 64"):
        _labels(_loader(shards, image_key="jpg"))
    with pytest.raises(DataConfigError, match=r"^pretrain.data.image_key: .*no member jpg"):
        probe_stream(plan_stream(shards), image_key="jpg", label_key="cls")
    # An image key that names a non-image member: nothing decodes.
    with pytest.raises(DataConfigError, match=r"^pretrain.data.image_key: .*undecodable"):
        probe_stream(plan_stream(shards), image_key="cls", label_key="cls")


def test_num_classes_too_small_is_a_config_error(shards, tmp_path):
    # Every shard i is labelled i: with num_classes=1 only shard 0's samples are in range.
    probe_stream(plan_stream(shards), image_key="png", label_key="cls", num_classes=6)
    with pytest.raises(DataConfigError, match=r"^pretrain\.data\.num_classes: 1, but (\d+) of the first \1 samples "
                                              r"of pretrain\.data\.urls have labels beyond it \(labels seen: 1\.\.\d\)"):
        probe_stream(plan_stream(expand_urls(shards)[1:]), image_key="png", label_key="cls", num_classes=1)
    # Most of the probed labels in range: bad data to skip and count, not a configuration error.
    mixed = write_shards(tmp_path / "mixed", [9, 1])
    seen = probe_stream(plan_stream(mixed), image_key="png", label_key="cls", num_classes=1)
    assert seen == {"usable": 9, "bad_label": 1}


def test_epoch_size_from_index_or_estimate(shards, tmp_path):
    exact = describe_epoch(plan_stream(shards), batch_size=5, world_size=1)
    assert exact == {"epoch_samples": 35, "epoch_samples_from": "index", "steps_per_epoch": 7.0}
    bare = write_shards(tmp_path / "bare", [6, 6, 6], index=False)
    est = describe_epoch(plan_stream(bare), batch_size=3, world_size=2)
    assert est == {"epoch_samples": 18, "epoch_samples_from": "estimated", "steps_per_epoch": 3.0}
    given = describe_epoch(plan_stream(bare, samples_per_shard=10), batch_size=3, world_size=1)
    assert given["epoch_samples"] == 30 and given["epoch_samples_from"] == "samples_per_shard"


def test_pipeline_pickles_for_spawn_workers(shards):
    loader = _loader(shards)
    clone = pickle.loads(pickle.dumps(loader.dataset))  # what a spawn/forkserver worker receives
    assert clone is not loader.dataset and clone.plan.sources[0].urls == expand_urls(shards)


def test_spawn_workers_match_fork_workers(shards):
    # spawn pickles the whole pipeline into fresh interpreters: what Ray's loader workers do.
    spawned = _labels(_loader(shards, num_workers=2, steps=4, mp_context="spawn"))
    assert spawned == _labels(_loader(shards, num_workers=2, steps=4))
