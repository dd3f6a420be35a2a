"""Stage one on a real two-node Ray cluster on one machine (two raylets on 127.0.0.1, one CPU
each): a worker on each node, the second node drained for preemption and then killed mid-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.launch.ray import LOOPBACK_ENV
from tests.conftest import REPO, high_water_step, tiny_overrides

pytestmark = pytest.mark.ray

#: Ray settings for the test cluster: its GCS notices a dead raylet in about a second (default
#: 15 s), and Ray Train polls the drain state every half second (default 5 s).
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
TRAIN_ENV = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
             # The cluster listens on loopback only; without this, Ray on Linux swaps the driver's
             # 127.0.0.1 for the machine's address and cannot reach it.
             LOOPBACK_ENV: "0",
             # Right after a node is lost Ray Train may still count its CPU and try the old size
             # first, waiting this long for workers that cannot come (default 60 s).
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"stage one ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _registered_step(run_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered (its manager's snapshot), or -1."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def test_stage_one_outlives_a_preempted_node_on_a_two_node_cluster(tiny_data, tmp_path):
    """Elastic stage one (1 to 2 workers) on a head and a second node on one machine, storage on a
    path both see. The second node is drained for preemption (what a cloud's spot reclaim does):
    every rank commits a checkpoint at the notice; then its raylet is killed. Ray Train restarts
    the worker group on the node left, from that checkpoint, and stage one completes: its steps
    redone are at most one checkpoint interval, its summary records both world sizes."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": FAST_FAILURE_DETECTION})
    proc = None
    try:
        second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        out = tmp_path / "two_nodes"
        every = 50
        args = [sys.executable, "-m", "pipeline", "pretrain", str(REPO / "configs" / "demo.yaml"),
                *tiny_overrides(tiny_data, out, **{
                    "launcher.kind": "ray", "launcher.address": cluster.address, "launcher.num_workers": 2,
                    "launcher.min_workers": 1, "launcher.cpus_per_worker": 1, "launcher.resize_check_s": 3600,
                    "pretrain.data.num_workers": 1, "engine.threads": 1, "pretrain.steps": 400,
                    "pretrain.checkpoint_every": every, "failure.preemption_check_every": 2})]
        log = tmp_path / "stage_one.log"
        with log.open("w") as err:
            proc = subprocess.Popen(args, cwd=REPO, stdout=err, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, **TRAIN_ENV})
        attempts = out / "pretrain" / "attempts.json"
        _wait_for("the first step", lambda: high_water_step(attempts) >= 1, proc, log)
        drain = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "drain-node", "--address", cluster.address,
             "--node-id", second.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
             "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "60"],
            capture_output=True, text=True, timeout=60, env={**os.environ, **TRAIN_ENV})
        assert drain.returncode == 0, drain.stderr[-2000:]
        notice = re.compile(r"preemption notice for node\(s\) .* at step (\d+): committing a checkpoint")
        _wait_for("preemption notice", lambda: notice.search(log.read_text()), proc, log, timeout=60)
        noticed_at = int(notice.search(log.read_text()).group(1))
        # The node goes once the notice's checkpoint is uploaded and registered (within the drain's
        # deadline, as a cloud's reclaim would wait).
        run_dir = out / "ray" / f"{out.name}-pretrain"
        _wait_for("registered checkpoint", lambda: _registered_step(run_dir) >= noticed_at, proc, log, timeout=60)
        cluster.remove_node(second, allow_graceful=False)  # the raylet and its workers, SIGKILLed
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    result = json.loads((out / "pretrain" / "result.json").read_text())
    assert result["steps"] == 400 and result["attempts"] == 2, result
    (first, then) = result["world_sizes"]
    assert first[0] == 2 and then[0] == 1 and then[2] == 400, result["world_sizes"]
    resumed = result["resumed_from_step"]
    # From the notice's checkpoint (or a periodic one the loop reached before the node went).
    assert (resumed == noticed_at or (resumed > noticed_at and resumed % every == 0)), result
    assert result["steps_redone"] <= every, result
