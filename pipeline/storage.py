"""Run storage: a local or NFS path, or an `s3://` / `gs://` URI reached through pyarrow.

Ray Train persists reported checkpoints into `launcher.storage_path`; this module builds the
pyarrow filesystem for it once, on the driver (credentials come from the usual environment of
each process; `AWS_ENDPOINT_URL` points S3 at another server such as MinIO), turns Ray's
filesystem paths back into URIs, fetches a remote checkpoint to a local folder for loading,
and tells whether a path is node-local (which a run on several nodes cannot use).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.checkpoint import COMMIT_MARKER, META_FILE

log = logging.getLogger("transferline.storage")

REMOTE_SCHEMES = ("s3", "gs")
# Filesystems that live on one machine's disks or memory. Anything else (nfs, cifs, lustre,
# gpfs, ceph, fuse mounts of buckets, ...) is taken as possibly shared.
NODE_LOCAL_FSTYPES = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "tmpfs", "ramfs",
    "overlay", "aufs", "squashfs", "vfat", "exfat", "ntfs", "ntfs3", "devtmpfs",
})


def uri_scheme(path: str) -> str:
    """`s3` for `s3://b/k`, `` for a plain path."""
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str | os.PathLike[str]) -> bool:
    return uri_scheme(str(path)) in REMOTE_SCHEMES


def resolve(path: str) -> tuple[pafs.FileSystem | None, str]:
    """`(filesystem, path inside it)` for Ray's `RunConfig(storage_filesystem=, storage_path=)`.

    Local paths give `(None, absolute path)`, so Ray uses its own local filesystem.
    """
    if not is_remote(path):
        return None, str(Path(path.removeprefix("file://")).absolute())
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner.rstrip("/")


def to_uri(fs_path: str, storage_path: str) -> str:
    """A path Ray reports inside the storage filesystem (`bucket/key`) as a URI again."""
    scheme = uri_scheme(storage_path)
    if scheme in REMOTE_SCHEMES and "://" not in fs_path:
        return f"{scheme}://{fs_path}"
    return fs_path


def exists(path: str) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


#: Ray Train's checkpoint manager state in a run's folder: what a relaunch under the same name restores.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def ray_resume_point(run_folder: str) -> tuple[dict, str] | None:
    """`(meta.json, checkpoint URI)` of the checkpoint Ray Train resumes the run in `run_folder`
    (local, `s3://`, `gs://`) from when it is launched again: the newest one its checkpoint manager
    registered. Not the newest folder on disk: a checkpoint persisted but not yet registered when
    the run stopped is not resumed from (a Ctrl-C showed one interval between the two). None when
    nothing is registered (Ray then starts fresh); `ValueError` when the registered one is unreadable."""
    fs, inner = resolve(run_folder)
    fs = fs or pafs.LocalFileSystem()
    try:
        with fs.open_input_stream(f"{inner}/{RAY_SNAPSHOT_FILE}") as f:
            snapshot = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    if "latest_checkpoint_result" not in snapshot:  # another Ray's format: say so rather than guess "fresh"
        raise ValueError(f"Ray's {run_folder}/{RAY_SNAPSHOT_FILE} has no latest_checkpoint_result (written by "
                         f"Ray {snapshot.get('ray_version', '?')}; this one reads Ray 2.x's format)")
    latest = snapshot["latest_checkpoint_result"] or {}
    if not latest.get("checkpoint_dir_name"):
        return None
    where = f"{inner}/{latest['checkpoint_dir_name']}"
    try:
        if fs.get_file_info(f"{where}/{COMMIT_MARKER}").type != pafs.FileType.File:
            raise ValueError("it has no commit marker (a torn save)")
        with fs.open_input_stream(f"{where}/{META_FILE}") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"Ray's run folder {run_folder} resumes from checkpoint {where}, which cannot be "
                         f"read: {e}") from None
    return meta, to_uri(where, run_folder)


_fetched: dict[str, Path] = {}


def fetch_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A local folder holding the checkpoint `path`: itself when local, else a downloaded copy.

    Downloads once per process and URI, into a temporary folder; the commit marker travels
    with the files, so `load_checkpoint` still refuses a torn save.
    """
    path = str(path)
    if not is_remote(path):
        return Path(path)
    if path in _fetched and _fetched[path].is_dir():
        return _fetched[path]
    fs, inner = pafs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    dest = Path(tempfile.mkdtemp(prefix="transferline-fetch-")) / Path(inner).name
    dest.mkdir()
    pafs.copy_files(inner, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    log.info("fetched checkpoint %s -> %s", path, dest)
    _fetched[path] = dest
    return dest


def _unescape_mount(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_fstype(path: str | os.PathLike[str], mounts: str | None = None) -> str:
    """Filesystem type of the mount holding `path` (the nearest existing ancestor counts)."""
    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    # Symlinks resolved in the part that exists; the rest (not made yet) is taken as written.
    target, rest = Path(path).absolute(), []
    while not target.exists() and target != target.parent:
        rest.insert(0, target.name)
        target = target.parent
    target = target.resolve().joinpath(*rest)
    best, fstype = -1, ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = _unescape_mount(parts[1])
        if (target == Path(point) or Path(point) in target.parents) and len(point) > best:
            best, fstype = len(point), parts[2]
    return fstype


def node_local_reason(path: str, mounts: str | None = None) -> str | None:
    """Why `path` cannot be shared between nodes, or None when it may be (object stores, NFS...)."""
    if is_remote(path):
        return None
    fstype = mount_fstype(path.removeprefix("file://"), mounts)
    if fstype in NODE_LOCAL_FSTYPES:
        return f"{path} is on a node-local {fstype} filesystem"
    return None
