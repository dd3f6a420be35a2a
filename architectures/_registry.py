"""Model registry: names -> factories, and `create_model`.

Configs refer to architectures by registry name (`hybrid_tiny`) or, for a user's own model
outside this package, by import path (`my_pkg.models:my_factory`). Either way the model is
built the same way and stamped with `pretrained_cfg`, so a checkpoint can rebuild it later
with `create_model(cfg["name"], num_classes, in_chans, **cfg["kwargs"])`.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

from ._contract import check_contract

ModelFactory = Callable[..., nn.Module]
FactoryT = TypeVar("FactoryT", bound=ModelFactory)

_MODEL_FACTORIES: dict[str, ModelFactory] = {}


@overload
def register_model(fn: FactoryT, *, name: str | None = None) -> FactoryT: ...
@overload
def register_model(fn: None = None, *, name: str | None = None) -> Callable[[FactoryT], FactoryT]: ...
def register_model(
    fn: FactoryT | None = None, *, name: str | None = None
) -> FactoryT | Callable[[FactoryT], FactoryT]:
    """Register a model factory under `name` (default: the function's name).

    Usable bare (`@register_model`) or with a name (`@register_model(name="x")`). The
    factory must accept `num_classes`, `in_chans` and its own keyword arguments. A name
    registered twice raises, because a silent overwrite would make a config mean a
    different model depending on import order.
    """

    def decorator(factory: FactoryT) -> FactoryT:
        key = name or factory.__name__
        if ":" in key:
            raise ValueError(f"model name {key!r} must not contain ':' (reserved for import paths)")
        if key in _MODEL_FACTORIES:
            previous = _MODEL_FACTORIES[key]
            raise ValueError(
                f"model {key!r} is already registered by {previous.__module__}.{previous.__qualname__}"
            )
        _MODEL_FACTORIES[key] = factory
        return factory

    return decorator(fn) if fn is not None else decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern ("hybrid_*")."""
    names = sorted(_MODEL_FACTORIES)
    return fnmatch.filter(names, pattern) if pattern else names


def is_model(name: str) -> bool:
    """Whether `name` is a registered model or an import path that resolves to a callable.

    Import paths are checked by importing their module.
    """
    if name in _MODEL_FACTORIES:
        return True
    if ":" not in name:
        return False
    try:
        _resolve_import_path(name)
    except ValueError:
        return False
    return True


def _resolve_import_path(path: str) -> ModelFactory:
    """Turn "pkg.module:factory" (the attribute may be dotted, "module:Class.build") into a callable."""
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"model import path {path!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for model {path!r}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"module {module_name!r} has no attribute {attr_path!r} (model {path!r})"
            ) from None
    if not callable(obj):
        raise ValueError(f"{path!r} resolves to a {type(obj).__name__}, which is not callable")
    return obj


def get_model_factory(name: str) -> ModelFactory:
    """The factory for a registry name or an import path; ValueError when neither resolves."""
    if ":" in name:
        return _resolve_import_path(name)
    try:
        return _MODEL_FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())} "
            "(or give an import path 'package.module:factory')"
        ) from None


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a model by registry name or import path and check it follows the contract.

    Sets `model.pretrained_cfg = {"name": name, "kwargs": kwargs}` so checkpoints record
    how to rebuild the architecture (num_classes and in_chans are stored separately); the
    kwargs include the defaults a factory reports in `model.resolved_kwargs`.
    """
    factory = get_model_factory(name)
    model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    check_contract(model)
    # Deep copy: the caller's config objects must not alias what a checkpoint will store.
    # A factory may state the defaults it filled in (`resolved_kwargs`): recorded too, a checkpoint
    # still rebuilds its own model after a default changes.
    recorded = {**getattr(model, "resolved_kwargs", {}), **kwargs}
    model.pretrained_cfg = {"name": name, "kwargs": copy.deepcopy(recorded)}
    return model
