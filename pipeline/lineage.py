"""Artifact lineage: which checkpoint is which W&B `model` artifact, and where a stage's input came from.

- Stage one's final checkpoint is a `model` artifact (its files: weights, meta, commit marker);
  stage two records it as its input (name and digest in its config and summary).
- A `wandb:` reference in `finetune.init_from` is resolved on the driver, before any stage:
  downloaded into `<output_dir>/artifacts/` with a note of where it came from.
- The driver checks once that W&B answers when online, so every stage logs offline otherwise.
- The report links every stage's W&B run (`tracking_links`).

Runs themselves (trackers, metrics) are `pipeline.tracking`, which builds on this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.checkpoint import COMMIT_MARKER, META_FILE, WEIGHTS_FILE, load_meta, resolve_checkpoint
from pipeline.schema import ConfigError

if TYPE_CHECKING:
    from pipeline.schema import RunConfig

# The same logger as the runs' side: one name covers every W&B message.
log = logging.getLogger("transferline.tracking")

ARTIFACT_SCHEME = "wandb:"
MODEL_ARTIFACT_TYPE = "model"
# Written next to a checkpoint downloaded from W&B: which artifact version it came from.
ARTIFACT_SOURCE_FILE = "wandb_artifact.json"
# The files of a checkpoint that make up its artifact (train_state.pt is resume-only and large).
CHECKPOINT_ARTIFACT_FILES = (WEIGHTS_FILE, META_FILE, COMMIT_MARKER)


def safe_name(text: str) -> str:
    """A W&B run id / artifact name: letters, digits, `-`, `_`, `.` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def model_artifact_name(run_name: str) -> str:
    return safe_name(f"{run_name}-model")


def is_artifact_ref(value: str | None) -> bool:
    return bool(value) and str(value).startswith(ARTIFACT_SCHEME)


def checkpoint_artifact(step_dir: Path, name: str, meta: dict[str, Any], *, policy: str) -> Any:
    """The `model` artifact of a committed step folder (not logged; its digest is computed)."""
    import wandb

    keep = ("name", "kwargs", "num_classes", "in_chans", "img_size", "mean", "std", "step", "stage", "run")
    art = wandb.Artifact(name, type=MODEL_ARTIFACT_TYPE, metadata={k: meta[k] for k in keep if k in meta})
    for file in CHECKPOINT_ARTIFACT_FILES:
        art.add_file(str(Path(step_dir) / file), name=file, policy=policy)
    return art


def checkpoint_source(path: str | os.PathLike[str], *, run_name: str) -> dict[str, Any]:
    """Name and digest of the `model` artifact a checkpoint folder is (or would be) in W&B.

    The digest is W&B's content digest of the checkpoint's files, so it equals the digest of the
    artifact stage one logged from the same files; a checkpoint downloaded from W&B also carries
    the reference it came from."""
    step_dir = resolve_checkpoint(path)
    meta = load_meta(step_dir)
    origin = {}
    if (step_dir / ARTIFACT_SOURCE_FILE).is_file():
        origin = json.loads((step_dir / ARTIFACT_SOURCE_FILE).read_text())
    name = origin.get("name") or model_artifact_name(str(meta.get("run") or run_name))
    # A downloaded artifact is described by W&B's own digest (its files may lack our marker).
    digest = origin.get("digest") or checkpoint_artifact(step_dir, name, meta, policy="immutable").digest
    return {"name": name, "type": MODEL_ARTIFACT_TYPE, "digest": digest, "ref": origin.get("ref"),
            "version": origin.get("version"), "path": str(step_dir), "step": int(meta["step"])}


def input_checkpoint_source(local_path: str | os.PathLike[str], cfg: "RunConfig") -> dict[str, Any] | None:
    """`checkpoint_source` of stage two's `finetune.init_from` (fetched to `local_path`), or None
    with a warning when it cannot be described: describing the input must not stop training."""
    try:
        source = checkpoint_source(local_path, run_name=cfg.name)
    except Exception as e:
        log.warning("cannot describe finetune.init_from %s as a W&B artifact (%s: %s); stage two runs "
                    "without recording its input", cfg.finetune.init_from, type(e).__name__, e)
        return None
    return {**source, "init_from": cfg.finetune.init_from}


# --- the driver: before any stage ----------------------------------------------------------


def check_online(timeout_s: float) -> str | None:
    """None when W&B accepts our key within `timeout_s`, else why not (one line)."""
    if not os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is not set"
    try:
        import wandb

        wandb.Api(timeout=max(1, int(timeout_s))).viewer  # noqa: B018 - the request is the check
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _qualify(ref: str, cfg: "RunConfig") -> str:
    """`wandb:[entity/][project/]name[:alias]` -> `entity/project/name:alias` (entity optional)."""
    body = ref[len(ARTIFACT_SCHEME):]
    if ":" not in body.rsplit("/", 1)[-1]:
        body += ":latest"
    parts = body.split("/")
    if len(parts) == 1:
        parts = [cfg.tracking.project, *parts]
    if len(parts) == 2 and cfg.tracking.entity:
        parts = [cfg.tracking.entity, *parts]
    return "/".join(parts)


def download_artifact(ref: str, cfg: "RunConfig") -> Path:
    """Download a `wandb:` model artifact into `<output_dir>/artifacts/` (W&B's public API) and
    return it as a checkpoint folder, with `wandb_artifact.json` saying where it came from."""
    import wandb

    qualified = _qualify(ref, cfg)
    art = wandb.Api(timeout=max(1, int(cfg.tracking.timeout_s))).artifact(qualified, type=MODEL_ARTIFACT_TYPE)
    dest = Path(cfg.output_dir) / "artifacts" / safe_name(art.name.replace(":", "-"))
    root = Path(art.download(root=str(dest)))
    if not (root / META_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise ValueError(f"W&B artifact {art.qualified_name} is not a transferline checkpoint "
                         f"(it lacks {WEIGHTS_FILE} or {META_FILE})")
    # W&B verified every file's digest on download: the folder is complete (an artifact logged
    # by another tool may lack our commit marker).
    if not (root / COMMIT_MARKER).is_file():
        (root / COMMIT_MARKER).write_text("downloaded from W&B\n")
    name = art.name.split(":", 1)[0]
    (root / ARTIFACT_SOURCE_FILE).write_text(json.dumps({
        "ref": f"{ARTIFACT_SCHEME}{art.qualified_name}", "requested": ref, "name": name,
        "version": art.version, "digest": art.digest,
    }, indent=2))
    return root


def prepare_tracking(cfg: "RunConfig", stages: list[str]) -> "RunConfig":
    """On the driver, before any stage: online, check once that W&B answers (else one warning and
    every stage logs offline); resolve a `wandb:` `finetune.init_from` to a downloaded folder."""
    t = cfg.tracking
    # In a `run` with stage one, stage two starts from stage one's checkpoint, not init_from.
    needs_init = "finetune" in stages and "pretrain" not in stages
    ref = cfg.finetune.init_from if needs_init and is_artifact_ref(cfg.finetune.init_from) else ""
    if t.mode != "online":
        return cfg  # a `wandb:` init_from needs online mode: validate() refused it already
    t0 = time.perf_counter()
    problem = check_online(t.timeout_s)
    if problem is not None:
        if ref:
            raise ConfigError(f"finetune.init_from: cannot fetch {ref}: W&B is not reachable ({problem})")
        log.warning("W&B online is not available (%s, after %.0f s): every stage logs offline under %s; "
                    "upload later with `wandb sync`", problem, time.perf_counter() - t0,
                    Path(cfg.output_dir) / "wandb")
        return dataclasses.replace(cfg, tracking=dataclasses.replace(t, mode="offline"))
    if ref:
        try:
            local = download_artifact(ref, cfg)
        except Exception as e:
            raise ConfigError(f"finetune.init_from: cannot fetch {ref}: {type(e).__name__}: {e}") from None
        log.info("finetune.init_from %s -> %s", ref, local)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=str(local)))
    return cfg


# --- the report ----------------------------------------------------------------------------


def tracking_links(cfg: "RunConfig", results: dict[str, Any]) -> dict[str, Any] | None:
    """Where each stage's W&B run is (summary.json `tracking`), with the `wandb sync` command
    when any run is offline."""
    runs = {stage: r["tracking"] for stage, r in results.items() if isinstance(r, dict) and r.get("tracking")}
    if not runs:
        return None
    links: dict[str, Any] = {"project": cfg.tracking.project, "group": cfg.name, "runs": runs}
    urls = [r["url"] for r in runs.values() if r.get("url")]
    if urls:
        links["group_url"] = urls[0].split("/runs/")[0] + f"/groups/{cfg.name}"
    if any(r["mode"] == "offline" for r in runs.values()):
        links["sync_command"] = f"wandb sync {Path(cfg.output_dir) / 'wandb'}/offline-run-*"
    return links
