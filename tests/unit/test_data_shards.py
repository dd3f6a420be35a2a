"""Stage-one shard stream: exact step counts, rank splits, determinism, http, errors."""

from __future__ import annotations

import functools
import http.server
import io
import json
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.shards import build_shard_loader, check_shards, epoch_shards, expand_urls, read_shard_info
from pipeline.data.transforms import build_transform

SIZES = [7, 3, 10, 5, 1, 9]  # deliberately uneven shards
IMG = 8


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((IMG, IMG, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(root: Path, sizes: list[int], *, label_key: str = "cls") -> str:
    """Shard i holds sizes[i] samples, all labelled i (so a label names its shard)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"part-{i:03d}.tar"), encoder=False, mtime=0) as sink:
            for j in range(n):
                sink.write({"__key__": f"s{i:03d}_{j:03d}", "png": _png(10 * i + j), label_key: str(i).encode()})
    (root / "_info.json").write_text(json.dumps({"num_samples": sum(sizes), "mean": [0.5], "std": [0.25]}))
    return str(root / f"part-{{000..{len(sizes) - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return _write_shards(tmp_path_factory.mktemp("shards"), SIZES)


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


def test_http_loopback(shards, tmp_path, monkeypatch):
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) shards with curl, which is not installed")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = Path(expand_urls(shards)[0]).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/part-{{000..{len(SIZES) - 1:03d}}}.tar"
        assert read_shard_info(url) == json.loads((root / "_info.json").read_text())
        assert _labels(_loader(url, steps=6)) == _labels(_loader(shards, steps=6))
        assert read_shard_info(url.replace("part-", "sub/part-")) is None  # 404 -> no info
    finally:
        server.shutdown()
        server.server_close()


def test_read_shard_info_local(shards, tmp_path):
    assert read_shard_info(shards)["num_samples"] == sum(SIZES)
    assert read_shard_info(str(tmp_path / "x-{0..1}.tar")) is None


def test_too_few_shards_is_refused(shards):
    with pytest.raises(ValueError, match=r"6 shard\(s\).*world_size=2 x num_workers=4 = 8"):
        _loader(shards, world_size=2, num_workers=4)


def test_check_shards_validates_without_a_loader(shards):
    assert len(check_shards(shards, world_size=3, num_workers=2)) == 6
    assert check_shards([shards]) == expand_urls(shards)
    with pytest.raises(ValueError, match="world_size=7"):
        check_shards(shards, world_size=7)


def test_missing_local_shard_is_named(shards):
    missing = shards.replace("{000..005}", "{000..007}")
    with pytest.raises(FileNotFoundError, match="part-006.tar"):
        _loader(missing)


def test_wrong_label_key_names_key_and_available_keys(shards):
    with pytest.raises(ValueError, match=r"label_key 'label' not found.*available keys: \['cls', 'png'\]"):
        _labels(_loader(shards, label_key="label"))


def test_wrong_image_key_is_named(shards):
    with pytest.raises(ValueError, match=r"image_key 'jpg' not found"):
        _labels(_loader(shards, image_key="jpg"))


def test_pipeline_pickles_for_spawn_workers(shards):
    loader = _loader(shards)
    dataset = loader.pipeline[0].dataset  # what a spawn/forkserver worker receives
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone is not dataset


def test_spawn_workers_match_fork_workers(shards):
    # spawn pickles the whole pipeline into fresh interpreters: what Ray's loader workers do.
    spawned = _labels(_loader(shards, num_workers=2, steps=4, mp_context="spawn"))
    assert spawned == _labels(_loader(shards, num_workers=2, steps=4))
