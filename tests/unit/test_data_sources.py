"""Shard URLs: bounded retries, Range resumption, timeouts, error pages, hf://, cloud CLIs, pipe:."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from pipeline.data.shards import build_shard_loader, plan_stream, read_shard_info
from pipeline.data.sources import OpenOptions, ShardUnavailable, check_url, open_shard, read_range, resolve_hf
from pipeline.data.transforms import build_transform
from tests.unit._shard_fixtures import Faults, http_server, write_shards

FAST = OpenOptions(timeout=2.0, retries=2, retry_delay=0.05)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served")
    write_shards(path, [20, 20, 20])
    return path


def _read(url: str, opts: OpenOptions = FAST) -> bytes:
    with open_shard(url, opts) as stream:
        return stream.read()


def test_transient_http_errors_are_retried(root):
    with http_server(root, Faults(status_times={"part-000.tar": [503, 2]})) as (base, faults):
        stream = open_shard(f"{base}/part-000.tar", FAST)
        assert stream.read() == (root / "part-000.tar").read_bytes()
        assert stream.raw.retries_used == 2 and faults.requests["part-000.tar"] == 3


def test_retries_are_bounded(root):
    with http_server(root, Faults(status={"part-000.tar": 503})) as (base, faults):
        t0 = time.perf_counter()
        with pytest.raises(ShardUnavailable, match=r"part-000.tar: HTTP 503 .*after 3 attempt"):
            _read(f"{base}/part-000.tar")
        assert faults.requests["part-000.tar"] == 3 and time.perf_counter() - t0 < 5


def test_permanent_http_errors_are_not_retried(root):
    with http_server(root, Faults(status={"part-001.tar": 403})) as (base, faults):
        with pytest.raises(ShardUnavailable, match="HTTP 403"):
            _read(f"{base}/part-001.tar")
        with pytest.raises(ShardUnavailable, match="HTTP 404"):
            _read(f"{base}/nope.tar")
        assert faults.requests["part-001.tar"] == 1 and faults.requests["nope.tar"] == 1


def test_a_cut_transfer_resumes_with_a_range_request(root):
    with http_server(root, Faults(cut_after={"part-002.tar": [3000, 2]})) as (base, faults):
        stream = open_shard(f"{base}/part-002.tar", FAST)
        assert stream.read() == (root / "part-002.tar").read_bytes()
        assert stream.raw.retries_used == 2
        assert ("part-002.tar", "bytes=3000-") in faults.ranges and ("part-002.tar", "bytes=6000-") in faults.ranges


def test_a_stalled_server_never_hangs(root):
    with http_server(root, Faults(stall={"part-000.tar"})) as (base, _):
        t0 = time.perf_counter()
        with pytest.raises(ShardUnavailable, match="timed out"):
            _read(f"{base}/part-000.tar", OpenOptions(timeout=0.5, retries=1, retry_delay=0.05))
        assert time.perf_counter() - t0 < 5


def test_an_error_page_is_never_read_as_a_shard(root):
    with http_server(root, Faults(html={"part-000.tar"})) as (base, _):
        with pytest.raises(ShardUnavailable, match="text/html: an error or login page"):
            _read(f"{base}/part-000.tar")


def test_range_reads(root):
    data = (root / "part-001.tar").read_bytes()
    assert read_range(str(root / "part-001.tar"), 512, 1600, FAST) == data[512:1600]
    with http_server(root) as (base, _):
        assert read_range(f"{base}/part-001.tar", 512, 1600, FAST) == data[512:1600]
        with open_shard(f"{base}/part-001.tar", FAST, start=1024) as stream:
            assert stream.read() == data[1024:]


def test_a_server_that_ignores_range_requests(root):
    data = (root / "part-001.tar").read_bytes()
    with http_server(root, Faults(ignore_range=True)) as (base, _):
        assert read_range(f"{base}/part-001.tar", 512, 1600, FAST) == data[512:1600]
        with open_shard(f"{base}/part-001.tar", FAST, start=1024) as stream:
            assert stream.read() == data[1024:]


def test_starting_at_the_end_reads_nothing(root):
    # A resumed stream whose shard (truncated, without end-of-archive blocks) was read to its last byte.
    from pipeline.data.tarsamples import PARTIAL, TarSamples

    size = (root / "part-001.tar").stat().st_size
    with http_server(root) as (base, _):
        with open_shard(f"{base}/part-001.tar", FAST, start=size) as stream:
            assert stream.read() == b""
        with open_shard(f"{base}/part-001.tar", FAST, start=size) as stream:
            reader = TarSamples(stream, url="u", slot=0, first_index=20, base_offset=size)
            assert list(reader) == [] and reader.status == PARTIAL


def test_connection_refused_is_bounded():
    with pytest.raises(ShardUnavailable, match="127.0.0.1:9/a.tar.*after 2 attempt"):
        _read("http://127.0.0.1:9/a.tar", OpenOptions(timeout=1, retries=1, retry_delay=0.05))


def test_hf_urls_resolve_to_the_hub_and_stream(root, monkeypatch):
    with http_server(root) as (base, faults):
        # A stand-in for the Hub's resolve endpoint: the same files under the path the Hub uses.
        (root / "datasets").mkdir(exist_ok=True)
        target = root / "datasets" / "org" / "corpus" / "resolve" / "main"
        target.mkdir(parents=True, exist_ok=True)
        for f in ("part-000.tar", "part-001.tar", "_info.json"):
            (target / f).write_bytes((root / f).read_bytes())
        monkeypatch.setenv("HF_ENDPOINT", base)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        url, headers = resolve_hf("hf://datasets/org/corpus/part-000.tar")
        assert url == f"{base}/datasets/org/corpus/resolve/main/part-000.tar"
        assert headers == {"Authorization": "Bearer hf_test_token"}
        assert resolve_hf("hf://datasets/org/corpus@v1.0/a/b.tar")[0].endswith("/resolve/v1.0/a/b.tar")
        assert _read("hf://datasets/org/corpus/part-001.tar") == (root / "part-001.tar").read_bytes()
        assert read_shard_info("hf://datasets/org/corpus/part-{000..001}.tar")["num_samples"] == 60


def _fake_cli(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_s3_and_gs_urls_go_through_the_cloud_clis(root, tmp_path, monkeypatch):
    # No cloud here: stand-in `aws` / `gcloud` executables that serve from a local bucket directory,
    # called exactly as the real CLIs are (`aws s3 cp URL -`, `gcloud storage cat URL`).
    bucket = root
    _fake_cli(tmp_path / "bin", "aws", f'[ "$1 $2 $4" = "s3 cp -" ] || exit 2\n'
              f'f="{bucket}/${{3#s3://bucket/}}"; [ -f "$f" ] || {{ echo "NoSuchKey: $3" >&2; exit 1; }}; cat "$f"\n')
    _fake_cli(tmp_path / "bin", "gcloud", f'[ "$1 $2" = "storage cat" ] || exit 2\ncat "{bucket}/${{3#gs://bucket/}}"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    data = (root / "part-000.tar").read_bytes()
    assert _read("s3://bucket/part-000.tar") == data
    assert _read("gs://bucket/part-000.tar") == data
    with open_shard("s3://bucket/part-000.tar", FAST, start=700) as stream:
        assert stream.read() == data[700:]
    with pytest.raises(ShardUnavailable, match=r"s3://bucket/missing.tar: command exited with status 1: NoSuchKey"):
        _read("s3://bucket/missing.tar", OpenOptions(retries=1, retry_delay=0.01))
    transform = build_transform(8, 3, train=False, mean=[0.5], std=[0.25])
    loader = build_shard_loader("s3://bucket/part-{000..002}.tar", rank=0, world_size=1, batch_size=10, steps=3,
                                num_workers=0, shuffle_buffer=0, transform=transform)
    assert len(list(loader)) == 3


def test_a_stalled_command_is_killed(tmp_path):
    with pytest.raises(ShardUnavailable, match="no data for 0.3 s"):
        _read("pipe:sleep 20", OpenOptions(timeout=0.3, retries=0, allow_pipe=True))


def test_cloud_urls_need_their_cli(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match=r"s3:// shards needs the AWS CLI"):
        check_url("s3://bucket/a.tar")
    with pytest.raises(ValueError, match=r"gs:// shards needs the Google Cloud CLI"):
        plan_stream("gs://bucket/a-{0..3}.tar", read_index=False)
