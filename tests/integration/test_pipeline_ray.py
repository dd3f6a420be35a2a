"""The whole pipeline on a real local Ray (127.0.0.1): stage one on 2 workers, DDP over gloo;
stage two's fine-tune, scratch baseline and assess as parallel single-process Ray tasks."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest

from pipeline.checkpoint import is_committed, load_checkpoint
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from tests.conftest import REPO, high_water_step, tiny_overrides
from pipeline.launch.reaper import alive, ray_workers
from tests.procfs import listening_sockets
from tests.wandb_reader import runs_by_job_type

pytestmark = pytest.mark.ray


def test_run_on_ray_two_workers(tiny_data, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "ray_run"
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, out, **{
        "launcher.kind": "ray", "launcher.num_workers": 2, "launcher.cpus_per_worker": 1,
        "pretrain.data.num_workers": 1, "tracking.mode": "offline", "engine.threads": 1,
    }))
    # Every socket the private Ray (GCS, raylet, workers, dashboard, agents) listens on, sampled
    # through the run: all on loopback.
    seen: set = set()
    workers: dict[int, str] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            seen.update(listening_sockets())
            workers.update(ray_workers())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run_pipeline(cfg)
    finally:
        done.set()
        sampler.join()
    assert not ray.is_initialized(), "the launcher must shut down the Ray it started"
    # No Ray worker of the run (controller, train workers, their loader children) outlives it.
    assert workers and not [p for p, started in workers.items() if alive(p, started)]
    owners = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= owners, f"sampled no Ray listener: {sorted(seen)}"
    exposed = sorted(s for s in seen if s[0] != "127.0.0.1")
    # The one exception is torch's, not Ray's: rank 0's torch.distributed rendezvous store
    # (TCPStore has no bind address), one port per stage while it runs, in a Ray Train worker
    # process (its title changes with the task it runs: `ray::RayTrainWorker`, `ray::execute...`).
    system = [s for s in exposed if not s[2].startswith("ray::")]
    assert not system, f"the private Ray's own processes listen beyond loopback: {system}"
    assert len({port for _, port, _ in exposed}) <= 3, f"more than one port per stage beyond loopback: {exposed}"

    p = summary["pretrain"]
    assert p["world_size"] == 2
    assert p["samples_seen"] == 6 * 8 * 2  # every rank ran exactly `steps` batches
    # Stage two loaded the checkpoint Ray Train reported, from Ray's storage.
    ckpt = Path(p["checkpoint"])
    assert ckpt.is_relative_to(out / "ray") and is_committed(ckpt)
    assert summary["finetune"]["init_from"] == str(ckpt)
    state, meta = load_checkpoint(ckpt)
    assert meta["step"] == 6
    # Stage two ran as single-process tasks, not TorchTrainers (no Ray Train run of its own),
    # and learned exactly what the local launcher learns from the same checkpoint.
    assert summary["finetune"]["world_size"] == 1 and summary["scratch"]["world_size"] == 1
    assert sorted(d.name for d in (out / "ray").iterdir() if d.is_dir()) == [f"{out.name}-pretrain"]
    assert summary["finetune"]["train_size"] == 20
    assert summary["assess"]["vs_scratch"]["call"] in ("likely to help", "likely to hurt", "uncertain",
                                                       "too easy to tell")
    local = run_pipeline(load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, tmp_path / "local", **{
        "finetune.init_from": str(ckpt), "engine.threads": 1}), command="finetune"), "finetune")
    for stage in ("finetune", "scratch"):
        curves = [[r["curve"] for r in json.loads((d / stage / "result.json").read_text())["runs"]]
                  for d in (out, tmp_path / "local")]
        assert curves[0] == curves[1] and summary[stage]["per_seed"] == local[stage]["per_seed"], stage
    assert summary["assess"]["vs_scratch"]["gain"] == local["assess"]["vs_scratch"]["gain"]
    for name in ("summary.json", "report.md", "curves.png", "config.yaml"):
        assert (out / name).is_file()
    # One offline W&B run per stage, written by rank 0 only (plus the driver's report run),
    # all in the run's group; stage one's checkpoint logged from the worker before Ray moved it.
    runs = runs_by_job_type(out / "wandb")
    assert {k: len(v) for k, v in runs.items()} == {"pretrain": 1, "finetune": 1, "scratch": 1, "report": 1}
    assert {r.group for v in runs.values() for r in v} == {out.name}
    (art,) = runs["pretrain"][0].artifacts
    assert runs["finetune"][0].config["input_artifact"]["digest"] == art["digest"]
    assert [s for s, _ in runs["pretrain"][0].series("pretrain/loss")] == [2, 4, 6]
    assert json.loads((out / "summary.json").read_text())["launcher"] == "ray"


def test_a_failed_trial_fails_the_run_after_keeping_the_others(tiny_data, tmp_path):
    """Stage two's trials are independent: one that raises does not stop the others, each result
    is handed over as it arrives (the runner stores it as finished), and the error names the
    trial that failed once the rest have ended."""
    import shutil

    from pipeline.launch.base import Trial
    from pipeline.launch.ray import RayLauncher

    ray = pytest.importorskip("ray")
    base = tmp_path / "base"
    run_pipeline(load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, base, **{
        "finetune.enabled": "false"})), "pretrain")
    ckpt = base / "pretrain" / "checkpoints" / "step_00000006"
    broken_data = tmp_path / "digits-copy"
    shutil.copytree(tiny_data["digits"], broken_data)

    def cfg(source: Path):
        return load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, tmp_path / "two", **{
            "launcher.kind": "ray", "finetune.init_from": str(ckpt), "finetune.data.source": str(source),
            "finetune.seeds": "[0]"}), command="finetune")

    good, bad = cfg(Path(tiny_data["digits"])), cfg(broken_data)
    shutil.rmtree(broken_data)  # after the config was checked: the trial itself fails
    done: dict = {}
    with RayLauncher(good) as launcher:
        with pytest.raises(RuntimeError, match=r"^stage finetune failed on Ray: .*digits-copy"):
            launcher.run_trials([Trial("finetune", bad), Trial("scratch", good)], "finetune",
                                lambda trial, result: done.update({trial.label: result}))
    assert not ray.is_initialized()
    assert list(done) == ["scratch"] and done["scratch"]["world_size"] == 1

    # `launcher.stage_two: trainer`: the same trial as a 2-rank TorchTrainer of its own.
    trainer = cfg(Path(tiny_data["digits"]))
    trainer = dataclasses.replace(trainer, launcher=dataclasses.replace(trainer.launcher, stage_two="trainer"))
    with RayLauncher(trainer) as launcher:
        launcher.run_trials([Trial("scratch", trainer)], "finetune",
                            lambda trial, result: done.update({"trainer": result}))
    assert done["trainer"]["world_size"] == 2
    assert (tmp_path / "two" / "ray" / "two-scratch").is_dir()


def test_label_free_stage_one_on_two_ray_workers(tiny_data, tmp_path):
    """configs/simclr.yaml's stage one as DDP over 2 Ray workers (each rank's NT-Xent sees both ranks'
    views), on shards read without labels; the projection head is checkpointed beside the model. The
    stage is elastic (1 to 4 workers) on a Ray with room for 2: it starts with the 2 that fit, and
    the summary records that world size and its steps."""
    ray = pytest.importorskip("ray")
    from pipeline.checkpoint import load_train_state

    out = tmp_path / "simclr_ray"
    cfg = load_config(REPO / "configs" / "simclr.yaml", tiny_overrides(tiny_data, out, **{
        "launcher.kind": "ray", "launcher.num_workers": 4, "launcher.min_workers": 1, "launcher.cpus_per_worker": 1,
        "pretrain.data.num_workers": 1, "pretrain.monitor_every": 0, "engine.threads": 1,
        "pretrain.data.label_key": "no-such-key",  # never read by a label-free objective
        "pretrain.simclr.proj_hidden": 32, "finetune.enabled": "false", "tracking.mode": "offline"}),
        command="pretrain")
    env_before = dict(os.environ)
    summary = run_pipeline(cfg, "pretrain")
    assert not ray.is_initialized()
    # The private Ray's settings (no preemption watcher...) leave with it: a later run in this process may join a cluster.
    from pipeline.launch.ray import PRIVATE_CLUSTER_ENV
    assert {k: os.environ.get(k) for k in PRIVATE_CLUSTER_ENV} == {k: env_before.get(k) for k in PRIVATE_CLUSTER_ENV}
    p = summary["pretrain"]
    fits = min(4, os.cpu_count() or 1)  # the private Ray has a CPU per core: 2 workers here
    assert p["objective"] == "simclr" and p["world_size"] == fits and p["samples_seen"] == 6 * 8 * fits
    assert p["world_sizes"] == [[fits, 1, 6]]  # one start, with the workers that fit of at most 4, steps 1-6
    assert p["data"]["skipped_samples"] == 0 and 0 < p["final_loss"] < 10
    state = load_train_state(p["checkpoint"])
    assert "projector.0.weight" in state["objective"]
    weights, meta = load_checkpoint(p["checkpoint"])
    assert meta["num_classes"] == 0 and not any(k.startswith("projector.") for k in weights)
    assert "objective `simclr`" in (out / "report.md").read_text()
    (run,) = runs_by_job_type(out / "wandb")["pretrain"]  # W&B names the objective too
    assert run.config["pretrain"]["objective"] == "simclr"
    assert [s for s, _ in run.series("pretrain/loss")] == [2, 4, 6]


def test_sigterm_to_the_driver_checkpoints_both_ranks_and_the_same_command_redoes_nothing(tiny_data, tmp_path):
    """SIGTERM to the Ray driver (SLURM's --signal, a pod's termination) mid stage one on 2 workers, no
    periodic checkpoints: the driver passes it on, both ranks stop at the same step after committing a
    checkpoint there, the driver prints one line and exits 143; the same command resumes at that step."""
    import re
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("ray")
    out = tmp_path / "ray_sigterm"
    args = [sys.executable, "-m", "pipeline", "pretrain", str(REPO / "configs" / "demo.yaml"),
            *tiny_overrides(tiny_data, out, **{
                "launcher.kind": "ray", "launcher.num_workers": 2, "launcher.cpus_per_worker": 1,
                "pretrain.data.num_workers": 1, "engine.threads": 1, "pretrain.steps": 60,
                "pretrain.checkpoint_every": 0})]
    attempts = out / "pretrain" / "attempts.json"
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while high_water_step(attempts) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"transferline: stopped by SIGTERM to the driver in stage one at step (\d+); last committed "
                     r"checkpoint: step (\d+) \((.+)\); run the same command to resume", last)
    assert m and m.group(1) == m.group(2), err[-3000:]
    stopped = int(m.group(1))
    # Ray's own actors may print their shutdown noise (prefixed "(ActorName pid=...)"); ours may not.
    assert 5 <= stopped < 60 and not any(line.startswith("Traceback") for line in err.splitlines())
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((out / "pretrain" / "result.json").read_text())
    assert result["resumed_from_step"] == stopped and result["steps_redone"] == 0
    assert result["steps"] == 60 and result["world_size"] == 2
