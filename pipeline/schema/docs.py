"""A resolved config as YAML with each key's docstring above it (`transferline config`).

The docstrings are the schema's own (the string literal after each dataclass field), read from
the source, so the printed help cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any

import yaml


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """`{field: docstring}` of a dataclass (fields without one are left out)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def commented_yaml(cfg: Any, indent: int = 0) -> str:
    """YAML of dataclass `cfg` (a resolved `RunConfig`), every key preceded by its docstring."""
    pad, lines = "  " * indent, []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for line in docs.get(f.name, "").splitlines():
            lines.append(f"{pad}# {line}".rstrip())
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(commented_yaml(value, indent + 1))
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            lines.append(f"{pad}{f.name}:")
            for item in value:
                body = commented_yaml(item, indent + 2).splitlines()
                first = next(i for i, line in enumerate(body) if not line.lstrip().startswith("#"))
                body[first] = f"{pad}  - {body[first].lstrip()}"
                lines.extend(body)
        else:
            lines.append(f"{pad}{f.name}: {_scalar(value)}")
    return "\n".join(lines)
