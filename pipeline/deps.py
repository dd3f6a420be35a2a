"""Is this Python able to run transferline? Checked first, with the standard library only.

A Ray job runs on the cluster's own Python: without transferline's dependencies it would die
on an import deep in the CLI with a bare `ModuleNotFoundError`. One line instead says which
are missing and what to do.
"""

from __future__ import annotations

import importlib.util
import sys

#: Import names of the dependencies every command needs (Ray only for the Ray launcher and jobs).
REQUIRED = ("torch", "torchvision", "numpy", "PIL", "omegaconf", "webdataset", "datasets", "safetensors",
            "wandb", "matplotlib", "sklearn", "tqdm")


def missing_dependencies(modules: tuple[str, ...] = REQUIRED) -> list[str]:
    gone = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked as sys.modules[name] = None
            found = False
        if not found:
            gone.append(name)
    return gone


def missing_message(gone: list[str]) -> str:
    return (f"this Python ({sys.executable}) lacks {', '.join(gone)}: install transferline's dependencies "
            "(`pip install -e .` in the project); for a Ray job, submit with --pip or run the cluster on an "
            "image that has them (cluster/README.md)")
