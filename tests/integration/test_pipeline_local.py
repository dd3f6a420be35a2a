"""The whole pipeline on tiny data with the in-process launcher (no Ray)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import is_committed, load_checkpoint, save_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.runner import run_pipeline
from tests.conftest import REPO, tiny_overrides

DEMO = REPO / "configs" / "demo.yaml"


def test_run_local_end_to_end(tiny_data, tmp_path, caplog):
    out = tmp_path / "local_run"
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{"pretrain.monitor_every": 3,
                                                               "pretrain.monitor_queries": 50}))
    summary = run_pipeline(cfg)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    p = on_disk["pretrain"]
    assert p["steps"] == 6 and p["world_size"] == 1
    assert p["samples_seen"] == 6 * 8
    assert p["final_loss"] > 0 and p["samples_per_s"] > 0 and p["wall_s"] > 0
    assert is_committed(p["checkpoint"]) and Path(p["checkpoint"]).name == "step_00000006"
    f, s = on_disk["finetune"], on_disk["scratch"]
    assert f["init_from"] == p["checkpoint"] and f["strategy"] == "full"
    assert f["shots_per_class"] == 2 and f["train_size"] == 20
    assert 0.0 <= f["test_accuracy"] <= 1.0 and 0.0 <= s["test_accuracy"] <= 1.0
    assert len(f["per_seed"]) == 2 and len(s["per_seed"]) == 2
    assert on_disk["transfer_gain"] == pytest.approx(f["test_accuracy"] - s["test_accuracy"])
    assert "summary_line" in on_disk
    # Throughput in FLOPs; no MFU on a CPU (no measured peak).
    assert p["train_flops_per_sample"] > 0 and p["tflops"] > 0 and p["mfu"] is None
    # The downstream monitor ran at step 0, every 3 steps and at the end, on rank 0, and its cost is stated.
    pre_result = json.loads((out / "pretrain" / "result.json").read_text())
    assert [s for s, _ in pre_result["monitor_curve"]] == [0, 3, 6]
    assert all(0.0 <= m["digits"] <= 1.0 for _, m in pre_result["monitor_curve"])
    assert 0.0 < p["monitor_share"]
    # The curve is small: summary.json and the report carry it too.
    assert p["monitor_curve"] == pre_result["monitor_curve"]
    knn_line = next(l for l in (out / "report.md").read_text().splitlines() if "downstream kNN monitor" in l)
    assert "digits" in knn_line and "% at 0" in knn_line and "% at 6" in knn_line
    # Transferability scores sit beside the measured gain.
    a = on_disk["assess"]
    assert a["samples"] == 20 and set(a["pretrained"]) == {"knn", "linear_probe", "logme"}
    assert a["vs_scratch"]["folds"] == 2 and len(a["vs_scratch"]["scratch"]) == 2  # 2 shots: 2 folds
    assert "## Predicted vs measured" in (out / "report.md").read_text()
    assert "full / scratch" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "| finetune |" in report and "| scratch |" in report and "Transfer gain" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()

    # The checkpoint rebuilds the backbone alone; stage two adapted the RGB stem to grayscale.
    state, meta = load_checkpoint(p["checkpoint"])
    assert meta["name"] == "hybrid_tiny" and meta["in_chans"] == 3 and meta["num_classes"] == 10
    assert meta["step"] == 6 and meta["config"]["steps"] == 6
    ft_result = json.loads((out / "finetune" / "result.json").read_text())
    assert ft_result["runs"][0]["adapted_tensors"], "the 3->1 channel stem was not adapted"
    # Evaluations at step 0, 3 and 6.
    assert [s for s, _ in ft_result["runs"][0]["curve"]] == [0, 3, 6]

    # The same run again: every finished stage, assess included, is read back, not redone.
    caplog.set_level(logging.INFO, logger="transferline")
    again = run_pipeline(cfg)
    assert again["assess"] == on_disk["assess"] and again["finetune"] == on_disk["finetune"]
    for label in ("pretrain", "finetune", "scratch", "assess"):
        assert f"== {label}: already finished in this run with this config" in caplog.text


@pytest.mark.parametrize("strategy, extra", [
    ("linear_probe", {}),
    ("head_then_all", {"finetune.head_steps": 2}),
    ("partial", {"finetune.partial_blocks": 2}),
])
def test_finetune_strategies_from_checkpoint(tiny_data, tmp_path, strategy, extra):
    base = tmp_path / "base"
    run_pipeline(load_config(DEMO, tiny_overrides(tiny_data, base, **{"finetune.enabled": "false"})))
    ckpt = base / "pretrain" / "checkpoints" / "step_00000006"
    assert is_committed(ckpt)
    out = tmp_path / strategy
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{
        "finetune.strategy": strategy, "finetune.init_from": str(ckpt), "scratch.enabled": "false",
        "finetune.seeds": "[0]", "finetune.optim.layer_decay": 0.7, **extra,
    }), command="finetune")
    summary = run_pipeline(cfg, "finetune")
    assert summary["finetune"]["strategy"] == strategy
    assert "scratch" not in summary
    run = json.loads((out / "finetune" / "result.json").read_text())["runs"][0]
    pre, _ = load_checkpoint(ckpt)
    tuned, tuned_meta = load_checkpoint(out / "finetune" / "seed_0")
    assert tuned_meta["strategy"] == strategy and tuned_meta["num_classes"] == 10
    from architectures import create_model

    model = create_model(tuned_meta["name"], num_classes=10, in_chans=1, **tuned_meta["kwargs"])
    blocks = model.transfer_blocks()
    stem = model.input_conv_name
    backbone = [k for k in tuned if not k.startswith(model.head_prefix) and k != stem]

    def in_blocks(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    if strategy == "linear_probe":
        # The frozen backbone is bit-identical to stage one's (the stem only channel-adapted).
        assert all(torch.equal(tuned[k], pre[k]) for k in backbone)
        assert torch.equal(tuned[stem], pre[stem].sum(dim=1, keepdim=True))
    else:
        assert any(not torch.equal(tuned[k], pre[k]) for k in backbone)
    if strategy == "partial":
        assert run["reinitialised_tensors"] > 0
        kept = [k for k in backbone if in_blocks(k, blocks[:2])]
        assert kept, "the first two blocks hold parameters"
        assert run["transferred_tensors"] == len(kept) + 1  # + the adapted stem conv


def test_mismatched_checkpoint_refused_before_training(tiny_data, tmp_path):
    """A checkpoint whose weights are not the architecture its meta names (e.g. the model code
    changed between the stages) is refused, naming the layers and shapes."""
    base = tmp_path / "base"
    run_pipeline(load_config(DEMO, tiny_overrides(tiny_data, base, **{"finetune.enabled": "false"})))
    state, meta = load_checkpoint(base / "pretrain" / "checkpoints")
    from architectures import create_model

    other = create_model("resnet_tiny", num_classes=10, in_chans=3)
    bad = save_checkpoint(tmp_path / "bad", 1, other, {**meta})  # resnet weights, hybrid meta
    out = tmp_path / "refused"
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{"finetune.init_from": str(bad)}), command="finetune")
    with pytest.raises(ValueError) as err:
        run_pipeline(cfg, "finetune")
    msg = str(err.value)
    assert "stem" in msg and " vs model " in msg or "missing" in msg
    assert not (out / "finetune").exists(), "nothing may be trained from a refused checkpoint"


def test_cli_refuses_missing_shards_before_ray(tiny_data, tmp_path):
    out = tmp_path / "noshards"
    args = tiny_overrides(tiny_data, out, **{"launcher.kind": "ray", "pretrain.data.urls": str(tmp_path / "x-{0..3}.tar")})
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(DEMO), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("transferline: error: pretrain.data.urls:")
    assert "x-0.tar" in proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stdout.lower()


def test_finetune_refuses_uncommitted_checkpoint(tiny_data, tmp_path):
    torn = tmp_path / "ckpt" / "step_00000005"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"partial")
    cfg = load_config(DEMO, tiny_overrides(tiny_data, tmp_path / "o", **{"finetune.init_from": str(torn)}),
                      command="finetune")
    with pytest.raises(ConfigError, match="^finetune.init_from: .*not committed"):
        run_pipeline(cfg, "finetune")


def test_auto_strategy_and_recipe_cross_validate_then_train_the_choice(tiny_data, tmp_path):
    base = tmp_path / "base"
    run_pipeline(load_config(DEMO, tiny_overrides(tiny_data, base, **{"finetune.enabled": "false"})))
    ckpt = base / "pretrain" / "checkpoints" / "step_00000006"
    out = tmp_path / "auto"
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out, **{
        "finetune.strategy": "auto", "finetune.init_from": str(ckpt), "finetune.data.recipe": "auto",
        "finetune.seeds": "[0]", "finetune.auto.steps": 2, "finetune.auto.layer_decays": "[1.0,0.7]",
        "finetune.assess": "false",
    }), command="finetune")
    summary = run_pipeline(cfg, "finetune")
    f = summary["finetune"]
    assert f["strategy"] == "auto"
    search = f["per_seed"][0]["auto"]
    assert list(search["cv_accuracy"]) == ["full", "full (layer decay 0.7)", "linear_probe", "head_then_all",
                                           "head_then_all (layer decay 0.7)"]
    assert all(0.0 <= a <= 1.0 for a in search["cv_accuracy"].values())
    # `full` stays unless another's fold-paired gain over it clears the 90% interval.
    assert (search["default"], search["confidence"]) == ("full", 0.9)
    cleared = [k for k, (low, _) in search["cv_gain_interval"].items() if low > 0]
    assert search["choice"] == (max(cleared, key=search["cv_accuracy"].get) if cleared else "full")
    # Fold by fold too, so the fold noise between candidates can be read off the summary.
    assert {k: sum(a) / len(a) for k, a in search["cv_fold_accuracy"].items()} == pytest.approx(search["cv_accuracy"])
    # The seed's checkpoint is the chosen strategy trained on all the shots, for the full budget.
    _, meta = load_checkpoint(out / "finetune" / "seed_0")
    assert search["choice"].startswith(meta["strategy"]) and meta["step"] == 6
    report = (out / "report.md").read_text()
    assert "## Strategy chosen by cross-validation" in report and f"| {search['choice']} |" in report
    assert "90% interval of each option's gain over the default (full)" in report
    # The data recipe: each stage picks its own (the scratch baseline with scratch fits).
    for stage in ("finetune", "scratch"):
        recipe = summary[stage]["per_seed"][0]["recipe"]
        assert list(recipe["cv_accuracy"]) == ["checkpoint", "checkpoint+hflip", "image", "image+hflip"]
        cleared = [k for k, (low, _) in recipe["cv_gain_interval"].items() if low > 0]
        assert recipe["choice"] == (max(cleared, key=recipe["cv_accuracy"].get) if cleared else "checkpoint")
        assert f"## Data recipe chosen by cross-validation ({stage})" in report
