"""No process of a SIGKILLed run survives it: loader workers die with their parent.

`transferline` runs as a user starts it (the CLI, torch's default threads, one loader worker
as the shipping configs have), is SIGKILLed mid-stage, and every process it had started must
be gone within 10 s. Without the parent-death signal, an orphaned loader worker forked from a
multi-threaded trainer deadlocks on exit and lives on holding the dead process's sockets and
shared memory (under Ray: the RayTrainWorker's sockets, so Ray never sees the death).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, high_water_step, tiny_overrides
from tests.procfs import alive, descendants


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_no_process_outlives_a_sigkilled_local_run(stage, tiny_data, tmp_path):
    out = tmp_path / f"kill-{stage}"
    # Stage one as configs/demo.yaml reads its shards (batches, shuffle buffer, one loader worker).
    long = {"pretrain": {"pretrain.steps": 100_000, "pretrain.data.num_workers": 1, "pretrain.data.batch_size": 64,
                         "pretrain.data.shuffle_buffer": 1000, "pretrain.data.img_size": 32},
            "finetune": {"finetune.steps": 100_000, "finetune.data.num_workers": 1, "pretrain.steps": 2,
                         "finetune.seeds": "[0]", "finetune.eval_every": 100_000}}[stage]
    args = tiny_overrides(tiny_data, out, **{"pretrain.checkpoint_every": 100_000, "scratch.enabled": "false",
                                             "finetune.assess": "false", **long})
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's threads, as users run it
    log = out.parent / f"{stage}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(REPO / "configs" / "demo.yaml"), *args],
                                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        marker = f"[{stage}"
        while marker not in log.read_text() or not descendants(proc.pid):
            assert proc.poll() is None, f"the run ended before {stage} trained:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{stage} did not start training:\n{log.read_text()[-2000:]}"
            time.sleep(0.2)
        time.sleep(1.0)  # the worker has prefetched and is blocked on a full queue
        pids = sorted(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in pids if alive(p)]
        assert not survivors, f"processes {survivors} of the run outlived its SIGKILL by 10 s"
    finally:
        proc.kill()
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ctrl_c_says_where_it_stopped_and_the_same_command_resumes(tiny_data, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) mid stage one: one line naming the step
    reached and the last committed checkpoint, exit 130; the same command then resumes there."""
    out = tmp_path / "interrupted"
    args = [sys.executable, "-m", "pipeline", "pretrain", str(REPO / "configs" / "demo.yaml"),
            *tiny_overrides(tiny_data, out, **{"pretrain.steps": 200, "pretrain.checkpoint_every": 5,
                                               "pretrain.data.num_workers": 1, "engine.log_every": 5})]
    log = tmp_path / "interrupted.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, cwd=REPO, stdout=sink, stderr=subprocess.PIPE, text=True,
                                start_new_session=True,  # a terminal's process group of its own
                                preexec_fn=_as_from_a_terminal)
    attempts = out / "pretrain" / "attempts.json"
    try:
        deadline = time.monotonic() + 120
        while high_water_step(attempts) < 15:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"transferline: interrupted in stage one at step (\d+); last committed checkpoint: step (\d+) "
                     r"\((.+)\); run the same command to resume", last)
    assert m, err[-2000:]
    reached, kept = int(m.group(1)), int(m.group(2))
    assert reached >= 15 and kept % 5 == 0 and reached - 5 <= kept <= reached and Path(m.group(3)).is_dir()
    assert reached < 200, "the run ended before the interrupt: make it longer"
    assert "Traceback" not in err

    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((out / "pretrain" / "result.json").read_text())
    assert result["resumed_from_step"] == kept and result["steps"] == 200


def _as_from_a_terminal() -> None:
    """In the child before exec: Ctrl-C delivered and at its default, as a shell starts a command
    (a pytest process that has run Ray in-process may have it blocked or ignored, and children inherit that)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(args: list[str], log: Path, ready) -> tuple[int, str]:
    """Run the CLI as a terminal would (its own process group), Ctrl-C the group once `ready()`,
    and return (exit status, the last line of its output)."""
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return proc.returncode, text.strip().splitlines()[-1]


@pytest.mark.ray
def test_ctrl_c_under_ray_interrupts_stage_one_and_stage_two_in_one_line(tiny_data, tmp_path):
    """The demo's launcher: Ray Train's own SIGINT handler aborted stage one with exit 1 and no word,
    and stayed installed, so a Ctrl-C in stage two did nothing. Both now end like a local run: one
    line, exit 130; the same command resumes stage one from its checkpoint."""
    out = tmp_path / "ray-interrupted"
    args = [sys.executable, "-m", "pipeline", "run", str(REPO / "configs" / "demo.yaml"),
            *tiny_overrides(tiny_data, out, **{
                "launcher.kind": "ray", "launcher.num_workers": 1, "pretrain.data.num_workers": 1,  # the demo's loader
                "pretrain.steps": 300,
                "pretrain.checkpoint_every": 5, "engine.log_every": 5, "finetune.steps": 100_000,
                "finetune.eval_every": 100_000, "finetune.seeds": "[0]", "scratch.enabled": "false",
                "finetune.assess": "false"})]
    attempts = out / "pretrain" / "attempts.json"
    code, last = _interrupt(args, tmp_path / "stage-one.log", lambda: high_water_step(attempts) >= 15)
    assert code == 130, last
    m = re.fullmatch(r"transferline: interrupted in stage one at step (\d+); last committed checkpoint: step (\d+) "
                     r"\((.+)\); run the same command to resume", last)
    assert m and int(m.group(1)) < 300 and int(m.group(2)) >= 5, last
    reached, kept = int(m.group(1)), int(m.group(2))

    log = tmp_path / "stage-two.log"
    code, last = _interrupt(args, log, lambda: "[finetune] step" in log.read_text())
    assert code == 130, last
    assert last == ("transferline: interrupted in stage two; finished stages are kept (stage one's checkpoint too); "
                    "run the same command to go on: what finished is not rerun"), last
    result = json.loads((out / "pretrain" / "result.json").read_text())
    # The line names what Ray's checkpoint manager registered, which is what Ray resumes from (the
    # newest folder on disk was up to two intervals ahead of it: seen 30 vs 20).
    assert result["resumed_from_step"] == kept <= reached
    assert result["steps"] == 300


def test_sigterm_commits_a_checkpoint_at_the_step_it_stops_and_the_same_command_redoes_nothing(tiny_data, tmp_path):
    """SIGTERM (SLURM's --signal, a pod's termination) mid stage one, with the demo's one loader worker
    and no periodic checkpoints: a checkpoint committed at the step it stopped, one line, exit 143;
    the same command resumes at that step, redoing none."""
    out = tmp_path / "terminated"
    args = [sys.executable, "-m", "pipeline", "pretrain", str(REPO / "configs" / "demo.yaml"),
            *tiny_overrides(tiny_data, out, **{"pretrain.steps": 100, "pretrain.checkpoint_every": 0,
                                               "pretrain.data.num_workers": 1})]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    attempts = out / "pretrain" / "attempts.json"
    try:
        deadline = time.monotonic() + 120
        while high_water_step(attempts) < 10:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"transferline: stopped by SIGTERM in stage one at step (\d+); last committed checkpoint: "
                     r"step (\d+) \((.+)\); run the same command to resume", last)
    assert m and m.group(1) == m.group(2) and Path(m.group(3)).is_dir(), err[-2000:]
    stopped = int(m.group(1))
    assert 10 <= stopped < 100 and "Traceback" not in err
    assert high_water_step(attempts) == stopped
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((out / "pretrain" / "result.json").read_text())
    assert result["resumed_from_step"] == stopped and result["steps_redone"] == 0 and result["steps"] == 100


def test_a_killed_loader_worker_stops_the_run_in_one_line_and_the_same_command_resumes(tiny_data, tmp_path):
    out = tmp_path / "loader-killed"
    args = [sys.executable, "-m", "pipeline", "pretrain", str(REPO / "configs" / "demo.yaml"),
            *tiny_overrides(tiny_data, out, **{"pretrain.steps": 200, "pretrain.checkpoint_every": 5,
                                               "pretrain.data.num_workers": 1})]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    attempts = out / "pretrain" / "attempts.json"
    try:
        deadline = time.monotonic() + 120
        while high_water_step(attempts) < 10 or not descendants(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        (loader,) = sorted(descendants(proc.pid))
        os.kill(loader, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    # torch's own words vary ("exited unexpectedly", "is killed by signal: Killed").
    assert re.fullmatch(rf"transferline: error: a data loader process died \(DataLoader worker \(pids?(\(s\))? "
                        rf"{loader}\) [^)]+\) in stage one at step \d+; last committed checkpoint: step \d+ \(.+\); "
                        r"run the same command to resume", last), err[-2000:]
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "pretrain" / "result.json").read_text())["resumed_from_step"] >= 5
