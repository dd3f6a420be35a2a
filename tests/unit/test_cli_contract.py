"""What users of such a tool expect of its command line: `--version`, `config`, `--dry-run`, a
clear line for a Python without the dependencies, and an unsafe resume file refused up front."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config, to_dict
from tests.conftest import REPO, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("transferline ")


def test_config_prints_the_resolved_config_with_each_keys_docstring(capsys):
    assert main(["config", DEMO, "finetune.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "  # Optimiser steps per seed. Long enough" in out and "was.\n  steps: 7\n" in out
    assert "# Run name: the output directory and the W&B group.\nname: demo\n" in out
    assert yaml.safe_load(out) == to_dict(load_config(DEMO, ["finetune.steps=7"]))  # comments aside, the config


def test_dry_run_checks_everything_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["run", DEMO, *tiny_overrides(tiny_data, out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("dry run: every check passed; nothing was trained or written")
    assert "stages: pretrain, finetune, scratch (local, in-process)" in printed
    assert "stage one: hybrid_tiny" in printed and "6 shard(s), 240 samples (index); starts fresh" in printed
    assert "10 classes; 20 of 1257 training images (2 per class), 540 test; strategy full" in printed
    assert not out.exists()
    # The same checks as a real run: a bad input fails the dry run too.
    assert main(["run", DEMO, *tiny_overrides(tiny_data, out, **{"finetune.data.shots_per_class": 500}),
                 "--dry-run"]) == 2
    assert "finetune.data.shots_per_class: 500-shot subset impossible" in capsys.readouterr().err


def test_a_python_without_the_dependencies_gets_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # as if not installed
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transferline: error: this Python") and "lacks omegaconf" in err and "--pip" in err
    assert len(err.splitlines()) == 1


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_train_state_that_would_run_code_is_refused_before_training(tiny_data, tmp_path, capsys, monkeypatch):
    """A checkpoint to resume whose train_state.pt refers to a callable: refused by name, never
    run, and torch's advice to load it with weights_only=False never reaches the user."""
    from architectures import create_model
    from pipeline.checkpoint import save_checkpoint
    from pipeline.data.shards import plan_from_config
    from pipeline.inputs import pretrain_meta, shard_normalisation

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "resume"
    args = tiny_overrides(tiny_data, out)
    cfg = load_config(DEMO, args, command="pretrain")
    info = plan_from_config(cfg.pretrain.data).info
    model = create_model("hybrid_tiny", num_classes=10, in_chans=3)
    step = save_checkpoint(out / "pretrain" / "checkpoints", 3, model,
                           pretrain_meta(cfg, model, 10, *shard_normalisation(cfg, info)), train_state={"step": 3})
    (step / "train_state.pt").write_bytes(pickle.dumps(_Payload(), protocol=2))  # torch.save's protocol
    assert main(["pretrain", DEMO, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transferline: error: pretrain: cannot resume: checkpoint file ")
    assert "cannot be loaded safely: it refers to posix.system" in err and "weights_only=False" not in err
    assert not (tmp_path / "PWNED").exists() and not (out / "pretrain" / "attempts.json").exists()


def test_a_loader_death_inside_a_checkpoint_write_is_still_named_and_leaves_no_torn_step(tmp_path, monkeypatch):
    """torch raises a dead loader's error from its SIGCHLD handler, so it can land inside
    torch.save, whose clean-up then raises its own error with the first as context: the CLI
    still recognises it, and the interrupted step is not committed."""
    import torch

    from architectures import create_model
    from pipeline.checkpoint import list_checkpoints, save_checkpoint
    from pipeline.cli import _loader_death

    death = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    def save_cut_short(obj, handle):
        handle.write(b"PK partial")
        try:
            raise death
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 715648 vs 715536")

    monkeypatch.setattr(torch, "save", save_cut_short)
    model = create_model("hybrid_tiny", num_classes=10, in_chans=3)
    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        save_checkpoint(tmp_path / "ckpt", 5, model, {"arch": "hybrid_tiny"}, train_state={"step": 5})
    assert _loader_death(caught.value) is death
    assert _loader_death(RuntimeError("CUDA out of memory")) is None
    assert list_checkpoints(tmp_path / "ckpt") == [] and list((tmp_path / "ckpt").iterdir()) == []


def test_a_connection_reset_by_a_dead_loader_is_named_as_its_death():
    """A batch's shared memory is fetched from the worker that made it: when that worker was just killed,
    reading the batch fails with a connection error before torch notices the death. It is turned into
    torch's own words naming the dead worker (what the CLI reports in one line); a live one's is kept."""
    import signal

    from torch.utils.data import DataLoader

    from pipeline.cli import _loader_death
    from pipeline.data.shards import _dead_worker_error

    it = iter(DataLoader(list(range(64)), batch_size=4, num_workers=1))
    next(it)
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert _dead_worker_error(it, reset) is reset  # the worker lives: not a death
    (worker,) = it._workers
    torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's would raise here, at any line
    try:
        os.kill(worker.pid, signal.SIGKILL)
        death = _dead_worker_error(it, reset)
        del it
    finally:
        signal.signal(signal.SIGCHLD, torch_handler)
    assert str(death) == f"DataLoader worker (pid(s) {worker.pid}) exited unexpectedly"
    assert _loader_death(death) is death
