"""`transferline data shards`: HF datasets and image folders -> shards + index, size limits, resumption."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shardwriter import parse_size, write_shards
from pipeline.data.shards import build_shard_loader, read_shard_info
from pipeline.data.transforms import build_transform
from tests.conftest import REPO


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from pipeline.data.embedded import make_digits_dataset

    path = tmp_path_factory.mktemp("digits") / "dd"
    make_digits_dataset(path, seed=0)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """DIR/train/<class>/*: 3 classes, JPEG and PNG files, 7 images per class."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / "train" / name).mkdir(parents=True)
        for j in range(7):
            img = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
            fmt, ext = ("JPEG", "jpg") if j % 2 else ("PNG", "png")
            img.save(root / "train" / name / f"{j}.{ext}", format=fmt)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_hf_dataset_to_shards_and_back_through_the_loader(digits, tmp_path):
    info = write_shards(str(digits), tmp_path / "s", max_count=400, prefix="digits")
    assert [s["num_samples"] for s in info["shards"]] == [400, 400, 400, 57]
    assert info["num_samples"] == 1257 and info["num_classes"] == 10 and info["classes"][3] == "3"
    assert len(info["mean"]) == 3 and info["stats_samples"] == 1000
    assert info["throughput"]["samples"] == 1257 and info["throughput"]["samples_per_s"] > 0
    assert read_shard_info(info["urls"])["num_samples"] == 1257
    members = _members(tmp_path / "s" / "digits-000000.tar")
    assert members["000000000.cls"] == b"0" and members["000000000.png"][:4] == b"\x89PNG"
    transform = build_transform(8, 1, train=False, mean=[0.5], std=[0.5])
    loader = build_shard_loader(info["urls"], rank=0, world_size=1, batch_size=50, num_workers=0, steps=4,
                                shuffle_buffer=0, transform=transform, num_classes=10)
    labels = [lab for _, y in loader for lab in y.tolist()]
    assert len(labels) == 200 and set(labels) <= set(range(10)) and loader.local_counters()["skipped_samples"] == 0


def test_image_folder_keeps_original_bytes(folder, tmp_path):
    info = write_shards(str(folder), tmp_path / "s", max_count=8)
    assert info["classes"] == ["cat", "dog", "eel"] and info["num_samples"] == 21
    assert [s["num_samples"] for s in info["shards"]] == [8, 8, 5]
    assert info["image_key"] == "jpg;png"
    members = _members(tmp_path / "s" / "shard-000000.tar")
    assert members["000000001.jpg"] == (folder / "train" / "cat" / "1.jpg").read_bytes()
    assert members["000000001.cls"] == b"0"
    last = _members(tmp_path / "s" / "shard-000002.tar")
    assert last["000000020.cls"] == b"2"


def test_reencoding(folder, tmp_path):
    info = write_shards(str(folder / "train"), tmp_path / "s", max_count=100, image_format="jpg", stats_samples=0)
    members = _members(tmp_path / "s" / "shard-000000.tar")
    assert all(Image.open(io.BytesIO(v)).format == "JPEG" for k, v in members.items() if k.endswith(".jpg"))
    assert "mean" not in info


def test_max_size_limits_every_shard(digits, tmp_path):
    info = write_shards(str(digits), tmp_path / "s", max_count=10000, max_size="100k")
    assert len(info["shards"]) > 5
    assert all(s["bytes"] <= 100 * 1024 + 10240 for s in info["shards"])  # + tar's record padding
    assert sum(s["num_samples"] for s in info["shards"]) == 1257
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size("300") == 300


def test_an_interrupted_conversion_continues_to_the_same_bytes(digits, tmp_path):
    whole = write_shards(str(digits), tmp_path / "whole", max_count=300)

    class Stop(Exception):
        pass

    def stop_after_two(shard):
        if shard["url"].endswith("000001.tar"):
            raise Stop

    with pytest.raises(Stop):
        write_shards(str(digits), tmp_path / "cut", max_count=300, on_shard=stop_after_two)
    assert not (tmp_path / "cut" / "_info.json").exists()
    (tmp_path / "cut" / "shard-000002.tar.tmp").write_bytes(b"half a shard")  # left by a killed run
    again = write_shards(str(digits), tmp_path / "cut", max_count=300)
    assert again["resumed_at"] == 600 and again["throughput"]["samples"] == 657
    for name in [s["url"] for s in whole["shards"]]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not list((tmp_path / "cut").glob("*.tmp")) and not (tmp_path / "cut" / "_progress.json").exists()
    strip = ("throughput", "resumed_at", "urls")
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in whole.items() if k not in strip}
    # Finished: a re-run is a no-op; other settings in the same directory are refused.
    assert write_shards(str(digits), tmp_path / "cut", max_count=300)["resumed_at"] == 1257
    with pytest.raises(ValueError, match="holds another conversion"):
        write_shards(str(digits), tmp_path / "cut", max_count=100)


def test_errors_name_the_problem(digits, folder, tmp_path):
    with pytest.raises(ValueError, match="no split 'validation'"):
        write_shards(str(digits), tmp_path / "a", split="validation")
    with pytest.raises(ValueError, match="no label column 'target'"):
        write_shards(str(digits), tmp_path / "b", label_column="target")
    with pytest.raises(ValueError, match="Hub is off"):
        write_shards("someone/some-dataset", tmp_path / "c")


def test_cli_and_script(folder, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "scripts/make_shards.py", str(folder), "--out", str(out),
                           "--max-count", "10", "--prefix", "pets"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote pets-000000.tar: 10 samples" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["num_samples"] == 21 and summary["throughput"]["samples_per_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "pipeline", "data", "shards", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "transferline: error:" in bad.stderr and "Traceback" not in bad.stderr
