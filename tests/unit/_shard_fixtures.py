"""Test helpers: tiny webdataset shards (good, corrupt, truncated) and a real HTTP server on 127.0.0.1.

The server serves a directory with Range support (what shard resumption uses) and injects
faults on request: a status for a path (404, 503 n times), a transfer cut after some bytes,
a stall, an HTML page with status 200.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

IMG = 8


def png(value: int, size: int = IMG) -> bytes:
    """A gradient (so crops and flips change it) whose top-left pixel is ``value``."""
    y, x = np.mgrid[:size, :size]
    pixels = (value + 29 * x + 7 * y) % 256
    buf = io.BytesIO()
    Image.fromarray(np.repeat(pixels[..., None], 3, axis=2).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    """One tar of ``samples`` (dicts of ``__key__`` and extension -> bytes), byte-identical for equal input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def good_sample(shard: int, j: int, label: int | None = None) -> dict:
    return {"__key__": f"s{shard:03d}_{j:03d}", "png": png(10 * shard + j),
            "cls": str(shard if label is None else label).encode()}


def write_shards(root: Path, sizes: list[int], *, name: str = "part", index: bool = True,
                 extra: dict | None = None) -> str:
    """Shard i holds sizes[i] good samples labelled i; returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        write_shard(root / f"{name}-{i:03d}.tar", [good_sample(i, j) for j in range(n)])
    if index:
        info = {"num_samples": sum(sizes), "num_classes": len(sizes), "mean": [0.5], "std": [0.25],
                "shards": [{"url": f"{name}-{i:03d}.tar", "num_samples": n} for i, n in enumerate(sizes)]}
        info.update(extra or {})
        (root / "_info.json").write_text(json.dumps(info))
    return str(root / f"{name}-{{000..{len(sizes) - 1:03d}}}.tar")


def truncate(path: Path, keep: int) -> None:
    """Cut a file to ``keep`` bytes (a shard whose upload or download stopped half way)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@dataclass
class Faults:
    """What the server does wrong, by file name."""

    status: dict[str, int] = field(default_factory=dict)          # always answer this status
    status_times: dict[str, list] = field(default_factory=dict)   # [status, n]: answer status n times, then serve
    cut_after: dict[str, list] = field(default_factory=dict)      # [bytes, n]: close the connection after bytes, n times
    stall: set[str] = field(default_factory=set)                  # send headers, then nothing
    html: set[str] = field(default_factory=set)                   # a 200 text/html page instead
    ignore_range: bool = False                                    # answer Range requests with the whole file
    requests: Counter = field(default_factory=Counter)
    ranges: list = field(default_factory=list)


def _handler(root: Path, faults: Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.lstrip("/").split("?")[0]
            faults.requests[name] += 1
            if self.headers.get("Range"):
                faults.ranges.append((name, self.headers["Range"]))
            if name in faults.status:
                return self._error(faults.status[name])
            if name in faults.status_times and faults.status_times[name][1] > 0:
                faults.status_times[name][1] -= 1
                return self._error(faults.status_times[name][0])
            if name in faults.html:
                body = b"<html><body>Please log in</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            path = root / name
            if not path.is_file():
                return self._error(404)
            data = path.read_bytes()
            start, end, status = 0, len(data), 200
            if self.headers.get("Range", "").startswith("bytes=") and not faults.ignore_range:
                lo, _, hi = self.headers["Range"][6:].partition("-")
                start, end, status = int(lo), (int(hi) + 1 if hi else len(data)), 206
                if start >= len(data):
                    return self._error(416)
            body = data[start:end]
            self.send_response(status)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if name in faults.stall:
                time.sleep(30)
                return
            cut = faults.cut_after.get(name)
            if cut and cut[1] > 0:
                cut[1] -= 1
                self.wfile.write(body[: cut[0]])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def _error(self, code: int):
            body = f"error {code}".encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def http_server(root: Path, faults: Faults | None = None):
    """Serve ``root`` on 127.0.0.1; yields ``(base_url, faults)``."""
    faults = faults or Faults()
    old = {k: os.environ.get(k) for k in ("no_proxy", "NO_PROXY")}
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
