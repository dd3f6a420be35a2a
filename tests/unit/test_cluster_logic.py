"""The decisions behind cluster runs, without a cluster: storage checks, tokens, job specs,
attempt bookkeeping and finished-stage detection."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.launch.submit import SubmitError, find_auth_token, job_spec
from pipeline.resume import AttemptLog, finished_result, mark_finished, stage_fingerprint

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"

MOUNTS = """\
overlay / overlay rw,relatime 0 0
/dev/sda1 /data ext4 rw 0 0
fs-1.efs.aws:/ /mnt/shared nfs4 rw,vers=4.1 0 0
/dev/sdb1 /mnt/shared/local\\040disk xfs rw 0 0
tmpfs /dev/shm tmpfs rw 0 0
"""


@pytest.mark.parametrize("path, local", [
    ("/mnt/shared/runs/x", False),            # NFS: may be shared
    ("/mnt/shared/local disk/ray", True),      # the longest mount point wins; escaped space decoded
    ("/data/ray", True),
    ("/tmp/whatever/not/yet/made", True),      # overlay root
    ("s3://bucket/ray", False),
    ("gs://bucket/ray", False),
])
def test_node_local_paths(path, local):
    reason = storage.node_local_reason(path, MOUNTS)
    assert (reason is not None) == local, reason
    if local:
        assert path in reason and "node-local" in reason


def test_node_local_on_this_machine_reads_proc_mounts(tmp_path):
    assert storage.mount_fstype(tmp_path) != ""


def test_resolve_and_uri_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # else pyarrow asks AWS for the region
    fs, path = storage.resolve(str(tmp_path / "ray"))
    assert fs is None and path == str(tmp_path / "ray")
    fs, path = storage.resolve("s3://bucket/prefix/ray/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/prefix/ray"
    assert storage.to_uri("bucket/prefix/ray/run-pretrain/checkpoint_1", "s3://bucket/prefix/ray") == \
        "s3://bucket/prefix/ray/run-pretrain/checkpoint_1"
    assert storage.to_uri("/nfs/ray/x", "/nfs/ray") == "/nfs/ray/x"
    assert storage.fetch_checkpoint(str(tmp_path)) == tmp_path  # local: no copy


def test_spans_nodes():
    from pipeline.launch.ray import spans_nodes

    one = [{"CPU": 8, "GPU": 2}]
    assert not spans_nodes(one, 2, 4, use_gpu=True)
    assert spans_nodes(one, 3, 1, use_gpu=True)      # 3 GPUs wanted, the only node has 2
    assert spans_nodes(one, 3, 4, use_gpu=False)     # 12 CPUs wanted
    assert spans_nodes([{"CPU": 0}], 1, 1, use_gpu=False)  # a head without CPUs: workers come elsewhere
    assert spans_nodes(one * 2, 1, 1, use_gpu=False)


def test_raylets_on_one_host_count_as_one_node_for_storage():
    """Several raylets on one machine (a test cluster, or nodes packed on one host) share its file
    systems: the storage check sums them per host; dead nodes and other hosts count as they are."""
    from pipeline.launch.ray import resources_by_host, spans_nodes

    def node(ip, cpus, alive=True):
        return {"NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": cpus}}

    same_host = [node("10.0.0.1", 1), node("10.0.0.1", 1), node("10.0.0.2", 8, alive=False)]
    assert resources_by_host(same_host) == [{"CPU": 2}]
    assert not spans_nodes(resources_by_host(same_host), 2, 1, use_gpu=False)
    assert spans_nodes(resources_by_host(same_host), 3, 1, use_gpu=False)  # a third worker would come from elsewhere
    assert spans_nodes(resources_by_host([node("10.0.0.1", 4), node("10.0.0.2", 4)]), 1, 1, use_gpu=False)


def test_the_resume_point_under_ray_is_the_checkpoint_ray_registered_not_the_newest_on_disk(tmp_path):
    """A Ctrl-C can land after a checkpoint is persisted and before Ray's manager registers it: a
    relaunch resumes from the registered one, so that is what the line and the preflight name."""
    import torch

    from pipeline.checkpoint import COMMIT_MARKER, save_checkpoint

    run = tmp_path / "demo-pretrain"
    model = torch.nn.Linear(2, 2)
    for step in (10, 20):
        save_checkpoint(run, step, model, {"step": step})
    assert storage.ray_resume_point(str(run)) is None  # nothing registered: Ray starts fresh
    (run / storage.RAY_SNAPSHOT_FILE).write_text(json.dumps(  # Ray Train 2.x's snapshot, the keys read
        {"latest_checkpoint_result": {"checkpoint_dir_name": "step_00000010", "metrics": {"step": 10}}}))
    meta, where = storage.ray_resume_point(str(run))
    assert meta["step"] == 10 and where == str(run / "step_00000010")
    (run / "step_00000010" / COMMIT_MARKER).unlink()
    with pytest.raises(ValueError, match="step_00000010.*torn save"):
        storage.ray_resume_point(str(run))
    (run / storage.RAY_SNAPSHOT_FILE).write_text(json.dumps({"latest_checkpoint_result": None}))
    assert storage.ray_resume_point(str(run)) is None  # a run that never registered one
    (run / storage.RAY_SNAPSHOT_FILE).write_text(json.dumps({"ray_version": "9.0", "checkpoints": []}))
    with pytest.raises(ValueError, match="no latest_checkpoint_result .*Ray 9.0"):
        storage.ray_resume_point(str(run))  # a format this code does not know is not taken for "fresh"


@pytest.mark.parametrize("override, key", [
    ("launcher.storage_path=hdfs://namenode/ray", "launcher.storage_path"),
    ("failure.max_failures=-2", "failure.max_failures"),
])
def test_cluster_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(DEMO, [override])
    assert load_config(DEMO, ["launcher.storage_path=gs://b/p", "failure.max_failures=-1"]).failure.max_failures == -1


def test_auth_token_sources(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert find_auth_token({}, home)[0] is None
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert find_auth_token({}, home) == ("from-home", str(home / ".ray" / "auth_token"))
    token_file = tmp_path / "tok"
    token_file.write_text("from-path")
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == ("from-path", str(token_file))
    assert find_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == \
        ("from-env", "RAY_AUTH_TOKEN")
    assert find_auth_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home)[0] is None
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH names .* which does not exist"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


SHARED_DATA = ["pretrain.data.urls=/mnt/shared/fractals-{000000..000019}.tar", "finetune.data.source=/mnt/shared/digits"]


def test_job_spec_validates_locally_and_passes_secrets_by_name(tmp_path):
    env = {"WANDB_API_KEY": "s3cret", "MY_TOKEN": "t0ken", "PATH": "/usr/bin"}
    entry, runtime_env = job_spec(str(DEMO), ["output_dir=/mnt/shared/runs/demo", "pretrain.steps=50", *SHARED_DATA],
                                  command="run", working_dir=REPO, pip=True, env_names=["MY_TOKEN"], env=env)
    assert shlex.split(entry) == ["python", "-m", "pipeline", "run", "configs/demo.yaml",
                                  "output_dir=/mnt/shared/runs/demo", "pretrain.steps=50", *SHARED_DATA]
    assert runtime_env["working_dir"] == str(REPO)
    assert runtime_env["env_vars"] == {"WANDB_API_KEY": "s3cret", "MY_TOKEN": "t0ken"}
    assert "s3cret" not in entry and ".venv" in runtime_env["excludes"]
    assert any(r.startswith("torch") for r in runtime_env["pip"]) and not any("pytest" in r for r in runtime_env["pip"])

    with pytest.raises(ConfigError, match=r"^pretrain\.optim\.lr:"):
        job_spec(str(DEMO), ["output_dir=/x", "pretrain.optim.lr=fast"], command="run", working_dir=REPO,
                 pip=False, env_names=[], env=env)
    with pytest.raises(ConfigError, match=r"^output_dir: 'runs/demo' is relative"):
        job_spec(str(DEMO), [], command="run", working_dir=REPO, pip=False, env_names=[], env=env)
    with pytest.raises(ConfigError, match=r"^<config>: .* is outside the working_dir"):
        job_spec(str(DEMO), ["output_dir=/x"], command="run", working_dir=tmp_path, pip=False, env_names=[], env=env)
    with pytest.raises(ConfigError, match=r"^--env: NOT_SET not set"):
        job_spec(str(DEMO), ["output_dir=/x"], command="run", working_dir=REPO, pip=False, env_names=["NOT_SET"],
                 env=env)


def test_attempt_log_counts_starts_and_redone_steps(tmp_path):
    first = AttemptLog(tmp_path)
    first.begin(resumed_from_step=0)
    for step in range(1, 8):
        first.reached(step)  # killed after step 7; the last checkpoint was step 5
    second = AttemptLog(tmp_path)
    second.begin(resumed_from_step=5)
    assert (second.attempts, second.steps_redone) == (2, 2)
    for step in range(6, 13):
        second.reached(step)  # killed after 12; checkpoint 10
    third = AttemptLog(tmp_path)
    third.begin(resumed_from_step=10)
    assert (third.attempts, third.steps_redone) == (3, 4)
    assert json.loads((tmp_path / "attempts.json").read_text())["high_water_step"] == 12
    other_rank = AttemptLog(tmp_path, enabled=False)
    other_rank.begin(resumed_from_step=10)
    other_rank.reached(99)
    assert json.loads((tmp_path / "attempts.json").read_text())["attempts"] == 3


def test_finished_stage_is_recognised_only_for_the_same_config(tmp_path):
    ckpt = tmp_path / "ckpt" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "COMMITTED").write_text("step 10\n")
    cfg = load_config(DEMO, [f"output_dir={tmp_path / 'run'}"])
    assert finished_result(cfg, "pretrain") is None
    mark_finished(cfg, "pretrain", {"checkpoint": str(ckpt), "steps": 400})
    assert finished_result(cfg, "pretrain") == {"checkpoint": str(ckpt), "steps": 400}
    # Stage two's settings do not touch stage one's fingerprint; its own do.
    tuned = load_config(DEMO, [f"output_dir={tmp_path / 'run'}", "finetune.steps=7"])
    assert stage_fingerprint(tuned, "pretrain") == stage_fingerprint(cfg, "pretrain")
    assert stage_fingerprint(tuned, "finetune") != stage_fingerprint(cfg, "finetune")
    longer = load_config(DEMO, [f"output_dir={tmp_path / 'run'}", "pretrain.steps=1600"])
    assert finished_result(longer, "pretrain") is None
    (ckpt / "COMMITTED").unlink()  # its checkpoint gone or torn: train again
    assert finished_result(cfg, "pretrain") is None


@pytest.fixture
def silent_dashboard():
    """A TCP server on loopback that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("argv", [["jobs", "list"], ["jobs", "logs", "some-job"], ["jobs", "stop", "some-job"],
                                  ["submit", "configs/demo.yaml", "output_dir=/tmp/transferline-never", *SHARED_DATA]])
def test_a_dashboard_that_never_answers_fails_within_the_timeout(argv, silent_dashboard, capsys, monkeypatch):
    import time

    from pipeline.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    t0 = time.monotonic()
    rc = main([*argv, "--address", silent_dashboard, "--timeout", "1"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1 and elapsed < 10, (rc, elapsed, err)
    assert f"the Ray dashboard at {silent_dashboard} did not answer within 1 s (--timeout)" in err
    assert len(err.strip().splitlines()) == 1


def test_relative_data_paths_resolve_where_the_user_submits_or_are_refused(tmp_path, monkeypatch):
    """The job's copy of the working_dir has no data/: its relative paths resolve against the
    directory submitted from, and must exist there."""
    from pipeline.runner import PATH_BASE_ENV, absolutize

    monkeypatch.chdir(tmp_path)
    common = dict(command="run", working_dir=REPO, pip=False, env_names=[], env={})
    with pytest.raises(ConfigError, match=r"^pretrain\.data\.urls: 'data/fractals/fractals-\{000000\.\.000019\}\.tar' "
                                          r"is a relative path, and .*/data/fractals/fractals-000000\.tar does not exist"):
        job_spec(str(DEMO), ["output_dir=/x"], **common)
    for i in range(20):
        (tmp_path / "data" / "fractals").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "fractals" / f"fractals-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "data" / "digits").mkdir()
    _, runtime_env = job_spec(str(DEMO), ["output_dir=/x"], **common)
    assert runtime_env["env_vars"] == {PATH_BASE_ENV: str(tmp_path)}
    # In the job (another working directory) the paths land where the user submitted from.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(PATH_BASE_ENV, str(tmp_path))
    cfg = absolutize(load_config(DEMO, ["output_dir=/x"]))
    assert cfg.pretrain.data.urls == str(tmp_path / "data" / "fractals" / "fractals-{000000..000019}.tar")
    assert cfg.finetune.data.source == str(tmp_path / "data" / "digits")
    # Nothing relative: nothing to resolve.
    _, runtime_env = job_spec(str(DEMO), ["output_dir=/x", *SHARED_DATA], **common)
    assert "env_vars" not in runtime_env
