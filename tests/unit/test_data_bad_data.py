"""Bad data in a crawl: corrupt members, truncated shards and dead URLs are skipped and counted
exactly (summed over loader workers and ranks), never slept on, never trained on."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.data.shards import build_shard_loader, epoch_shards, expand_urls, plan_stream
from pipeline.data.sources import OpenOptions, ShardUnavailable
from pipeline.data.transforms import build_transform
from tests.unit._shard_fixtures import Faults, good_sample, http_server, png, truncate, write_shard

HTML = b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>Access denied</body></html>"


def _transform():
    return build_transform(8, 3, train=False, mean=[0.5], std=[0.25])


def _crawl(root: Path) -> dict:
    """Five shards served over HTTP plus one missing: every kind of damage, with known counts."""
    root.mkdir(parents=True, exist_ok=True)
    bad = [good_sample(0, j) for j in range(12)]
    bad[1] = {"__key__": "s000_001", "jpg": HTML, "cls": b"0"}                      # HTML saved as .jpg
    bad[2] = {"__key__": "s000_002", "png": png(3)[:40], "cls": b"0"}              # truncated PNG
    bad[3] = {"__key__": "s000_003", "png": png(4)}                                # missing label
    bad[4] = {"__key__": "s000_004", "png": png(5), "cls": b"zero"}                # label not an integer
    bad[5] = {"__key__": "s000_005", "png": png(6), "cls": b"9"}                   # label >= num_classes
    bad[6] = {"__key__": "s000_006", "jpg": os.urandom(300), "cls": b"0"}          # random bytes
    bad[7] = {"__key__": "s000_007", "txt": b"no image", "cls": b"0"}              # no image member
    write_shard(root / "c-000.tar", bad)                                           # 5 good + 7 bad
    write_shard(root / "c-001.tar", [good_sample(1, j) for j in range(10)])
    data = (root / "c-001.tar").read_bytes()
    # Cut inside sample 6's PNG: samples 0-5 are good, sample 6 is dropped as incomplete.
    sixth = data.index(b"s001_006.png")
    truncate(root / "c-001.tar", sixth + 512 + 20)
    write_shard(root / "c-002.tar", [good_sample(2, j) for j in range(10)])         # clean
    write_shard(root / "c-003.tar", [good_sample(3, j) for j in range(10)])
    # Cut at a member boundary (no end-of-archive marker): 4 whole samples remain.
    fifth = (root / "c-003.tar").read_bytes().index(b"s003_004.cls")
    truncate(root / "c-003.tar", fifth)
    write_shard(root / "c-004.tar", [good_sample(4, j) for j in range(10)])        # served as an HTML page
    # c-005.tar does not exist: HTTP 404.
    import json

    counts = {"c-000.tar": 12, "c-001.tar": 10, "c-002.tar": 10, "c-003.tar": 10, "c-004.tar": 10, "c-005.tar": 10}
    (root / "_info.json").write_text(json.dumps({"num_classes": 5, "shards": [
        {"url": k, "num_samples": v} for k, v in counts.items()]}))
    return {"good": 5 + 6 + 10 + 4}


def _keys_and_counts(loader):
    keys = []
    for images, labels in loader:
        assert torch.isfinite(images).all()
        keys += loader.last_keys
    return keys, loader.local_counters()


def test_every_kind_of_damage_is_skipped_and_counted_exactly(tmp_path):
    expect = _crawl(tmp_path)
    with http_server(tmp_path, Faults(html={"c-004.tar"})) as (base, faults):
        urls = f"{base}/c-{{000..005}}.tar"
        # Pick the seed whose first epoch ends with the clean shard: every damaged shard is then
        # finished (and counted) by the time the epoch's last good sample is consumed.
        seed = next(s for s in range(200) if epoch_shards(expand_urls(urls), epoch=0, seed=s)[-1].endswith("c-002.tar"))
        plan = plan_stream(urls, opts=OpenOptions(retries=0))
        loader = build_shard_loader(plan, rank=0, world_size=1, batch_size=expect["good"], num_workers=0, steps=1,
                                    shuffle_buffer=0, transform=_transform(), num_classes=5, seed=seed)
        t0 = time.perf_counter()
        keys, c = _keys_and_counts(loader)
        elapsed = time.perf_counter() - t0
    assert sorted(keys) == sorted(
        [f"s000_{j:03d}" for j in (0, 8, 9, 10, 11)] + [f"s001_{j:03d}" for j in range(6)]
        + [f"s002_{j:03d}" for j in range(10)] + [f"s003_{j:03d}" for j in range(4)]
    )
    assert c["skipped_undecodable"] == 3          # HTML as .jpg, truncated PNG, random bytes
    assert c["skipped_missing_label"] == 1
    assert c["skipped_bad_label"] == 2            # "zero", 9 >= num_classes
    assert c["skipped_missing_image"] == 1
    assert c["skipped_incomplete"] == 1           # the sample cut inside its PNG
    assert c["skipped_samples"] == 8
    assert c["partial_shards"] == 2               # cut inside a member; cut at a boundary (+ index count)
    assert c["failed_shards"] == 2                # the HTML page answered for c-004, the 404 for c-005
    assert c["samples_used"] == expect["good"]
    assert faults.requests["c-005.tar"] == 1      # a 404 is not retried
    assert elapsed < 5, f"bad data must not be slept on ({elapsed:.1f} s)"
    problems = {Path(u).name: (status, why) for u, status, why in loader.problems()}
    assert problems["c-004.tar"][0] == "failed" and "text/html" in problems["c-004.tar"][1]
    assert problems["c-005.tar"][0] == "failed" and "HTTP 404" in problems["c-005.tar"][1]
    assert problems["c-001.tar"][0] == "partial" and "unexpected end of data" in problems["c-001.tar"][1]
    assert problems["c-003.tar"][0] == "partial" and "end-of-archive" in problems["c-003.tar"][1]


def test_a_dead_url_stops_the_run_when_asked_to(tmp_path):
    _crawl(tmp_path)
    with http_server(tmp_path) as (base, _):
        plan = plan_stream(f"{base}/c-{{002..005}}.tar", shard_errors="raise", opts=OpenOptions(retries=0))
        loader = build_shard_loader(plan, rank=0, world_size=1, batch_size=40, num_workers=0, steps=1,
                                    shuffle_buffer=0, transform=_transform(), seed=0)
        with pytest.raises(ShardUnavailable, match=r"c-00[45]\.tar: .*(HTTP 404|text/html).*shard_errors=raise"):
            list(loader)


def test_many_bad_samples_cost_no_sleep(tmp_path):
    samples = []
    for j in range(300):
        samples.append(good_sample(0, j) if j % 3 == 0 else {"__key__": f"b{j:04d}", "jpg": HTML, "cls": b"0"})
    write_shard(tmp_path / "x-0.tar", samples)
    loader = build_shard_loader(str(tmp_path / "x-0.tar"), rank=0, world_size=1, batch_size=100, num_workers=0,
                                steps=1, shuffle_buffer=0, transform=_transform())
    t0 = time.perf_counter()
    _, c = _keys_and_counts(loader)
    assert c["skipped_undecodable"] == 198  # 100 good samples (0, 3, ..., 297) and the 198 bad between them
    assert time.perf_counter() - t0 < 5  # webdataset's warn_and_continue would sleep 0.5 s x 198


def _uniform_crawl(root: Path, shards: int) -> str:
    """Every shard: 10 samples, #3 undecodable and #6 without a label, the last one good."""
    for i in range(shards):
        samples = [good_sample(i, j) for j in range(10)]
        samples[3] = {"__key__": f"s{i:03d}_003", "jpg": HTML, "cls": b"1"}
        samples[6] = {"__key__": f"s{i:03d}_006", "png": png(1)}
        write_shard(root / f"u-{i:03d}.tar", samples)
    return str(root / f"u-{{000..{shards - 1:03d}}}.tar")


def test_counts_are_summed_over_loader_workers(tmp_path):
    urls = _uniform_crawl(tmp_path, 4)
    # A batch is one shard's 8 good samples; after 6 batches from 2 workers, 12 bad samples were read.
    loader = build_shard_loader(urls, rank=0, world_size=1, batch_size=8, num_workers=2, steps=6,
                                shuffle_buffer=0, transform=_transform())
    _, c = _keys_and_counts(loader)
    assert c["skipped_samples"] == 12 and c["skipped_undecodable"] == 6 and c["skipped_missing_label"] == 6
    assert c["samples_used"] == 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, urls: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = build_shard_loader(urls, rank=rank, world_size=world, batch_size=8, num_workers=2, steps=4,
                                    shuffle_buffer=0, transform=_transform(), mp_context="fork")
        list(loader)
        total = loader.global_counters()
        summary = loader.summary()
        state = loader.gather_state()
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(
            {"total": total, "summary": summary, "ranks": len(state["ranks"]), "local": loader.local_counters()}))
    finally:
        dist.destroy_process_group()


def test_counts_are_summed_over_ranks(tmp_path):
    urls = _uniform_crawl(tmp_path, 8)
    # fork: the ranks need nothing re-imported (spawn costs ~10 s of imports per process on 2 cores).
    mp.start_processes(_rank_main, args=(2, _free_port(), urls, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["local"]["skipped_samples"] == 8          # 4 batches = 4 shards x 2 bad on each rank
        assert r["total"]["skipped_samples"] == 16         # summed over 2 ranks x 2 workers
        assert r["summary"]["skipped_samples"] == 16 and r["summary"]["samples_used"] == 64
        assert r["ranks"] == 2
