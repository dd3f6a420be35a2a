"""Save, find and load checkpoints: one committed folder per step.

Layout of ``<ckpt_root>/step_00000120/``::

    model.safetensors   weights of the unwrapped model (contiguous CPU tensors)
    meta.json           what rebuilds the model (architecture, classes, channels, size, norm) + step
    train_state.pt      optional optimiser / scheduler / RNG state, readable with weights_only=True
    COMMITTED           written last; a folder without it is never loaded

A save is written into a hidden temp folder next to the final one and renamed into place, so
a crash leaves either the previous checkpoint or the new one, never a torn one that looks valid
(torchtitan's commit-marker idea).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.distributed import unwrap_model
from pipeline.stopping import interrupts_deferred

FORMAT_VERSION = 1
COMMIT_MARKER = "COMMITTED"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """Folder name of one step; zero-padded so names sort like steps."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:08d}"


def is_committed(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a step folder whose save finished (its commit marker exists)."""
    return (Path(path) / COMMIT_MARKER).is_file()


def list_checkpoints(ckpt_root: str | os.PathLike[str]) -> list[Path]:
    """Committed step folders under ``ckpt_root``, oldest step first (empty if the root is missing)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_committed(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(ckpt_root: str | os.PathLike[str]) -> Path | None:
    """The committed step folder with the highest step, or None; torn saves are skipped."""
    committed = list_checkpoints(ckpt_root)
    return committed[-1] if committed else None


def model_meta(
    model: nn.Module,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """Everything stage two needs to rebuild ``model``: ``create_model(meta["name"], ..., **meta["kwargs"])``."""
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None)
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} has no pretrained_cfg with a 'name'; "
            "build it with architectures.create_model so its checkpoint can rebuild it"
        )
    return {
        "name": str(cfg["name"]),
        "kwargs": dict(cfg.get("kwargs", {})),
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "img_size": int(img_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


# --- RNG state as plain tensors/lists, so train_state.pt loads with weights_only=True ---


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), NumPy and Python RNG states, as tensors and primitives."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            # uint32 key -> int64 tensor: every value fits, and tensors are weights_only-safe.
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    # Only when CUDA is already in use: querying it would otherwise initialise a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; parts missing from ``state`` are left alone."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["bit_generator"],
                np_state["key"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["gauss"],
            )
        )
    if "python" in state:
        py_state = state["python"]
        random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # A resume on fewer devices restores the ones it has.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


# --- saving ---


def _weights_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict as contiguous CPU tensors; safetensors refuses tensors that share storage (tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in unwrap_model(model).state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen_storages or storage.nbytes() != tensor.nbytes
        seen_storages.add(storage.data_ptr())
        out[name] = tensor.clone() if shared else tensor
    return out


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Refuse at save time what torch.load(weights_only=True) would refuse at resume time."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; only str/int keys are allowed")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; train_state may hold only tensors, primitives, lists and dicts "
        "(use capture_rng_state() for RNG states)"
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames/creations inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_step_dir(
    tmp: Path, step: int, model: nn.Module, meta: Mapping[str, Any], train_state: Mapping[str, Any] | None
) -> None:
    save_file(_weights_for_safetensors(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    _fsync_file(tmp / WEIGHTS_FILE)

    full_meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION}
    try:
        meta_text = json.dumps(full_meta, indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"checkpoint meta for step {step} is not JSON-serialisable: {err}") from err
    with open(tmp / META_FILE, "w", encoding="utf-8") as handle:
        handle.write(meta_text + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    if train_state is not None:
        with open(tmp / TRAIN_STATE_FILE, "wb") as handle:
            torch.save(dict(train_state), handle)
            handle.flush()
            os.fsync(handle.fileno())

    # The marker goes last: its presence means every file above is complete and on disk.
    with open(tmp / COMMIT_MARKER, "w", encoding="utf-8") as handle:
        handle.write(f"step {step}\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)


def _remove_step_dir(path: Path) -> None:
    """Un-commit first, so a deletion cut short never leaves a half folder that still looks valid."""
    (path / COMMIT_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path)


def prune_checkpoints(ckpt_root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest committed steps; returns the deleted folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep everything), got {keep}")
    doomed = list_checkpoints(ckpt_root)[:-keep]
    for path in doomed:
        _remove_step_dir(path)
    return doomed


def save_checkpoint(
    ckpt_root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    meta: Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write and atomically commit ``<ckpt_root>/step_{step:08d}``; returns that folder.

    ``train_state`` (e.g. ``{"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
    "rng": capture_rng_state()}``) must hold only tensors, primitives, lists and dicts. Re-saving an
    existing step replaces it. ``keep`` prunes older committed steps after the commit.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep everything), got {keep}")
    if train_state is not None:
        _check_weights_only_safe(train_state, "train_state")
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name

    with interrupts_deferred():  # a Ctrl-C mid-write lands after the commit
        _commit_step_dir(root, name, step, model, meta, train_state)

    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def _commit_step_dir(
    root: Path, name: str, step: int, model: nn.Module, meta: Mapping[str, Any], train_state: Mapping[str, Any] | None
) -> None:
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        _write_step_dir(tmp, step, model, meta, train_state)
        if final.exists():
            # A directory cannot be os.replace'd over a non-empty one: move the old one aside (a name
            # latest_checkpoint ignores), rename the new one in, then delete the old one.
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=root))
            os.replace(final, old / name)
            os.rename(tmp, final)
            _remove_step_dir(old / name)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- loading ---


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A committed step folder from either a step folder or a checkpoint root (then its latest step)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is a file; give a step folder or a checkpoint root")
    if is_committed(path):
        return path
    if _STEP_DIR.match(path.name) or (path / WEIGHTS_FILE).exists():
        raise ValueError(
            f"checkpoint {path} is not committed (no {COMMIT_MARKER} marker): its save did not finish; "
            "refusing to load it"
        )
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint (step_*/{COMMIT_MARKER}) under {path}")
    return latest


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint (step folder or root)."""
    meta_path = resolve_checkpoint(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint file {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint file {meta_path} is not valid JSON: {err}") from err
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint file {meta_path} has format_version {version!r}; this code reads up to {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a committed checkpoint; ``path`` is a step folder or a root (latest step)."""
    step_dir = resolve_checkpoint(path)
    meta = load_meta(step_dir)
    weights_path = step_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint file {weights_path} is missing")
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint file {weights_path} cannot be read: {err}") from err
    return state_dict, meta


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved optimiser/scheduler/RNG dict, or None when the checkpoint has none (weights-only save)."""
    state_path = resolve_checkpoint(path) / TRAIN_STATE_FILE
    if not state_path.is_file():
        return None
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; name the file either way
        # Not torch's text: it suggests weights_only=False, i.e. running whatever the file holds.
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
        why = (f"it refers to {unsafe.group(1)}, which a safe load never runs" if unsafe
               else f"it is not a plain tensor file ({type(err).__name__}), corrupt or not written by transferline")
        raise ValueError(f"checkpoint file {state_path} cannot be loaded safely: {why}; move its step folder "
                         f"{state_path.parent} away to resume from the checkpoint before it") from None
