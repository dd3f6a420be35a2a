"""Stage one through the real pipeline: shards over HTTP with bad data and a dead URL, the counts in
summary.json; and an interrupted run resumed from its checkpoint ends bit-identical to an
uninterrupted one (same samples, same augmentations, same weights)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, load_train_state
from pipeline.config import ConfigError, load_config
from pipeline.data.shards import epoch_shards, expand_urls
from pipeline.distributed import DistContext
from pipeline.launch.base import LocalReporter
from pipeline.runner import run_pipeline
from pipeline.stages import run_stage
from tests.conftest import REPO, tiny_overrides
from tests.unit._shard_fixtures import http_server

DEMO = REPO / "configs" / "demo.yaml"
SIMCLR = REPO / "configs" / "simclr.yaml"
HTML = b"<html><body>502 Bad Gateway</body></html>"


def _crawl_from(tiny_urls: str, out: Path) -> int:
    """Re-pack the tiny fractal shards as 6 shards of 10 samples, #2 and #7 of each replaced by an
    HTML page saved as .png: 8 good samples per shard. Returns the bad samples per shard."""
    samples = []
    for url in expand_urls(tiny_urls):
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.rsplit(".", 1)[0] for name in members})
        samples += [(k, members[f"{k}.png"], members[f"{k}.cls"]) for k in keys]
    out.mkdir(parents=True)
    for s in range(6):
        with tarfile.open(out / f"crawl-{s:03d}.tar", "w") as tar:
            for j, (key, png, cls) in enumerate(samples[s * 10:(s + 1) * 10]):
                for ext, data in (("png", HTML if j in (2, 7) else png), ("cls", cls)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (out / "_info.json").write_text(json.dumps({"num_classes": 10, "mean": [0.2, 0.2, 0.2],
                                                "std": [0.3, 0.3, 0.3]}))
    return 2


def test_http_stream_with_bad_data_counts_in_summary(tiny_data, tmp_path):
    bad_per_shard = _crawl_from(tiny_data["urls"], tmp_path / "crawl")
    with http_server(tmp_path / "crawl") as (base, faults):
        # Seven URLs, the last one missing (HTTP 404); the seed puts it first in the shard order.
        urls = f"{base}/crawl-{{000..006}}.tar"
        seed = next(s for s in range(200) if epoch_shards(expand_urls(urls), epoch=0, seed=s)[0].endswith("006.tar"))
        out = tmp_path / "run"
        cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{
            "pretrain.data.urls": urls, "pretrain.seed": seed, "pretrain.data.num_workers": 0,
            "pretrain.data.shuffle_buffer": 0, "pretrain.data.batch_size": 8, "pretrain.data.retries": 0,
            "finetune.enabled": "false",
        }), command="pretrain")
        summary = run_pipeline(cfg, "pretrain")
    data = json.loads((out / "summary.json").read_text())["pretrain"]["data"]
    assert data == summary["pretrain"]["data"]
    # 6 steps x 8 samples = 6 shards of 8 good samples, each with its 2 bad ones before the last good one.
    assert data["skipped_samples"] == 6 * bad_per_shard and data["skipped_by_reason"]["undecodable"] == 12
    assert data["failed_shards"] == 1 and data["partial_shards"] == 0
    assert data["problem_shards"][0]["url"].endswith("crawl-006.tar") and "404" in data["problem_shards"][0]["reason"]
    assert faults.requests["crawl-006.tar"] >= 1
    report = (out / "report.md").read_text()
    assert "12 bad sample(s) skipped, 0 partial and 1 failed shard(s)" in report


def test_wrong_label_key_stops_before_training(tiny_data, tmp_path):
    out = tmp_path / "badkey"
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{"pretrain.data.label_key": "label"}),
                      command="pretrain")
    with pytest.raises(ConfigError, match=r"^pretrain.data.label_key: none of the first .* usable"):
        run_pipeline(cfg, "pretrain")
    assert not (out / "pretrain").exists()


class _Interrupted(Exception):
    pass


class _StopAfter(LocalReporter):
    """A reporter whose run dies right after the checkpoint of `step` was handed over."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if metrics.get("step") == self.step:
            raise _Interrupted(f"killed after step {self.step}")


def _as_jpeg_shards(tiny_urls: str, out: Path, *, captions: bool = False) -> str:
    """The tiny fractal shards with every PNG re-encoded as JPEG (and the same _info.json); with
    ``captions``, image-text shards as LAION-style corpora hold them: ``jpg`` + ``txt``, no ``cls``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for url in expand_urls(tiny_urls):
        with tarfile.open(url) as src, tarfile.open(out / Path(url).name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                name = member.name
                if name.endswith(".png"):
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=90)
                    data, name = buf.getvalue(), name[:-4] + ".jpg"
                elif captions and name.endswith(".cls"):
                    data, name = f"a rendering of system {data.decode()}".encode(), name[:-4] + ".txt"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    info_json = Path(tiny_urls).parent / "_info.json"
    (out / "_info.json").write_text(info_json.read_text())
    return str(out / Path(tiny_urls).name)


class _NoticeAt(LocalReporter):
    """A reporter that brings a preemption notice at `step` (once: `RayReporter` answers each
    preempted node once) and remembers the steps of the checkpoints handed to it."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.checkpoint_steps = step, []

    def notice(self, step):
        from pipeline.stopping import CHECKPOINT

        return (CHECKPOINT, "a preemption notice") if step == self.step else super().notice(step)

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            self.checkpoint_steps.append(metrics["step"])


def test_a_preemption_notice_commits_a_checkpoint_at_once_and_training_goes_on(tiny_data, tmp_path):
    """A notice between periodic checkpoints commits one at that step, and the stage runs on to its
    end computing what it would have without the notice."""
    cfg = load_config(DEMO, tiny_overrides(tiny_data, tmp_path / "run", **{
        "pretrain.steps": 6, "pretrain.checkpoint_every": 4, "pretrain.keep_checkpoints": 5,
        "pretrain.data.num_workers": 0, "finetune.enabled": "false"}), command="pretrain")
    reporter = _NoticeAt(3)
    result = run_stage("pretrain", cfg, reporter, DistContext())
    assert result["steps"] == 6 and reporter.checkpoint_steps == [3, 4, 6]
    plain = run_stage("pretrain", load_config(DEMO, tiny_overrides(tiny_data, tmp_path / "plain", **{
        "pretrain.steps": 6, "pretrain.checkpoint_every": 4, "pretrain.data.num_workers": 0,
        "finetune.enabled": "false"}), command="pretrain"), LocalReporter(), DistContext())
    assert result["loss_curve"] == plain["loss_curve"]  # a checkpoint changes nothing the run computes


@pytest.mark.parametrize("num_workers, decode", [(0, "worker"), (2, "worker"), (2, "device")])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_data, tmp_path, num_workers, decode):
    """Also with JPEGs decoded in the training process (`decode=device`): the workers still draw
    every crop, so positions and augmentations resume exactly."""
    urls = _as_jpeg_shards(tiny_data["urls"], tmp_path / "jpeg") if decode == "device" else tiny_data["urls"]

    def config(out: Path):
        return load_config(DEMO, tiny_overrides(tiny_data, out, **{
            "pretrain.steps": 6, "pretrain.checkpoint_every": 2, "pretrain.keep_checkpoints": 5,
            "pretrain.data.num_workers": num_workers, "pretrain.data.shuffle_buffer": 30,
            "pretrain.data.urls": urls, "pretrain.data.decode": decode, "finetune.enabled": "false",
        }), command="pretrain")

    full = run_stage("pretrain", config(tmp_path / "full"), LocalReporter(), DistContext())

    cut = config(tmp_path / "cut")
    with pytest.raises(_Interrupted):
        run_stage("pretrain", cut, _StopAfter(4), DistContext())
    ckpt = Path(cut.output_dir) / "pretrain" / "checkpoints" / "step_00000004"
    position = load_train_state(ckpt)["data_position"]
    assert len(position["ranks"]) == 1 and position["ranks"][0]["batches"] == 4

    resumed = run_stage("pretrain", cut, LocalReporter(resume_from=ckpt), DistContext())
    assert resumed["resumed_from_step"] == 4 and resumed["data"]["resumed_position"] == "exact"
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["loss_curve"] == full["loss_curve"]
    a, _ = load_checkpoint(full["checkpoint"])
    b, _ = load_checkpoint(resumed["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["data"]["samples_used"] == full["data"]["samples_used"] == 6 * 8
    assert full["data"]["skipped_samples"] == 0


def test_the_strong_supervised_recipe_resumes_exactly_and_hands_on_its_ema(tiny_data, tmp_path):
    """TrivialAugment in the (one, as the demo's) loader worker, MixUp/CutMix on the batch and a weight
    EMA: an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one (the
    EMA and the mixing's call count are checkpointed), and the checkpoint holds the EMA and says so."""
    def config(out: Path, **extra: object):
        return load_config(DEMO, tiny_overrides(tiny_data, out, **{
            "pretrain.steps": 6, "pretrain.checkpoint_every": 2, "pretrain.keep_checkpoints": 5,
            "pretrain.data.num_workers": 1, "pretrain.data.shuffle_buffer": 30, "pretrain.data.auto_augment":
            "trivialaugment", "pretrain.mix.mixup_alpha": 0.2, "pretrain.mix.cutmix_alpha": 1.0,
            "pretrain.ema.decay": 0.9, "finetune.enabled": "false", **extra}), command="pretrain")

    full = run_stage("pretrain", config(tmp_path / "full"), LocalReporter(), DistContext())
    cut = config(tmp_path / "cut")
    with pytest.raises(_Interrupted):
        run_stage("pretrain", cut, _StopAfter(4), DistContext())
    ckpt = Path(cut.output_dir) / "pretrain" / "checkpoints" / "step_00000004"
    resumed = run_stage("pretrain", cut, LocalReporter(resume_from=ckpt), DistContext())
    assert resumed["resumed_from_step"] == 4 and resumed["loss_curve"] == full["loss_curve"]
    for a, b in [(load_checkpoint(full["checkpoint"])[0], load_checkpoint(resumed["checkpoint"])[0]),
                 (load_train_state(full["checkpoint"])["objective"], load_train_state(resumed["checkpoint"])["objective"])]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights, meta = load_checkpoint(full["checkpoint"])
    state = load_train_state(full["checkpoint"])["objective"]
    assert meta["weights"] == full["weights"] == "ema" and int(state["mix_calls"]) == 6
    assert all(torch.equal(weights[k], state[f"ema.{k}"]) for k in weights)  # the checkpoint is the EMA
    plain = run_stage("pretrain", config(tmp_path / "plain", **{"pretrain.ema.decay": 0}), LocalReporter(),
                      DistContext())
    assert load_checkpoint(plain["checkpoint"])[1]["weights"] == plain["weights"] == "model"
    assert plain["loss_curve"] == full["loss_curve"]  # the EMA only watches: the trained weights are the same


def test_too_few_shards_refused_before_ray_with_the_numbers(tiny_data, tmp_path):
    import subprocess
    import sys

    args = tiny_overrides(tiny_data, tmp_path / "few", **{"launcher.kind": "ray", "launcher.num_workers": 4,
                                                         "pretrain.data.num_workers": 2})
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", str(DEMO), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("transferline: error: pretrain.data.urls: 6 shard(s) cannot feed "
                                  "world_size=4 x num_workers=2 = 8 readers")
    assert "Traceback" not in proc.stderr and not (tmp_path / "few" / "ray").exists()


def test_weighted_resampled_sources_through_the_pipeline(tiny_data, tmp_path):
    from pipeline.config import config_from_dict, to_dict

    urls = tiny_data["urls"]
    first, rest = urls.replace("{000000..000005}", "{000000..000001}"), urls.replace("{000000..000005}", "{000002..000005}")
    out = tmp_path / "mix"
    cfg = load_config(DEMO, [*tiny_overrides(tiny_data, out, **{
        "pretrain.data.resampled": "true", "pretrain.data.num_workers": 2, "finetune.enabled": "false"}),
        "pretrain.data.urls=null", f"pretrain.data.sources=[{{urls: '{first}', weight: 1}}, {{urls: '{rest}', weight: 2}}]"],
        command="pretrain")
    assert config_from_dict(to_dict(cfg), command="pretrain") == cfg  # what Ray workers rebuild
    summary = run_pipeline(cfg, "pretrain")
    data = summary["pretrain"]["data"]
    assert data["samples_used"] == 6 * 8 and data["skipped_samples"] == 0
    assert data["epoch_samples"] == 240 and data["epoch_samples_from"] == "index"
    assert "(weight 2)" in (out / "report.md").read_text()


@pytest.mark.parametrize("objective", ["simclr", "dino"])
def test_label_free_run_on_image_text_shards_resumes_exactly_and_fine_tunes(tiny_data, tmp_path, objective):
    """configs/simclr.yaml's stage one (and the same with `dino`) on `jpg` + `txt` shards (no labels; the
    text is ignored) with its one loader worker: an interrupted run resumed from its checkpoint ends
    bit-identical to an uninterrupted one (backbone and all objective state: heads and their BatchNorm
    statistics; DINO's student, teacher and centre), and the checkpoint fine-tunes."""
    urls = _as_jpeg_shards(tiny_data["urls"], tmp_path / "captions", captions=True)

    def overrides(out: Path, **extra: object) -> list[str]:
        return tiny_overrides(tiny_data, out, **{
            "pretrain.objective": objective, "pretrain.monitor_every": 0,
            "pretrain.simclr.proj_hidden": 32, "pretrain.simclr.proj_dim": 16,
            "pretrain.dino.out_dim": 64, "pretrain.dino.hidden": 32, "pretrain.dino.bottleneck": 16,
            "pretrain.steps": 6, "pretrain.checkpoint_every": 2, "pretrain.keep_checkpoints": 5,
            "pretrain.data.num_workers": 1, "pretrain.data.shuffle_buffer": 30, "pretrain.data.urls": urls, **extra})

    def config(out: Path):
        return load_config(SIMCLR, overrides(out, **{"finetune.enabled": "false"}), command="pretrain")

    full = run_stage("pretrain", config(tmp_path / "full"), LocalReporter(), DistContext())
    assert full["objective"] == objective and full["num_classes"] == 0
    assert full["data"]["samples_used"] == 6 * 8 and full["data"]["skipped_samples"] == 0
    cut = config(tmp_path / "cut")
    with pytest.raises(_Interrupted):
        run_stage("pretrain", cut, _StopAfter(4), DistContext())
    ckpt = Path(cut.output_dir) / "pretrain" / "checkpoints" / "step_00000004"
    resumed = run_stage("pretrain", cut, LocalReporter(resume_from=ckpt), DistContext())
    assert resumed["resumed_from_step"] == 4 and resumed["data"]["resumed_position"] == "exact"
    assert resumed["loss_curve"] == full["loss_curve"]
    for a, b in [(load_checkpoint(full["checkpoint"])[0], load_checkpoint(resumed["checkpoint"])[0]),
                 (load_train_state(full["checkpoint"])["objective"], load_train_state(resumed["checkpoint"])["objective"])]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights, _ = load_checkpoint(full["checkpoint"])
    assert not any(k.startswith(("projector.", "head.", "teacher")) for k in weights)  # a backbone only
    if objective == "dino":  # the model handed on is the EMA teacher, not the student
        objective_state = load_train_state(full["checkpoint"])["objective"]
        assert all(torch.equal(weights[k], objective_state[f"teacher_backbone.{k}"]) for k in weights)
        assert not all(torch.equal(weights[k], objective_state[f"backbone.{k}"]) for k in weights)
        return

    out = tmp_path / "run"
    summary = run_pipeline(load_config(SIMCLR, overrides(out, **{"finetune.assess": "false"})))
    assert summary["pretrain"]["objective"] == "simclr"
    f = summary["finetune"]
    assert f["init_from"] == summary["pretrain"]["checkpoint"] and len(f["per_seed"]) == 2
    assert 0.0 < f["test_accuracy"] <= 1.0 and 0.0 < summary["scratch"]["test_accuracy"] <= 1.0
    assert "objective `simclr` (label-free" in (out / "report.md").read_text()
