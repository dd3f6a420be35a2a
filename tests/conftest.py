"""Shared fixtures: tiny embedded data made once per session, and a config factory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub or W&B's servers.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# wandb stages artifact copies and caches under the home directory by default; keep a test
# session's W&B files in one temporary folder instead.
_WANDB_HOME = tempfile.mkdtemp(prefix="transferline-test-wandb-")
for _var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ.setdefault(_var, os.path.join(_WANDB_HOME, _var.lower()))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Two cores: torch's default thread pool oversubscribes them once loader workers or Ray
# workers run beside the test process (seen here: 10x slower). One thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs 2 processes), tests that start a Ray cluster share one
    group, so they run one after another in one process: never two Rays on this machine at once,
    while the rest of the suite runs beside them."""
    for item in items:
        # Signal and kill tests time processes: they run in that group too, away from the Ray tests.
        if item.get_closest_marker("ray") is not None or item.module.__name__.endswith("test_process_lifetime"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """10 fractal classes x 24 images at 16 px in 6 shards, and the digits dataset."""
    from pipeline.data.embedded import make_digits_dataset, make_fractal_shards

    root = tmp_path_factory.mktemp("data")
    make_fractal_shards(root / "fractals", num_classes=10, per_class=24, img_size=16, samples_per_shard=40, seed=0)
    make_digits_dataset(root / "digits", seed=0)
    return {
        "urls": str(root / "fractals" / "fractals-{000000..000005}.tar"),
        "digits": str(root / "digits"),
        "root": str(root),
    }


def tiny_overrides(data: dict[str, str], out: Path, **extra: object) -> list[str]:
    """A whole pipeline in seconds: 6 pretraining steps, 6 fine-tuning steps, 2 seeds."""
    base = {
        "name": out.name,
        "output_dir": str(out),
        "launcher.kind": "local",
        "launcher.num_workers": 2,
        "pretrain.model.name": "hybrid_tiny",
        "pretrain.data.urls": data["urls"],
        "pretrain.data.img_size": 16,
        "pretrain.data.batch_size": 8,
        "pretrain.data.num_workers": 0,
        "pretrain.data.shuffle_buffer": 20,
        "pretrain.steps": 6,
        "pretrain.checkpoint_every": 3,
        "pretrain.optim.warmup_steps": 2,
        "finetune.data.source": data["digits"],
        "finetune.data.shots_per_class": 2,
        "finetune.data.in_chans": 1,
        "finetune.data.batch_size": 8,
        "finetune.steps": 6,
        "finetune.eval_every": 3,
        "finetune.seeds": "[0,1]",
        "finetune.optim.warmup_steps": 1,
        "finetune.assess": "true",  # the demo runs none at 2 shots; the pipeline tests keep covering it
        "engine.log_every": 2,
        "tracking.mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def high_water_step(attempts: Path) -> int:
    """The highest step a running stage one has reached, from its `attempts.json` (0 before it exists)."""
    import json

    try:
        return int(json.loads(attempts.read_text())["high_water_step"])
    except (OSError, ValueError, KeyError):
        return 0
