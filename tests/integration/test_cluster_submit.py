"""`transferline submit` against a real Ray head on 127.0.0.1 with token authentication.

The fixture starts `ray start --head --block` (its own temp dir, and a HOME of its own so the
token Ray writes to ~/.ray/auth_token stays out of the real home) and stops exactly the
processes it started; other Ray instances on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))}
    # The job's entrypoint runs `python` from the PATH the head was started with.
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    return env


def _our_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    temp_dir = tempfile.mkdtemp(prefix="tlray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = _clean_env(home)
    # Ray 2.60's `ray start --head` turns token auth on when ~/.ray/auth_token exists (a local
    # ray.init() writes one; so does this command), and otherwise runs without auth, warning.
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Every fixed default port gets a free one: other Ray instances on this machine hold the defaults.
    ports = {flag: str(_free_port()) for flag in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--ray-client-server-port")}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
         "--temp-dir", temp_dir, "--disable-usage-stats", *[x for kv in ports.items() for x in kv]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start --head exited: {head.stderr.read().decode()[-2000:]}"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering (401: token auth on)
            except OSError:
                assert time.monotonic() < deadline, "the Ray dashboard did not come up in 120 s"
                time.sleep(0.5)
        token_file = home / ".ray" / "auth_token"
        with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=5)
        assert refused.value.code == 401
        yield {"address": address, "env": env, "token": token_file.read_text().strip(), "home": home}
    finally:
        # The head and the processes it started share a session of their own.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        for pid in _our_processes(temp_dir):  # stragglers of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.stderr.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _transferline(args: list[str], env: dict[str, str], timeout: float = 420,
                  cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_wait_runs_the_pipeline_on_the_cluster(ray_head, tiny_data, tmp_path):
    out = tmp_path / "submitted"
    # Stage one on the cluster's Ray (one TorchTrainer: each costs ~15-20 s here); stage two's
    # Ray path is covered by test_pipeline_ray.
    # A project as the README has it: configs/ and a data/ folder git ignores (so the job's copy
    # of the working_dir has no data), with the config's relative data paths.
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "demo.yaml", project / "configs")
    shutil.copytree(tiny_data["root"], project / "data")
    (project / ".gitignore").write_text("/data/\n")
    overrides = tiny_overrides(tiny_data, out, **{
        "launcher.kind": "ray", "launcher.num_workers": 2, "finetune.enabled": "false",
        "pretrain.data.urls": "data/fractals/fractals-{000000..000005}.tar", "finetune.data.source": "data/digits"})
    env = {**ray_head["env"], "WANDB_API_KEY": "secret-value-never-printed"}
    t0 = time.monotonic()
    # No token argument or variable: submit finds it where `ray start` wrote it.
    done = _transferline(["submit", "--address", ray_head["address"], "--wait", "configs/demo.yaml", *overrides], env,
                         cwd=project)
    elapsed = time.monotonic() - t0
    print(f"\nsubmit --wait: {elapsed:.1f}s, exit {done.returncode}")
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    assert ray_head["token"] not in printed and "secret-value-never-printed" not in printed
    assert "env from this shell (values not shown): WANDB_API_KEY" in done.stdout
    assert f"relative paths resolve against {project}" in done.stdout
    job = done.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"job {job}: SUCCEEDED" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    p = summary["pretrain"]
    assert summary["launcher"] == "ray" and p["attempts"] == 1 and p["world_size"] == 2
    assert p["checkpoint"].startswith(str(out / "ray" / f"{out.name}-pretrain" / "checkpoint_"))
    assert "secret-value-never-printed" not in (out / "config.yaml").read_text()
    assert f"{project}/data/fractals/fractals-" in (out / "config.yaml").read_text()  # read where the user is

    listed = _transferline(["jobs", "list", "--address", ray_head["address"]], env, timeout=60)
    assert listed.returncode == 0 and job in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = _transferline(["jobs", "logs", job, "--address", ray_head["address"]], env, timeout=60)
    assert logs.returncode == 0 and "== pretrain (ray launcher) ==" in logs.stdout
    stop = _transferline(["jobs", "stop", job, "--address", ray_head["address"]], env, timeout=60)
    assert stop.returncode == 0 and f"job {job}: not running" in stop.stdout


def test_workers_beyond_one_node_on_node_local_storage_are_refused(ray_head, tiny_data, tmp_path):
    """3 workers x 1 CPU cannot fit the 2-CPU head: they would need more nodes, and the run's
    storage is on this node's disk. The driver refuses before any training, naming the key."""
    out = tmp_path / "spread"
    overrides = tiny_overrides(tiny_data, out, **{"launcher.kind": "ray", "launcher.num_workers": 3,
                                                  "finetune.enabled": "false"})
    done = _transferline(["submit", "--address", ray_head["address"], "--wait", "configs/demo.yaml", *overrides],
                         ray_head["env"], timeout=240)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "transferline: error: launcher.storage_path: " in done.stdout
    assert "is on a node-local" in done.stdout and "may span more than one node" in done.stdout
    assert not (out / "pretrain" / "attempts.json").exists()  # no worker started training


def test_submit_refuses_bad_config_locally_and_explains_a_missing_token(ray_head, tiny_data, tmp_path, monkeypatch,
                                                                        capsys):
    from pipeline.cli import main

    address = ray_head["address"]
    for name in [k for k in os.environ if k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(ray_head["home"]))

    def transferline(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, listed, _ = transferline("jobs", "list", "--address", address)
    assert code == 0
    code, _, err = transferline("submit", "--address", address, "configs/demo.yaml",
                                *tiny_overrides(tiny_data, tmp_path / "bad", **{"pretrain.steps": 0}))
    assert code == 2 and err.strip() == "transferline: error: pretrain.steps: must be >= 1, got 0"
    code, _, err = transferline("submit", "--address", address, "configs/demo.yaml",
                                *tiny_overrides(tiny_data, tmp_path / "rel", output_dir="runs/rel"))
    assert code == 2 and "output_dir: 'runs/rel' is relative" in err
    assert transferline("jobs", "list", "--address", address)[1] == listed, "a bad config must not reach the cluster"

    # No token anywhere: one line that says what to do, and no traceback.
    empty_home = tmp_path / "nohome"
    empty_home.mkdir()
    monkeypatch.setenv("HOME", str(empty_home))
    code, _, err = transferline("jobs", "list", "--address", address)
    assert code == 1 and err.count("\n") == 1 and "requires an authentication token" in err
    assert "RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = transferline("jobs", "list", "--address", address)
    assert code == 1 and "refused the token from RAY_AUTH_TOKEN" in err and "not-the-token" not in err
