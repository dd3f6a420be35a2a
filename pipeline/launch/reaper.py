"""Processes of the private Ray that outlive its shutdown, found and ended (Linux /proc).

`ray.shutdown()` stops the head it started, but a Ray worker can hang at interpreter exit
after its core worker has shut down (seen here: a Train V2 `TrainController` left sleeping
for minutes under PID 1). The launcher notes its Ray worker processes before shutting down
and ends any still running a few seconds later. Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ..., starttime at 19]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """Every process below `root` now."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int, started: str | None = None) -> bool:
    """True while `pid` runs (and, given `started`, is the same process: PIDs get reused); a
    zombie holds nothing, so it counts as gone."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X") and (started is None or fields[19] == started)


def ray_workers(root: int | None = None) -> dict[int, str]:
    """`{pid: start time}` of the Ray worker processes (`ray::...`) below `root` (default: this
    process), loader children forked from them included."""
    found = {}
    for pid in descendants(os.getpid() if root is None else root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = _stat(pid)
        if title.startswith(b"ray::") and fields:
            found[pid] = fields[19]
    return found


def reap(processes: dict[int, str], grace_s: float = 5.0) -> list[int]:
    """Wait up to `grace_s` for `processes` to end, then SIGKILL the rest; returns those killed."""
    deadline = time.monotonic() + grace_s
    while any(alive(p, s) for p, s in processes.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = []
    for pid, started in processes.items():
        if alive(pid, started):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed
