"""cluster/: each launch file parses, runs the pipeline with valid config keys, and asks for the
resources, storage and security settings a multi-node GPU run needs."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def _valid_key(key: str) -> bool:
    node = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_kuberay_rayjob_runs_the_pipeline_on_gpu_workers_with_shared_storage():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True

    # The entrypoint is a transferline run whose config and overrides load (placeholders aside).
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["transferline", "run"]
    config = REPO / argv[2].removeprefix("/app/")
    overrides = argv[3:]
    cfg = load_config(config, overrides)
    assert cfg.launcher.use_gpu is True and cfg.launcher.num_workers == 4
    assert cfg.launcher.storage_path.startswith("s3://")
    assert cfg.output_dir.startswith("/mnt/shared/") and cfg.failure.max_failures >= 1

    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == cfg.launcher.num_workers
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert float(worker["resources"]["limits"]["cpu"]) >= cfg.launcher.cpus_per_worker
    head_container = head["template"]["spec"]["containers"][0]
    assert worker["image"] == head_container["image"]
    # output_dir on the volume every pod mounts (the driver reads what rank 0 writes there).
    for pod, container in ((head["template"]["spec"], head_container), (group["template"]["spec"], worker)):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["shared"] == "/mnt/shared"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims["shared"] == "transferline-shared"
        # Secrets come from a Kubernetes Secret, never from the manifest itself.
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"]


def test_ray_cluster_launcher_yaml_has_gpu_workers_token_and_loopback_dashboard():
    c = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    workers = [t for name, t in types.items() if name != c["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert types[c["head_node_type"]]["resources"].get("CPU") == 0
    assert c["provider"]["type"] in ("aws", "gcp", "azure")
    assert any("pip install" in cmd and "transferline" in cmd for cmd in c["setup_commands"])
    # One token for every node (and the laptop that submits), mounted from ~/.ray/auth_token.
    assert c["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in c["worker_start_ray_commands"] if "ray start" in cmd)
    # Shared outputs: the EFS mount on each host is passed into the container.
    assert any("/mnt/shared" in cmd and "nfs4" in cmd for cmd in c["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in c["docker"]["run_options"]


def test_slurm_script_starts_ray_then_the_driver_with_valid_keys():
    script = (CLUSTER / "slurm.sh").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sh")], check=True)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", script, re.M))
    assert int(sbatch["nodes"]) >= 2 and "gpus-per-task" in sbatch and "exclusive" in sbatch
    assert re.search(r"ray start --head .*--block", script.replace("\\\n", " "))
    assert re.search(r"ray start --address=\"\$head_ip:\$PORT\"", script)
    assert "--dashboard-host=127.0.0.1" in script
    assert "export RAY_AUTH_MODE=token" in script and "RAY_AUTH_TOKEN_PATH" in script
    assert "umask 077" in script  # the token file is readable by its owner only
    driver = script.split("transferline run", 1)[1].split('"$@"', 1)[0].replace("\\\n", " ")
    keys = re.findall(r"([a-z_.]+)=", driver)
    assert {"launcher.address", "launcher.num_workers", "launcher.storage_path", "output_dir"} <= set(keys)
    assert all(_valid_key(k) for k in keys), [k for k in keys if not _valid_key(k)]


@pytest.mark.parametrize("key", ["launcher.storage_path", "failure.max_failures", "pretrain.data.urls"])
def test_valid_key_helper_knows_real_keys(key):
    assert _valid_key(key) and not _valid_key("launcher.no_such_key")


def test_dockerfile_installs_the_project_on_rays_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.\d+\.\d+-py3\d+-gpu$", text, re.M)
    assert "pip install --no-cache-dir -e /app" in text
    image = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())["docker"]["image"]
    assert f"FROM {image}" in text.splitlines()


def test_cluster_readme_names_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for name in ("ray-cluster.yaml", "rayjob.yaml", "slurm.sh", "Dockerfile"):
        assert name in readme


def test_slurm_script_passes_the_early_sigterm_on_to_the_driver_and_exits_with_its_status(tmp_path):
    """`--signal=B:TERM@N` signals the batch shell only: its driver part (run as written, with a stand-in
    `transferline` that stops on SIGTERM the way the real one does) passes the signal on, waits for the
    driver to finish its checkpoint and exits with the driver's status, 143."""
    import os
    import signal
    import time

    script = (CLUSTER / "slurm.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", script, re.M))
    assert re.fullmatch(r"B:TERM@\d+", sbatch["signal"])
    driver_part = script[script.index("transferline run"):]
    bin_dir, log = tmp_path / "bin", tmp_path / "driver.log"
    bin_dir.mkdir()
    fake = bin_dir / "transferline"
    fake.write_text(f"#!/bin/bash\necho \"args: $*\" >> {log}\n"
                    f"trap 'sleep 0.5; echo checkpointed >> {log}; exit 143' TERM\n"
                    "while :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CONFIG": "c.yaml", "RUN_NAME": "r",
           "SHARED": str(tmp_path), "head_ip": "127.0.0.1", "PORT": "6379", "GPUS_PER_NODE": "1",
           "CPUS_PER_NODE": "2", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    preamble = "set -euo pipefail\nnodes=(a b)\n"
    proc = subprocess.Popen(["bash", "-c", preamble + driver_part], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (log.exists() and "args:" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 143, out
    assert log.read_text().splitlines()[-1] == "checkpointed"  # the driver finished before the script exited
    assert "failure.max_preemption_failures=" in log.read_text()
