"""Read what wandb (0.31) wrote for an offline run: `<run dir>/run-<id>.wandb`.

wandb ships no Python reader for these files. The format: a 7-byte header — `:W&B`, the
little-endian uint16 magic 0xBEE1 and a version byte (0) — then a LevelDB-style log of 32 KiB
blocks. Each block holds records with a 7-byte header: crc32 (zlib's, seeded with the crc of
the type byte, as LevelDB does), little-endian uint16 length, and a type byte (1 full,
2 first, 3 middle, 4 last); a block tail shorter than a header is zero padding. The record
payloads are `wandb.proto.wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    pass


def read_payloads(path: str | Path) -> list[bytes]:
    """The raw record payloads of a `.wandb` file, checksums verified."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise WandbFileError(f"{path}: shorter than the file header")
    ident, magic, version = HEADER.unpack_from(data)
    if ident != IDENT or magic != MAGIC or version != VERSION:
        raise WandbFileError(f"{path}: not a wandb v0 log (header {data[:HEADER.size]!r})")
    payloads: list[bytes] = []
    pending: bytes | None = None
    pos = HEADER.size
    while pos < len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < RECORD_HEADER.size:
            pos += left  # block trailer
            continue
        if pos + RECORD_HEADER.size > len(data):
            raise WandbFileError(f"{path}: truncated record header at byte {pos}")
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:
            pos += left  # zero padding up to the next block
            continue
        start = pos + RECORD_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) != length:
            raise WandbFileError(f"{path}: truncated record at byte {pos}")
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"{path}: checksum mismatch at byte {pos}")
        pos = start + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE and pending is not None:
            pending += chunk
        elif kind == LAST and pending is not None:
            payloads.append(pending + chunk)
            pending = None
        else:
            raise WandbFileError(f"{path}: record type {kind} out of order at byte {pos}")
    return payloads


def read_records(path: str | Path) -> list[pb.Record]:
    records = []
    for payload in read_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _manifest(record: pb.ArtifactRecord) -> dict[str, dict[str, Any]]:
    entries = {e.path: {"digest": e.digest, "size": e.size} for e in record.manifest.contents}
    if not entries and record.manifest.manifest_file_path:
        raw = json.loads(Path(record.manifest.manifest_file_path).read_text())
        entries = {p: {"digest": e.get("digest"), "size": e.get("size")} for p, e in raw.get("contents", {}).items()}
    return entries


@dataclass
class OfflineRun:
    """One offline run as wandb recorded it."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    used_artifacts: list[dict[str, Any]] = field(default_factory=list)
    exited: bool = False

    def series(self, key: str, x: str = "_step") -> list[tuple[Any, Any]]:
        """`(x, value)` for every history row that has `key`."""
        return [(row.get(x), row[key]) for row in self.history if key in row]


def read_run(run_dir_or_file: str | Path) -> OfflineRun:
    """Config, summary, history, metric definitions and artifacts of one offline run."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if len(files) != 1:
            raise WandbFileError(f"{path}: expected one run-*.wandb file, found {files}")
        path = files[0]
    run = OfflineRun(path=path)
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group = r.run_id, r.project, r.run_group
            run.job_type, run.name = r.job_type, r.display_name
            for item in r.config.update:
                _set(run.config, _key(item), json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, _key(item), json.loads(item.value_json))
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, _key(item), json.loads(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                row["/".join(_key(item))] = json.loads(item.value_json)
            if record.history.step.num:
                row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "metric":
            m = record.metric
            run.metrics.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({
                "type": a.type, "name": a.name, "digest": a.digest, "aliases": list(a.aliases),
                "metadata": json.loads(a.metadata) if a.metadata else {}, "files": _manifest(a),
            })
        elif kind == "use_artifact":
            u = record.use_artifact
            run.used_artifacts.append({"id": u.id, "type": u.type, "name": u.name})
        elif kind == "exit":
            run.exited = True
    if not run.run_id:
        raise WandbFileError(f"{path}: no run record ({path.stat().st_size} bytes): wandb did not finish writing it")
    return run


def offline_runs(wandb_dir: str | Path) -> list[OfflineRun]:
    """Every offline run under a `wandb` directory, oldest first."""
    return [read_run(d) for d in sorted(Path(wandb_dir).glob("offline-run-*"))]


def runs_by_job_type(wandb_dir: str | Path) -> dict[str, list[OfflineRun]]:
    found: dict[str, list[OfflineRun]] = {}
    for run in offline_runs(wandb_dir):
        found.setdefault(run.job_type, []).append(run)
    return found
