"""Checkpoint save/commit/load: atomic step folders, torn saves refused, keep-K, resume state."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_model import tiny_model  # noqa: E402

from pipeline.checkpoint import (  # noqa: E402
    COMMIT_MARKER,
    META_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    capture_rng_state,
    is_committed,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    model_meta,
    restore_rng_state,
    save_checkpoint,
)


def _meta(model: nn.Module) -> dict:
    return model_meta(model, num_classes=10, in_chans=3, img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def _hidden_leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_round_trip_writes_committed_folder(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_checkpoint(tmp_path, 7, model, _meta(model))

    assert path == tmp_path / "step_00000007"
    assert {p.name for p in path.iterdir()} == {WEIGHTS_FILE, META_FILE, COMMIT_MARKER}
    assert is_committed(path)
    state_dict, meta = load_checkpoint(path)
    assert state_dict.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state_dict[name], tensor), name
    assert meta["step"] == 7 and meta["format_version"] == 1
    assert meta["name"] == "tiny_test" and meta["kwargs"] == {"width": 8}
    assert meta["mean"] == [0.5] * 3 and meta["img_size"] == 32
    assert json.loads((path / META_FILE).read_text())["step"] == 7
    assert load_train_state(path) is None
    assert _hidden_leftovers(tmp_path) == []


def test_model_meta_needs_pretrained_cfg() -> None:
    model = tiny_model()
    del model.pretrained_cfg
    with pytest.raises(ValueError, match="pretrained_cfg"):
        _meta(model)


def test_root_resolves_to_latest_and_torn_folders_are_skipped(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model, _meta(model))
    newest = save_checkpoint(tmp_path, 2, model, _meta(model))
    # A torn save: a higher step folder whose marker was never written.
    torn = save_checkpoint(tmp_path, 3, model, _meta(model))
    (torn / COMMIT_MARKER).unlink()

    assert latest_checkpoint(tmp_path) == newest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    assert load_checkpoint(tmp_path)[1]["step"] == 2
    with pytest.raises(ValueError, match=f"{torn}.*not committed"):
        load_checkpoint(torn)
    with pytest.raises(ValueError, match="not committed"):
        load_train_state(torn)


def test_missing_paths_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"no committed checkpoint.*under {tmp_path}"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nope") is None

    model = tiny_model()
    path = save_checkpoint(tmp_path, 5, model, _meta(model))
    (path / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_checkpoint(path)
    (path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(path / META_FILE)):
        load_checkpoint(path)


def test_keep_prunes_oldest_committed_steps(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, _meta(model), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 50, model, _meta(model), keep=0)


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    save_checkpoint(tmp_path, 3, first, _meta(first), train_state={"note": "old"})
    path = save_checkpoint(tmp_path, 3, second, _meta(second))

    state_dict, _ = load_checkpoint(path)
    assert torch.equal(state_dict["stem.weight"], second.stem.weight)
    assert not (path / TRAIN_STATE_FILE).exists()  # nothing of the old folder survives
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    model = tiny_model()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, {"bad": object()})
    with pytest.raises(TypeError, match=r"train_state\['rng'\] is a Random"):
        save_checkpoint(tmp_path, 1, model, _meta(model), train_state={"rng": random.Random()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for the test (a Ray Train run earlier in this process leaves its own)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("python_sigint_handler")
def test_a_ctrl_c_mid_write_lands_after_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT while the files are written (here: at the first fsync, after the weights) does not
    tear the checkpoint: the step is committed with its train state, then the KeyboardInterrupt comes."""
    import os
    import signal

    import pipeline.checkpoint as ckpt

    real_fsync = ckpt._fsync_file
    sent: list[int] = []

    def fsync_then_ctrl_c(path):
        real_fsync(path)
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ckpt, "_fsync_file", fsync_then_ctrl_c)
    model = tiny_model()
    state = {"optimizer": {"lr": torch.tensor(0.5)}, "rng": capture_rng_state()}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, model, _meta(model), train_state=state)
    assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    path = latest_checkpoint(tmp_path)
    assert path is not None and is_committed(path) and _hidden_leftovers(tmp_path) == []
    assert load_train_state(path)["optimizer"]["lr"].item() == 0.5


@pytest.mark.usefixtures("python_sigint_handler")
def test_a_second_ctrl_c_does_not_wait() -> None:
    import os
    import signal

    from pipeline.stopping import interrupts_deferred

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the first")
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_tied_weights_save(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    model[1].weight = model[0].weight
    state_dict, _ = load_checkpoint(save_checkpoint(tmp_path, 0, model, {}))
    assert torch.equal(state_dict["0.weight"], state_dict["1.weight"])


def test_train_state_loads_weights_only_and_rng_restores(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    random.random(), np.random.rand(), torch.randn(1)  # move every generator off its seed
    rng = capture_rng_state()
    expected = (random.random(), np.random.normal(), torch.randn(3))

    path = save_checkpoint(
        tmp_path, 1, model, _meta(model), train_state={"optimizer": optimizer.state_dict(), "rng": rng, "step": 1}
    )
    raw = torch.load(path / TRAIN_STATE_FILE, weights_only=True)  # what a resume relies on
    assert raw["step"] == 1
    state = load_train_state(tmp_path)
    assert state is not None
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    random.random(), np.random.rand(), torch.randn(5)  # drift, then restore
    restore_rng_state(state["rng"])
    again = (random.random(), np.random.normal(), torch.randn(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
