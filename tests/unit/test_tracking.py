"""Tracking pieces on real wandb (offline) where wandb can run here: run identity, the fallback
when W&B is unreachable, secret redaction, the offline-file reader, progress output."""

from __future__ import annotations

import io
import logging
import socket
import struct
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.lineage import checkpoint_source
from pipeline.progress import Progress
from pipeline.redact import redact_secrets, redact_text
from pipeline.tracking import (
    NullTracker,
    WandbTracker,
    stage_run_id,
    start_tracker,
)
from tests.conftest import REPO
from tests.wandb_reader import WandbFileError, read_payloads, read_run, runs_by_job_type

DEMO = REPO / "configs" / "demo.yaml"


def _cfg(tmp_path: Path, **extra: object):
    overrides = {"name": "unit", "output_dir": str(tmp_path / "out"), "tracking.mode": "offline",
                 "tracking.timeout_s": 20, **extra}
    return load_config(DEMO, [f"{k}={v}" for k, v in overrides.items()], command="pretrain")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- run identity ---------------------------------------------------------------------------


def test_a_restarted_stage_writes_to_the_same_run(tmp_path):
    """Ray re-runs the whole stage function after a failure: the second start must continue the
    first W&B run (same id, resume="allow"), not open a new one."""
    cfg = _cfg(tmp_path)
    for step in (1, 2):
        tracker = start_tracker("pretrain", cfg, is_main=True)
        assert isinstance(tracker, WandbTracker)
        tracker.log({"pretrain/loss": 1.0 / step}, step=step)
        tracker.finish()
    runs = runs_by_job_type(tmp_path / "out" / "wandb")["pretrain"]
    assert len(runs) == 2  # two offline attempts; `wandb sync` merges them into one run
    assert {r.run_id for r in runs} == {stage_run_id("unit", "pretrain")} == {"unit-pretrain"}
    assert [r.series("pretrain/loss") for r in runs] == [[(1, 1.0)], [(2, 0.5)]]
    assert all(r.group == "unit" and r.job_type == "pretrain" and r.exited for r in runs)


def test_only_rank_zero_tracks_and_disabled_tracks_nothing(tmp_path):
    assert type(start_tracker("pretrain", _cfg(tmp_path), is_main=False)) is NullTracker
    assert type(start_tracker("pretrain", _cfg(tmp_path, **{"tracking.mode": "disabled"}), is_main=True)) is NullTracker
    assert not (tmp_path / "out" / "wandb").exists()


def test_unreachable_wandb_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "fakekey" + "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    cfg = _cfg(tmp_path, **{"tracking.mode": "online", "tracking.timeout_s": 3})
    with caplog.at_level(logging.WARNING, logger="transferline"):
        tracker = start_tracker("pretrain", cfg, is_main=True)
        tracker.log({"pretrain/loss": 0.5}, step=1)
        tracker.finish()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("transferline")]
    assert len(warnings) == 1 and "logs offline instead" in warnings[0].getMessage(), caplog.text
    assert tracker.describe()["mode"] == "offline"
    (run,) = runs_by_job_type(tmp_path / "out" / "wandb")["pretrain"]
    assert run.series("pretrain/loss") == [(1, 0.5)]  # nothing lost


class _RecordingRun:
    """Stand-in for an *online* wandb Run: no W&B server can run here, and wandb refuses
    `use_artifact` offline, so the online call is checked at this boundary."""

    offline = False
    id = "x"

    def __init__(self) -> None:
        self.used: list[tuple] = []

    def use_artifact(self, artifact, type=None):
        self.used.append((artifact, type))


def test_stage_two_declares_its_input_when_online(tmp_path):
    from architectures import create_model
    from pipeline.checkpoint import model_meta, save_checkpoint

    model = create_model("hybrid_tiny", num_classes=4, in_chans=3)
    meta = model_meta(model, num_classes=4, in_chans=3, img_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    ckpt = save_checkpoint(tmp_path / "ckpt", 3, model, {**meta, "run": "src", "stage": "pretrain"})
    source = checkpoint_source(ckpt, run_name="other")
    assert source["name"] == "src-model" and source["ref"] is None and source["step"] == 3

    run = _RecordingRun()
    WandbTracker(run, run_name="dst").use_checkpoint(source)
    (artifact, _), = run.used
    # A local checkpoint: the same name and content as stage one's artifact, so W&B resolves it
    # to the version stage one logged.
    assert artifact.name == "src-model" and artifact.type == "model" and artifact.digest == source["digest"]

    run = _RecordingRun()
    WandbTracker(run, run_name="dst").use_checkpoint({**source, "ref": "wandb:ent/proj/src-model:v3"})
    assert run.used == [("ent/proj/src-model:v3", "model")]


# --- config ---------------------------------------------------------------------------------


def test_artifact_init_from_needs_online_mode():
    with pytest.raises(ConfigError, match=r"^finetune\.init_from: wandb:e/p/m:v1 is a W&B artifact"):
        load_config(DEMO, ["finetune.init_from=wandb:e/p/m:v1", "tracking.mode=offline",
                           "finetune.data.source=x"], command="finetune")
    with pytest.raises(ConfigError, match=r"^tracking\.timeout_s:"):
        load_config(DEMO, ["tracking.timeout_s=0"])
    cfg = load_config(DEMO, ["finetune.init_from=wandb:e/p/m:v1", "tracking.mode=online"], command="finetune")
    assert cfg.finetune.init_from == "wandb:e/p/m:v1"


def test_artifact_references_are_qualified(tmp_path):
    from pipeline.lineage import _qualify

    cfg = _cfg(tmp_path, **{"tracking.project": "proj"})
    assert _qualify("wandb:e/p/m:v1", cfg) == "e/p/m:v1"
    assert _qualify("wandb:m", cfg) == "proj/m:latest"
    cfg = _cfg(tmp_path, **{"tracking.project": "proj", "tracking.entity": "team"})
    assert _qualify("wandb:m:best", cfg) == "team/proj/m:best"


# --- secrets --------------------------------------------------------------------------------


def test_secrets_are_redacted_from_the_run_config():
    env = {"HF_TOKEN": "hf_abcdefghijklmnop", "SHORT_TOKEN": "1", "HOME": "/root/hf_abcdefghijklmnop",
           "AWS_SECRET_ACCESS_KEY": "aws/secret+value"}
    config = {
        "pretrain": {"data": {"urls": "https://user:p4ssw0rd@host/train-{0..9}.tar?X-Amz-Signature=abc&part=1",
                              "image_key": "png;jpg", "label_key": "cls", "note": "aws/secret+value"}},
        "finetune": {"data": {"source": "/data/hf_abcdefghijklmnop/digits"}},
        "tracking": {"api_key": "literal", "project": "transferline"},
        "steps": 10, "list": ["s3://bucket/key?token=t0k", "plain"],
    }
    out = redact_secrets(config, env=env)
    urls = out["pretrain"]["data"]["urls"]
    assert "p4ssw0rd" not in urls and "abc" not in urls.split("?")[1]
    assert urls.startswith("https://<redacted>@host/train-{0..9}.tar?") and "part=1" in urls
    assert out["finetune"]["data"]["source"] == "/data/<redacted:HF_TOKEN>/digits"
    data = out["pretrain"]["data"]
    assert (data["image_key"], data["label_key"]) == ("png;jpg", "cls")  # field names, not secrets
    assert data["note"] == "<redacted:AWS_SECRET_ACCESS_KEY>"
    assert out["tracking"] == {"api_key": "<redacted>", "project": "transferline"}
    assert out["list"] == ["s3://bucket/key?token=<redacted>", "plain"]
    assert out["steps"] == 10
    assert config["tracking"]["api_key"] == "literal"  # the input is left alone

    text = ("- shards: `https://u:pw@host/a-{0..3}.tar?sig=xyz&n=2` from /data/hf_abcdefghijklmnop\n"
            '{"url": "s3://b/k?X-Amz-Credential=AKIA&X-Amz-Signature=f00d", "pages": "?page=2"}')
    assert redact_text(text, env=env) == (
        "- shards: `https://<redacted>@host/a-{0..3}.tar?sig=<redacted>&n=2` from /data/<redacted:HF_TOKEN>\n"
        '{"url": "s3://b/k?X-Amz-Credential=<redacted>&X-Amz-Signature=<redacted>", "pages": "?page=2"}')


# --- the offline-file reader ----------------------------------------------------------------


def test_reader_checks_header_spans_blocks_and_verifies_checksums(tmp_path):
    cfg = _cfg(tmp_path)
    big = "x" * 100_000  # one record over three 32 KiB blocks: first, middle(s), last fragments
    # In the run's config (written when the run starts), not its summary: wandb may coalesce or
    # defer summary updates on a loaded machine, and this test is about the reader.
    tracker = start_tracker("pretrain", cfg, is_main=True, extra_config={"big": big})
    for step in range(1, 50):
        tracker.log({"pretrain/loss": float(step)}, step=step)
    tracker.finish()
    (run,) = runs_by_job_type(tmp_path / "out" / "wandb")["pretrain"]
    assert run.config["big"] == big
    assert [v for _, v in run.series("pretrain/loss")] == [float(s) for s in range(1, 50)]

    raw = run.path.read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<HB", raw[4:7]) == (0xBEE1, 0)
    assert len(raw) > 3 * 32 * 1024
    broken = tmp_path / "broken.wandb"
    broken.write_bytes(raw[:40_000] + bytes([raw[40_000] ^ 0xFF]) + raw[40_001:])
    with pytest.raises(WandbFileError, match="checksum"):
        read_payloads(broken)
    broken.write_bytes(b":W&B\x00\x00\x00" + raw[7:])
    with pytest.raises(WandbFileError, match="not a wandb"):
        read_run(broken)


# --- progress -------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_when_not_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="transferline.progress"):
        p = Progress("pretrain", total=100, stream=io.StringIO(), min_interval_s=3600)
        assert not p.is_bar
        for step in (10, 20, 30):
            p.update(step, loss=2.5, lr=1e-3, samples_per_s=512.0)
        p.update(100, loss=1.25, lr=0.0, samples_per_s=600.0)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    # The first update and the last one print; the others fall inside the interval.
    assert len(lines) == 2, lines
    assert lines[0].startswith("[pretrain] step 10/100 loss 2.5000 lr 1.00e-03 512 samples/s eta ")
    assert lines[1].startswith("[pretrain] step 100/100 loss 1.2500") and lines[1].endswith("eta 00:00")


def test_progress_bar_on_a_terminal(caplog):
    term = _Terminal()
    with caplog.at_level(logging.INFO, logger="transferline.progress"):
        p = Progress("finetune", total=40, stream=term)
        assert p.is_bar
        p.update(10, loss=0.75, lr=1e-3, samples_per_s=250.0)
        p.update(40, loss=0.5, lr=0.0, samples_per_s=260.0)
        p.close()
    out = term.getvalue()
    assert "finetune" in out and "40/40" in out and "loss=0.500" in out and "samples_s=260" in out
    assert "<00:00" in out  # tqdm's elapsed<remaining: the ETA
    assert not caplog.records  # a bar, not lines


def test_progress_disabled_on_other_ranks(caplog):
    term = _Terminal()
    with caplog.at_level(logging.INFO, logger="transferline.progress"):
        p = Progress("pretrain", total=10, enabled=False, stream=term)
        p.update(10, loss=1.0, lr=0.1, samples_per_s=1.0)
        p.close()
    assert term.getvalue() == "" and not caplog.records
