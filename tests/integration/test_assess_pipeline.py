"""Transferability scores on the embedded default data: a checkpoint pretrained on fractals
gives digits features that beat a random backbone's on kNN and LogME (issue #6)."""

from __future__ import annotations

import subprocess
import sys

from pipeline.assess import assess, gain_verdict
from pipeline.config import load_config
from pipeline.data.embedded import make_fractal_shards
from pipeline.runner import run_pipeline
from tests.conftest import REPO, tiny_overrides


def test_pretrained_beats_random_on_knn_and_logme(tiny_data, tmp_path):
    # The embedded default's recipe at half the images: 100 fractal classes x 100 at 32 px.
    make_fractal_shards(tmp_path / "fractals", num_classes=100, per_class=100, img_size=32,
                        samples_per_shard=500, seed=0)
    out = tmp_path / "pre"
    cfg = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, out, **{
        "pretrain.data.urls": str(tmp_path / "fractals" / "fractals-{000000..000019}.tar"),
        "pretrain.data.img_size": 32, "pretrain.data.batch_size": 64, "pretrain.steps": 450,
        "pretrain.data.shuffle_buffer": 500, "pretrain.checkpoint_every": 0,
        "pretrain.optim.warmup_steps": 25, "engine.log_every": 50,
        "finetune.enabled": "false",
    }))
    summary = run_pipeline(cfg)
    ckpt = summary["pretrain"]["checkpoint"]

    target = load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tiny_data, tmp_path / "t", **{
        "finetune.init_from": ckpt, "finetune.data.shots_per_class": 10}), command="finetune")
    scores = assess(target, ckpt)
    assert scores["samples"] == 100
    assert scores["pretrained"]["knn"] > scores["random"]["knn"]
    assert scores["pretrained"]["logme"] > scores["random"]["logme"]
    assert scores["feature_verdict"].startswith("pretrained features beat random ones")
    # The prediction that matters: fine-tuning vs scratch, paired over the same folds of the shots.
    g = scores["vs_scratch"]
    assert g["strategy"] == "full" and g["folds"] == 3 and len(g["finetuned"]) == len(g["scratch"]) == 3
    assert g["steps"] == target.finetune.steps // 2
    assert g["interval"][0] <= g["gain"] <= g["interval"][1]
    assert g["call"] in ("likely to help", "likely to hurt", "uncertain", "too easy to tell")
    assert scores["verdict"] == gain_verdict(g) and scores["verdict"].startswith("cross-validated")

    # The same through the command line, as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "pipeline", "assess", "--checkpoint", ckpt,
                           str(REPO / "configs" / "demo.yaml"), f"finetune.data.source={tiny_data['digits']}",
                           "finetune.data.shots_per_class=10", "tracking.mode=disabled",
                           "finetune.steps=12"],  # the CLI's path, not the demo's 800-step fits
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pretrained" in proc.stdout and "random" in proc.stdout and "LogME" in proc.stdout
    assert "full vs scratch, held-out fold accuracy" in proc.stdout and "cross-validated" in proc.stdout
