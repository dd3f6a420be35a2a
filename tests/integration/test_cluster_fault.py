"""Fault tolerance on a real local Ray, with checkpoints on S3.

A Ray Train worker process is SIGKILLed in the middle of stage one; Ray restarts the worker
group, the stage resumes from the last checkpoint it reported (downloaded from S3), the run
completes, and stage two loads stage one's checkpoint from S3. The S3 server is moto's, on
127.0.0.1: the one stand-in here, for a cloud this machine cannot reach.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runner import run_pipeline
from tests.conftest import REPO, tiny_overrides
from tests.procfs import alive, descendants

pytestmark = pytest.mark.ray

STEPS, CKPT_EVERY, BATCH = 40, 10, 64


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API (moto's server) on loopback with one bucket; the env points clients at it."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="transferline-test")
    yield client, "transferline-test"
    server.stop()


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def _our_train_workers() -> list[int]:
    """PIDs of `ray::RayTrainWorker` processes under this test process (not other users' Rays)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker") and me in _ancestors(int(entry.name)):
            found.append(int(entry.name))
    return found


def _registered_step(client, bucket: str, run: str) -> int:
    """Step of the newest checkpoint Ray's controller has registered (its snapshot in storage)."""
    try:
        body = client.get_object(Bucket=bucket, Key=f"ray/{run}-pretrain/checkpoint_manager_snapshot.json")["Body"]
        latest = json.loads(body.read()).get("latest_checkpoint_result") or {}
    except (client.exceptions.NoSuchKey, json.JSONDecodeError):
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def _kill_a_worker_mid_stage(out: Path, client, bucket: str, record: dict) -> None:
    """SIGKILL one worker once Ray has registered a checkpoint and before the next one is reported.

    A checkpoint counts once Ray's controller has registered it (it polls the workers every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a worker killed before that resumes from the previous one.
    """
    attempts = out / "pretrain" / "attempts.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            reached = json.loads(attempts.read_text())["high_water_step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            reached = 0
        registered = _registered_step(client, bucket, out.name) if reached > CKPT_EVERY else 0
        if registered and reached < registered + CKPT_EVERY:
            workers = _our_train_workers()
            if workers:
                children = descendants(workers[0])  # its loader worker
                os.kill(workers[0], signal.SIGKILL)
                record.update(pid=workers[0], at_step=reached, registered=registered, workers=len(workers),
                              children=sorted(children))
                gone_by = time.monotonic() + 10
                while any(alive(c) for c in children) and time.monotonic() < gone_by:
                    time.sleep(0.1)
                record["survivors"] = [c for c in children if alive(c)]
                return
        time.sleep(0.02)


def test_sigkilled_worker_resumes_from_s3_checkpoint(tiny_data, tmp_path, s3_bucket, monkeypatch):
    client, bucket = s3_bucket
    # Ray's controller collects reports every 2 s by default; polled faster, a reported
    # checkpoint is registered well before the next one, so the kill lands between the two.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    out = tmp_path / "fault"
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, out, **{
        "launcher.kind": "ray", "launcher.num_workers": 2, "launcher.storage_path": f"s3://{bucket}/ray",
        "failure.max_failures": 2, "pretrain.steps": STEPS, "pretrain.checkpoint_every": CKPT_EVERY,
        "engine.log_every": 5, "scratch.enabled": "false", "finetune.seeds": "[0]",
        # Stage one reads its shards as configs/demo.yaml does: one loader worker per rank (a
        # forked child that must die with its rank, or Ray never sees the rank die), its batch
        # and shuffle buffer.
        "pretrain.data.num_workers": 1, "pretrain.data.batch_size": BATCH, "pretrain.data.shuffle_buffer": 1000,
    }))
    kill: dict = {}
    killer = threading.Thread(target=_kill_a_worker_mid_stage, args=(out, client, bucket, kill), daemon=True)
    killer.start()
    t0 = time.monotonic()
    summary = run_pipeline(cfg)
    elapsed = time.monotonic() - t0
    killer.join(timeout=5)
    assert kill, "no RayTrainWorker was killed during stage one"
    assert kill["children"] and not kill["survivors"], f"the killed worker's loader outlived it by 10 s: {kill}"

    p = summary["pretrain"]
    print(f"\nkilled pid {kill['pid']} at step {kill['at_step']} (registered: {kill['registered']}); "
          f"attempts={p['attempts']} resumed_from_step={p['resumed_from_step']} "
          f"steps_redone={p['steps_redone']} run={elapsed:.1f}s")
    assert p["attempts"] == 2
    assert p["resumed_from_step"] % CKPT_EVERY == 0 and p["resumed_from_step"] >= CKPT_EVERY
    assert 0 < p["steps_redone"] <= CKPT_EVERY
    assert p["resumed_from_step"] == kill["registered"]
    assert p["samples_seen"] == STEPS * BATCH * 2  # restored with the checkpoint: no batch counted twice
    steps = [s for s, _ in json.loads((out / "pretrain" / "result.json").read_text())["loss_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS

    # Checkpoints landed in the bucket, committed; stage two loaded stage one's from there.
    ckpt = p["checkpoint"]
    assert ckpt.startswith(f"s3://{bucket}/ray/{out.name}-pretrain/checkpoint_")
    assert summary["finetune"]["init_from"] == ckpt
    key = ckpt.removeprefix(f"s3://{bucket}/")
    names = {o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]}
    assert {"model.safetensors", "meta.json", "train_state.pt", "COMMITTED"} <= names
    meta = json.loads(client.get_object(Bucket=bucket, Key=f"{key}/meta.json")["Body"].read())
    assert meta["step"] == STEPS
    assert 0.0 <= summary["finetune"]["test_accuracy"] <= 1.0
    assert summary["finetune"]["world_size"] == 1  # a trial (the shipping default), reading from the bucket
