"""Resume without Ray: a stopped run (its process SIGKILLed) resumes under the same name from
its last committed checkpoint, skipping a torn save; a finished stage is not retrained; a new
name starts fresh. The local launcher shares stage one's resume code with the Ray launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.checkpoint import COMMIT_MARKER, WEIGHTS_FILE, is_committed, list_checkpoints
from tests.conftest import REPO, tiny_overrides

CKPT_EVERY = 5


def _pretrain_cmd(tiny_data, out: Path) -> list[str]:
    overrides = tiny_overrides(tiny_data, out, **{"pretrain.steps": 150, "pretrain.checkpoint_every": CKPT_EVERY,
                                                  "pretrain.keep_checkpoints": 3, "engine.log_every": 5})
    return [sys.executable, "-m", "pipeline", "pretrain", str(REPO / "configs" / "demo.yaml"), *overrides]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _attempts(out: Path) -> dict:
    try:
        return json.loads((out / "pretrain" / "attempts.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_stopped_run_resumes_skips_torn_save_and_does_not_retrain(tiny_data, tmp_path):
    out = tmp_path / "stopped"
    cmd = _pretrain_cmd(tiny_data, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Stop it for real (SIGKILL: no handler runs) once two checkpoints are committed and it trains on.
    while _attempts(out).get("high_water_step", 0) < 2 * CKPT_EVERY + 2:
        assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no progress within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    ckpts = out / "pretrain" / "checkpoints"
    committed = list_checkpoints(ckpts)
    last = int(committed[-1].name.split("_")[1])
    reached = _attempts(out)["high_water_step"]
    assert last >= 2 * CKPT_EVERY and reached < 150

    # A save cut short after writing the weights: a newer step folder without its commit marker,
    # and the temp folder an interrupted atomic save leaves.
    torn = ckpts / f"step_{last + CKPT_EVERY:08d}"
    shutil.copytree(committed[-1], torn)
    (torn / COMMIT_MARKER).unlink()
    (torn / WEIGHTS_FILE).write_bytes((torn / WEIGHTS_FILE).read_bytes()[:100])
    shutil.copytree(torn, ckpts / f".tmp-step_{last + 2 * CKPT_EVERY:08d}-x")

    _run(cmd)  # the same run name: resumes
    summary = json.loads((out / "summary.json").read_text())["pretrain"]
    print(f"\nstopped at step {reached} (last committed {last}); attempts={summary['attempts']} "
          f"resumed_from_step={summary['resumed_from_step']} steps_redone={summary['steps_redone']}")
    assert summary["resumed_from_step"] == last, "resume must skip the uncommitted step folder"
    assert summary["attempts"] == 2
    assert summary["steps_redone"] == reached - last <= CKPT_EVERY
    assert summary["samples_seen"] == 150 * 8  # restored with the checkpoint, not counted twice
    assert is_committed(summary["checkpoint"]) and summary["checkpoint"].endswith("step_00000150")
    steps = [s for s, _ in json.loads((out / "pretrain" / "result.json").read_text())["loss_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # no step logged twice
    report = (out / "report.md").read_text()
    assert f"2 attempt(s); the last resumed from step {last}" in report

    # Finished with this config: a third launch says so and does not train.
    again = _run(cmd)
    assert "pretrain: already finished in this run with this config; not retrained" in again.stderr
    assert json.loads((out / "summary.json").read_text())["pretrain"] == summary
    assert _attempts(out)["attempts"] == 2

    # A new name starts fresh.
    fresh = tmp_path / "fresh"
    _run(_pretrain_cmd(tiny_data, fresh))
    new = json.loads((fresh / "summary.json").read_text())["pretrain"]
    assert new["resumed_from_step"] == 0 and new["attempts"] == 1 and new["steps_redone"] == 0


def _stopped_after_last_checkpoint(tiny_data, out: Path) -> list[str]:
    """A tiny stage one run to its last checkpoint (step 6), as if stopped before the driver
    recorded the end; returns its overrides."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    base = tiny_overrides(tiny_data, out, **{"finetune.enabled": "false"})
    run_pipeline(load_config(REPO / "configs" / "demo.yaml", base, command="pretrain"), "pretrain")
    (out / "pretrain" / "finished.json").unlink()
    return base


def test_resume_refuses_a_checkpoint_of_another_model(tiny_data, tmp_path):
    """Same name, different architecture: a clear error naming the run, not a state-dict crash."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    out = tmp_path / "arch"
    base = _stopped_after_last_checkpoint(tiny_data, out)
    changed = load_config(REPO / "configs" / "demo.yaml", base + ["pretrain.model.name=resnet_tiny"],
                          command="pretrain")
    try:
        run_pipeline(changed, "pretrain")
    except ValueError as e:
        assert "run 'arch' has a checkpoint at step 6 of another model" in str(e)
        assert "use a new run name" in str(e)
    else:
        raise AssertionError("resuming another model's checkpoint must fail")
    assert os.path.isdir(out / "pretrain" / "checkpoints" / "step_00000006")


def test_resume_refuses_other_training_settings_but_not_operational_ones(tiny_data, tmp_path):
    """Same name, same model, another learning rate: resuming would silently mix two runs, so it
    stops naming the key. Checkpointing or loader settings may change between launches."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    out = tmp_path / "lr"
    base = _stopped_after_last_checkpoint(tiny_data, out)
    changed = load_config(REPO / "configs" / "demo.yaml", base + ["pretrain.optim.lr=0.01"], command="pretrain")
    try:
        run_pipeline(changed, "pretrain")
    except ValueError as e:
        assert "run 'lr' has a checkpoint at step 6 trained with other settings" in str(e)
        assert "pretrain.optim.lr: checkpoint 0.002 vs config 0.01" in str(e)
    else:
        raise AssertionError("resuming a checkpoint trained with another learning rate must fail")

    operational = load_config(REPO / "configs" / "demo.yaml", base + [
        "pretrain.checkpoint_every=2", "pretrain.keep_checkpoints=4", "pretrain.data.num_workers=1"],
        command="pretrain")
    summary = run_pipeline(operational, "pretrain")
    assert summary["pretrain"]["resumed_from_step"] == 6 and summary["pretrain"]["checkpoint"].endswith("step_00000006")


def test_finetune_reruns_when_stage_one_trained_again(tiny_data, tmp_path, caplog):
    """A fine-tuning result belongs to the weights it started from: when stage one trains again
    (its checkpoints deleted), fine-tuning runs again too; the scratch baseline does not."""
    import logging

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    out = tmp_path / "again"
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, out, **{"finetune.seeds": "[0]"}))
    run_pipeline(cfg, "run")
    shutil.rmtree(out / "pretrain")
    with caplog.at_level(logging.INFO, logger="transferline.runner"):
        run_pipeline(cfg, "run")
    said = caplog.text
    assert "finetune: finished before, from stage one's earlier weights; running it again" in said
    assert "scratch: already finished in this run with this config; not retrained" in said
    assert "pretrain: already finished" not in said


def test_ray_resume_point_is_checked_before_ray_starts(tiny_data, tmp_path):
    """Under Ray the checkpoint to resume lives in Ray's run storage; preflight reads the meta.json
    of the one Ray's checkpoint manager registered last (what a relaunch resumes) and refuses other
    settings before any cluster work."""
    import pytest

    from pipeline.config import ConfigError, load_config
    from pipeline.runner import run_pipeline

    out = tmp_path / "rp"
    base = tiny_overrides(tiny_data, out, **{"finetune.enabled": "false"})
    run_pipeline(load_config(REPO / "configs" / "demo.yaml", base, command="pretrain"), "pretrain")
    step6 = out / "pretrain" / "checkpoints" / "step_00000006"
    ray_run = out / "ray" / "rp-pretrain"
    shutil.copytree(step6, ray_run / "checkpoint_2026-01-01_00-00-00.000000")
    (ray_run / "checkpoint_manager_snapshot.json").write_text(json.dumps(  # the keys transferline reads
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-00.000000"}}))
    torn = ray_run / "checkpoint_2026-01-01_00-00-09.000000"  # newer, never finished nor registered
    shutil.copytree(step6, torn)
    (torn / COMMIT_MARKER).unlink()
    meta = json.loads((torn / "meta.json").read_text())
    (torn / "meta.json").write_text(json.dumps({**meta, "step": 9, "name": "resnet_tiny"}))

    changed = load_config(REPO / "configs" / "demo.yaml", base + ["launcher.kind=ray", "pretrain.steps=12"],
                          command="pretrain")
    with pytest.raises(ConfigError, match=r"checkpoint at step 6 trained with other settings \(pretrain\.steps: "
                                          r"checkpoint 6 vs config 12\)"):
        run_pipeline(changed, "pretrain")
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
