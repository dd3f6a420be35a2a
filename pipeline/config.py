"""Loading the typed run configuration: YAML + dotlist overrides, `???` handling, saving.

The only module that imports omegaconf. The schema (dataclasses and their checks) is
`pipeline.schema`; its names are re-exported here, so `from pipeline.config import RunConfig`
keeps working. Every error is a `ConfigError` whose message starts with the full key and is
raised before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.fileio import write_text_atomic
from pipeline.schema import (  # noqa: F401 (re-exported: the schema's public names)
    STORAGE_SCHEMES,
    STRATEGIES,
    AutoConfig,
    ConfigError,
    EngineConfig,
    FailureConfig,
    FinetuneConfig,
    LauncherConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    ScratchConfig,
    ShardDataConfig,
    ShardSourceConfig,
    TargetConfig,
    TargetDataConfig,
    TrackingConfig,
    stages_for,
    target_name,
)


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "<root>"
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{key}: {msg} (in {source})")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, command: str = "run"
) -> RunConfig:
    """YAML file + dotlist overrides -> validated `RunConfig` for `command` (run|pretrain|finetune)."""
    cfg = _schema()
    if path is not None:
        cfg = _merge_file(cfg, Path(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value (got {item!r})")
        try:
            cfg = _apply_override(cfg, item)
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override {item!r}") from None
        except yaml.YAMLError as e:  # the value is parsed as YAML: unbalanced brackets, stray braces
            first = " ".join(str(e).split())
            raise ConfigError(f"{item.split('=', 1)[0]}: the value is not valid YAML ({first}); "
                              "quote values with braces, e.g. 'key=\"a-{0..3}.tar\"'") from None
    return _finalise(cfg, command)


def _merge_file(cfg: DictConfig, path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"<config>: file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come from the yaml parser, not omegaconf
        first = " ".join(str(e).split())
        raise ConfigError(f"<config>: {path} is not valid YAML: {first}") from None
    if not OmegaConf.is_dict(loaded):
        what = "a list" if OmegaConf.is_list(loaded) else type(loaded).__name__
        raise ConfigError(f"<config>: {path} holds {what} at the top level; a config is a mapping of keys "
                          "(name:, pretrain:, finetune:, ...), see configs/demo.yaml")
    try:
        return OmegaConf.merge(cfg, loaded)
    except OmegaConfBaseException as e:
        raise _wrap(e, str(path)) from None


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """`key=value` merged into `cfg`; a key through a list (`finetune.targets.1.data.shots_per_class`)
    is set in place, as a dotlist merge cannot index lists."""
    key, value = item.split("=", 1)
    node = OmegaConf.select(cfg, key.rsplit(".", 1)[0], throw_on_missing=False) if "." in key else None
    parts = key.split(".")
    through_list = any(p.isdigit() for p in parts[:-1]) or (node is not None and OmegaConf.is_list(node))
    if not through_list:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
    OmegaConf.update(cfg, key, parsed, merge=True)
    return cfg


def config_from_dict(data: dict[str, Any], *, command: str = "run") -> RunConfig:
    """Rebuild a validated config from `to_dict` output (how configs travel to Ray workers)."""
    try:
        cfg = OmegaConf.merge(_schema(), OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise _wrap(e, "dict") from None
    return _finalise(cfg, command)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, resolved dict of a config (JSON/YAML-serialisable)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: RunConfig | Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, with any secret that slipped into it redacted
    (secrets belong in the environment; workers get the live config, not this file)."""
    from pipeline.redact import redact_secrets

    return write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(redact_secrets(to_dict(cfg)))))


def _finalise(cfg: DictConfig, command: str) -> RunConfig:
    if command not in ("run", "pretrain", "finetune"):
        raise ConfigError(f"<command>: unknown command {command!r}")
    # `???` values are required only for the stages this command runs.
    pretrain_on = command == "pretrain" or (command == "run" and cfg.pretrain.enabled)
    finetune_on = command == "finetune" or (command == "run" and cfg.finetune.enabled)
    needed = {"pretrain.": pretrain_on, "finetune.": finetune_on}
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if key == "pretrain.data.urls" and cfg.pretrain.data.sources:  # the weighted sources replace it
            OmegaConf.update(cfg, key, None, merge=False)
        elif key == "finetune.data.source" and cfg.finetune.targets:  # a suite replaces finetune.data
            OmegaConf.update(cfg, key, None, merge=False)
        elif any(key.startswith(p) and not on for p, on in needed.items()):
            OmegaConf.update(cfg, key, None, merge=False)
        else:
            raise ConfigError(f"{key}: required value is missing (`???`); set it in the YAML or as {key}=...")
    try:
        obj: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _wrap(e, "config") from None
    obj.validate(command)
    return obj


def replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace re-exported so callers need not import dataclasses for configs."""
    return dataclasses.replace(obj, **changes)
