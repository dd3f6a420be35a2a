"""Config contract: YAML + overrides, errors that name the full key, saved resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, load_config, save_config, stages_for, to_dict

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["pretrain.steps=200", "finetune.strategy=linear_probe", "launcher.kind=local"])
    assert isinstance(cfg, RunConfig)
    assert cfg.pretrain.steps == 200
    assert cfg.finetune.strategy == "linear_probe"
    assert cfg.output_dir == "runs/demo"  # interpolation resolved
    assert stages_for("run", cfg) == ["pretrain", "finetune", "scratch"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipping_config_validates_for_every_command(path):
    for command in ("run", "pretrain", "finetune"):
        overrides = ["finetune.init_from=ckpt"] if command == "finetune" else []
        cfg = load_config(path, overrides, command=command)
        assert cfg.name == path.stem and cfg.output_dir == f"runs/{path.stem}"
    assert load_config(REPO / "configs" / "simclr.yaml").pretrain.objective == "simclr"


@pytest.mark.parametrize(
    "override, key",
    [
        ("pretrain.stepz=3", "pretrain.stepz"),
        ("pretrain.optim.lr=fast", "pretrain.optim.lr"),
        ("finetune.data.shots_per_class=1.5", "finetune.data.shots_per_class"),
        ("finetune.strategy=freeze_everything", "finetune.strategy"),
        ("pretrain.steps=0", "pretrain.steps"),
        ("launcher.kind=slurm", "launcher.kind"),
        ("finetune.optim.layer_decay=1.5", "finetune.optim.layer_decay"),
        ("finetune.strategy=partial", "finetune.partial_blocks"),
        ("finetune.shrink=0", "finetune.shrink"),
        ("finetune.perturb=1.5", "finetune.perturb"),
        ("finetune.head_lr_scale=0", "finetune.head_lr_scale"),
        ("finetune.seeds=[1,1]", "finetune.seeds"),
        ("engine.precision=fp8", "engine.precision"),
    ],
)
def test_errors_name_the_full_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_missing_required_value_names_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nfinetune:\n  data:\n    source: somewhere\n")
    with pytest.raises(ConfigError, match=r"^pretrain\.data\.urls: required value is missing"):
        load_config(path, [])
    # The same file is fine for a command that does not run stage one.
    cfg = load_config(path, ["finetune.init_from=/ckpt"], command="finetune")
    assert cfg.pretrain.data.urls is None
    assert stages_for("finetune", cfg) == ["finetune", "scratch"]


def test_finetune_command_needs_init_from():
    with pytest.raises(ConfigError, match=r"^finetune\.init_from:"):
        load_config(DEMO, [], command="finetune")


def test_unknown_key_in_yaml_names_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(DEMO.read_text().replace("shots_per_class:", "shot_per_class:"))
    with pytest.raises(ConfigError, match=r"^finetune\.data\.shot_per_class:"):
        load_config(path)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  steps: 3\npretrain:\n  steps: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML.*duplicate key pretrain"):
        load_config(path)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEMO, ["pretrain.steps"])


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("no/such/file.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["pretrain.steps=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["pretrain"]["steps"] == 7
    assert data["output_dir"] == "runs/demo"
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)


def test_every_field_has_a_docstring():
    """Configs are documentation: each dataclass field is followed by a docstring."""
    import ast
    import inspect

    import pipeline.schema._base
    import pipeline.schema.finetune
    import pipeline.schema.pretrain
    import pipeline.schema.run

    schema_modules = (pipeline.schema._base, pipeline.schema.pretrain, pipeline.schema.finetune, pipeline.schema.run)
    nodes = [node for module in schema_modules for node in ast.parse(inspect.getsource(module)).body]
    for node in nodes:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


def test_cli_reports_config_error_and_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(DEMO), "pretrain.optim.lr=abc"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "pretrain.optim.lr:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_override_with_invalid_yaml_value_names_key():
    with pytest.raises(ConfigError, match=r"^pretrain\.steps: the value is not valid YAML"):
        load_config(DEMO, ["pretrain.steps=[1"])


@pytest.mark.parametrize("override, key", [
    ("finetune.data.normalize=corpus", "finetune.data.normalize"),
    ("finetune.data.crop=centre", "finetune.data.crop"),
    ("finetune.data.hflip=2", "finetune.data.hflip"),
    ("finetune.data.jitter=1", "finetune.data.jitter"),
])
def test_stage_two_recipe_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(DEMO, [override])


def test_explicit_statistics_only_with_checkpoint_normalisation():
    with pytest.raises(ConfigError, match=r"^finetune.data.mean: .*normalize: target"):
        load_config(DEMO, ["finetune.data.normalize=target", "finetune.data.mean=[0.5]", "finetune.data.std=[0.2]"])
    cfg = load_config(DEMO, ["finetune.data.mean=[0.5]", "finetune.data.std=[0.2]"])
    assert cfg.finetune.data.normalize == "checkpoint" and cfg.finetune.data.mean == [0.5]
