"""The pipeline's W&B runs, read back from what wandb wrote offline (local launcher, no Ray).

Real wandb 0.31 everywhere it can run here. The one stand-in is the W&B *service* for
`finetune.init_from=wandb:...` (see `_StandInApi`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.lineage import ARTIFACT_SOURCE_FILE, checkpoint_source
from pipeline.runner import run_pipeline
from tests.conftest import REPO, tiny_overrides
from tests.wandb_reader import runs_by_job_type

DEMO = REPO / "configs" / "demo.yaml"
FAKE_KEY = "fakekey" + "7" * 40
FAKE_SECRET = "s3cr3t-do-not-write-0123456789"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_containing(root: Path, *needles: str) -> list[str]:
    hits = []
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {n[:8]}..." for n in needles if n.encode() in data]
    return hits


def _tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("transferline")]


@pytest.fixture
def secrets_in_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("TRANSFERLINE_TEST_SECRET_TOKEN", FAKE_SECRET)


def test_offline_runs_group_metrics_artifact_and_lineage(tiny_data, tmp_path, secrets_in_env, caplog):
    out = tmp_path / "tracked"
    # A secret that slipped into the config (here: a path holding the token) must not reach W&B.
    leaky = tmp_path / FAKE_SECRET / "digits"
    leaky.parent.mkdir()
    leaky.symlink_to(tiny_data["digits"], target_is_directory=True)
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{"tracking.mode": "offline",
                                                              "finetune.data.source": str(leaky)}))
    with caplog.at_level(logging.INFO, logger="transferline"):
        summary = run_pipeline(cfg)
    assert not _tracking_warnings(caplog)

    runs = runs_by_job_type(out / "wandb")
    assert sorted(runs) == ["finetune", "pretrain", "report", "scratch"]
    assert all(len(r) == 1 for r in runs.values()), runs
    pre, ft, sc, rep = (runs[s][0] for s in ("pretrain", "finetune", "scratch", "report"))
    for stage, run in (("pretrain", pre), ("finetune", ft), ("scratch", sc), ("report", rep)):
        assert (run.group, run.job_type, run.run_id, run.project) == (out.name, stage, f"{out.name}-{stage}",
                                                                        "transferline")
        assert run.exited
        # The resolved config is the run config.
        assert run.config["pretrain"]["steps"] == 6 and run.config["finetune"]["seeds"] == [0, 1]

    # Stage one: loss, LR, samples/s on the optimiser-step axis (log_every=2).
    assert [s for s, _ in pre.series("pretrain/loss")] == [2, 4, 6]
    for key in ("pretrain/lr", "pretrain/samples_per_s", "pretrain/samples_seen"):
        assert len(pre.series(key)) == 3, key
    assert pre.summary["final_loss"] == summary["pretrain"]["final_loss"]

    # Its checkpoint, as a `model` artifact with meta.json.
    (art,) = pre.artifacts
    assert art["type"] == "model" and art["name"] == f"{out.name}-model"
    assert sorted(art["files"]) == ["COMMITTED", "meta.json", "model.safetensors"]
    assert set(art["aliases"]) == {"latest", "step-6"}
    assert art["metadata"]["name"] == "hybrid_tiny" and art["metadata"]["step"] == 6
    assert summary["pretrain"]["artifact"]["digest"] == art["digest"]

    # Stage two records that artifact as its input (wandb refuses use_artifact offline).
    for where in (ft.config["input_artifact"], ft.summary["input_artifact"], summary["finetune"]["input_artifact"]):
        assert where["name"] == art["name"] and where["digest"] == art["digest"]
    assert "input_artifact" not in sc.config and summary["scratch"]["input_artifact"] is None

    # Per-seed curves share the fine-tuning step axis, finetune and scratch alike.
    for run in (ft, sc):
        globs = {m["glob_name"]: m["step_metric"] for m in run.metrics if m["glob_name"]}
        assert globs == {"seed_*": "target_step", "mean/*": "target_step"}
        for seed in (0, 1):
            assert [x for x, _ in run.series(f"seed_{seed}/test_accuracy", x="target_step")] == [0, 3, 6]
            assert [x for x, _ in run.series(f"seed_{seed}/train_loss", x="target_step")] == [2, 4, 6]
            assert run.series(f"seed_{seed}/samples_per_s") and run.series(f"seed_{seed}/lr")
        steps = [row["_step"] for row in run.history]
        assert steps == sorted(steps), "W&B steps must only grow"
        mean = run.series("mean/test_accuracy", x="target_step")
        result = summary["finetune" if run is ft else "scratch"]
        assert [x for x, _ in mean] == [0, 3, 6]
        assert mean[-1][1] == pytest.approx(sum(s["test_accuracy"] for s in result["per_seed"]) / 2)
        assert run.summary["test_accuracy"] == pytest.approx(result["test_accuracy"])

    # The report, its curves and summary.json are logged too; report.md links every run.
    (rart,) = rep.artifacts
    assert rart["type"] == "report" and sorted(rart["files"]) == ["curves.png", "report.md", "summary.json"]
    assert rep.series("curves/_type") == [(0, "image-file")]
    assert rep.summary["transfer_gain"] == pytest.approx(summary["transfer_gain"])
    links = summary["tracking"]
    assert links["group"] == out.name and sorted(links["runs"]) == ["finetune", "pretrain", "report", "scratch"]
    assert links["sync_command"] == f"wandb sync {out / 'wandb'}/offline-run-*"
    report = (out / "report.md").read_text()
    assert "## Weights & Biases" in report and links["sync_command"] in report
    for run in (pre, ft, sc, rep):
        assert f"`{run.run_id}`" in report and str(run.path.parent) in report
    assert art["digest"] in report

    # No secret from the environment in anything written; none in what W&B got.
    assert not _files_containing(out, FAKE_KEY)
    assert not _files_containing(out / "wandb", FAKE_SECRET)
    # Nor in the report files logged to W&B (their staged copies are what `wandb sync` uploads).
    assert not _files_containing(out / "report.md", FAKE_SECRET) and "<redacted:" in report
    staged = Path(os.environ["WANDB_DATA_DIR"])
    assert staged.is_dir() and not _files_containing(staged, FAKE_SECRET)
    assert ft.config["finetune"]["data"]["source"].endswith("/<redacted:TRANSFERLINE_TEST_SECRET_TOKEN>/digits")
    # Nor in the saved config or any other file of the run (checkpoint metadata, results).
    assert "<redacted:TRANSFERLINE_TEST_SECRET_TOKEN>" in (out / "config.yaml").read_text()
    assert not _files_containing(out, FAKE_SECRET)


def test_unreachable_wandb_costs_one_warning_and_nothing_else(tiny_data, tmp_path, secrets_in_env,
                                                              monkeypatch, caplog):
    """Online, with W&B's address a closed port: the driver checks once, warns once, and every
    stage logs offline; the pipeline finishes and every metric is on disk for `wandb sync`."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "unreachable"
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{
        "tracking.mode": "online", "tracking.timeout_s": 3, "finetune.seeds": "[0]"}))
    with caplog.at_level(logging.INFO, logger="transferline"):
        summary = run_pipeline(cfg)
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1 and "every stage logs offline" in warnings[0], warnings
    runs = runs_by_job_type(out / "wandb")
    assert sorted(runs) == ["finetune", "pretrain", "report", "scratch"]
    assert len(runs["pretrain"][0].series("pretrain/loss")) == 3
    assert runs["finetune"][0].config["tracking"]["mode"] == "offline"
    assert summary["finetune"]["test_accuracy"] >= 0
    assert not _files_containing(out, FAKE_KEY, FAKE_SECRET)


class _StandInArtifact:
    """What `wandb.Api().artifact(...)` returns, for one real checkpoint folder: name, version,
    qualified name, W&B's real content digest, and `download(root)` copying the files."""

    def __init__(self, source: Path, qualified: str) -> None:
        self._source = source
        self.qualified_name = qualified
        self.name = qualified.rsplit("/", 1)[-1]
        self.version = self.name.split(":")[1]
        self.digest = checkpoint_source(source, run_name="unused")["digest"]

    def download(self, root: str | None = None) -> str:
        dest = Path(root)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "meta.json"):  # W&B does not need our commit marker
            shutil.copy2(self._source / name, dest / name)
        return str(dest)


class _StandInApi:
    """Stand-in for the W&B service behind `wandb.Api` — the one stand-in in these tests. No W&B
    server can run here (it is a closed, licensed image), and the GraphQL the SDK speaks is
    internal and changes between versions, so an imitation HTTP server would test the imitation.
    What our code relies on is the public `wandb.Api` surface (`viewer`, `artifact(name,
    type).download(root)`), so that is where the stand-in sits; everything after the download
    (the checkpoint load, stage two, the offline run that records the input) is real."""

    calls: list[tuple[str, str | None]] = []
    artifacts: dict[str, Path] = {}

    def __init__(self, overrides=None, timeout=None, api_key=None) -> None:
        pass

    @property
    def viewer(self) -> dict[str, str]:
        return {"entity": "ent"}

    def artifact(self, name: str, type: str | None = None) -> _StandInArtifact:
        self.calls.append((name, type))
        return _StandInArtifact(self.artifacts[name], name)


def test_finetune_from_a_wandb_artifact_reference(tiny_data, tmp_path, secrets_in_env, monkeypatch, caplog):
    import wandb

    from architectures import create_model
    from pipeline.checkpoint import model_meta, save_checkpoint

    model = create_model("hybrid_tiny", num_classes=10, in_chans=3)
    meta = model_meta(model, num_classes=10, in_chans=3, img_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    source = save_checkpoint(tmp_path / "published", 40, model, {**meta, "run": "published", "stage": "pretrain"})
    monkeypatch.setattr(_StandInApi, "artifacts", {"ent/proj/published-model:v2": source})
    monkeypatch.setattr(_StandInApi, "calls", [])
    monkeypatch.setattr(wandb, "Api", _StandInApi)
    # wandb.init itself still talks to a real (closed) address: stage two falls back offline.
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")

    out = tmp_path / "from_artifact"
    ref = "wandb:ent/proj/published-model:v2"
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{
        "finetune.init_from": ref, "tracking.mode": "online", "tracking.timeout_s": 3,
        "tracking.project": "proj", "scratch.enabled": "false", "finetune.seeds": "[0]"}), command="finetune")
    with caplog.at_level(logging.INFO, logger="transferline"):
        summary = run_pipeline(cfg, "finetune")

    assert _StandInApi.calls == [("ent/proj/published-model:v2", "model")]
    local = out / "artifacts" / "published-model-v2"
    assert (local / "COMMITTED").is_file() and (local / "model.safetensors").is_file()
    origin = json.loads((local / ARTIFACT_SOURCE_FILE).read_text())
    assert origin["ref"] == ref and origin["version"] == "v2"
    want_digest = checkpoint_source(source, run_name="x")["digest"]

    recorded = summary["finetune"]["input_artifact"]
    assert recorded["ref"] == ref and recorded["name"] == "published-model" and recorded["digest"] == want_digest
    assert summary["finetune"]["init_from"] == str(local)
    (run,) = runs_by_job_type(out / "wandb")["finetune"]
    assert run.config["input_artifact"]["ref"] == ref and run.summary["input_artifact"]["digest"] == want_digest
    assert run.config["finetune"]["init_from"] == str(local)
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 2 and all("logs offline instead" in w for w in warnings), warnings  # finetune, report
    assert not _files_containing(out, FAKE_KEY, FAKE_SECRET)
