"""Where shard bytes come from: URL schemes, timeouts, bounded retries, the ``pipe:`` policy.

- local paths and ``file:`` URLs: ``open``; seekable.
- ``http(s)://``: urllib with a socket timeout. Transient failures (connection errors, timeouts,
  HTTP 408/425/429/5xx, a body cut short) are retried ``retries`` times with exponential backoff,
  resuming at the byte already read with a ``Range`` request; other HTTP errors are permanent.
  An ``text/html`` answer is refused: it is an error or login page, never a shard.
- ``hf://datasets/ORG/NAME[@REVISION]/PATH`` (and ``hf://ORG/NAME/...`` for model repos): the
  Hub's ``resolve`` URL (``HF_ENDPOINT`` honoured), read like ``https://`` with the token
  ``huggingface_hub`` finds (``HF_TOKEN`` or the login file).
- ``s3://`` (``aws s3 cp URL -``) and ``gs://`` (``gcloud storage cat URL``, else ``gsutil cat``):
  the cloud CLIs, as argument lists (no shell), with the same retries; a CLI that sends nothing
  for ``timeout`` seconds is killed and counted as a failure, so a stalled transfer never hangs.
- ``pipe:CMD``: a shell command. Refused unless ``allow_pipe``: a config must not run commands.

webdataset's ``gopen`` is not used for remote URLs: its curl call retries 30 times, 2 s apart,
without an overall bound, and it opens ``pipe:`` URLs from any config.
"""

from __future__ import annotations

import http.client
import io
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

#: HTTP statuses worth retrying: the server may answer differently a moment later.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Longest pause between two attempts, whatever ``retry_delay`` and the attempt number give.
MAX_BACKOFF_S = 30.0
REMOTE_SCHEMES = ("http", "https", "hf", "s3", "gs", "pipe")


class ShardUnavailable(OSError):
    """A shard (or index) could not be read: the message names the URL and the last error."""


@dataclass(frozen=True)
class OpenOptions:
    """How remote shards are fetched (picklable: it travels to loader workers)."""

    timeout: float = 30.0
    """Seconds without progress (connect or read) before an attempt counts as failed."""
    retries: int = 3
    """Attempts after the first, per shard, for transient failures."""
    retry_delay: float = 1.0
    """Seconds before the first retry; doubled for each further one (capped at 30 s)."""
    allow_pipe: bool = False
    """Open ``pipe:CMD`` URLs (runs CMD in a shell)."""

    def backoff(self, attempt: int) -> float:
        return min(self.retry_delay * (2**attempt), MAX_BACKOFF_S)


def scheme(url: str) -> str:
    """URL scheme, ``""`` for a plain path (a Windows drive letter is a path too)."""
    s = urlparse(url).scheme
    return "" if len(s) == 1 else s


def is_local(url: str) -> bool:
    """True for plain paths and ``file:`` URLs."""
    return scheme(url) in ("", "file")


def local_path(url: str) -> str:
    """Filesystem path of a local shard URL."""
    parsed = urlparse(url)
    return url2pathname(parsed.path) if scheme(url) == "file" else url


def _cloud_cli(s: str) -> list[str] | None:
    """Command prefix that streams an object of scheme ``s`` to stdout, or None if no CLI is installed."""
    if s == "s3":
        return ["aws", "s3", "cp"] if shutil.which("aws") else None
    if shutil.which("gcloud"):
        return ["gcloud", "storage", "cat"]
    return ["gsutil", "cat"] if shutil.which("gsutil") else None


def check_url(url: str, *, allow_pipe: bool = False) -> None:
    """Refuse, before anything starts, a URL this module cannot or must not open.

    Raises ``ValueError`` for ``pipe:`` without ``allow_pipe``, an unknown scheme, or an ``s3://``
    / ``gs://`` URL without its CLI on PATH.
    """
    s = scheme(url)
    if s in ("", "file", "http", "https", "hf"):
        return
    if s == "pipe":
        if not allow_pipe:
            raise ValueError(
                f"{url!r}: pipe: URLs run shell commands and are refused; set pretrain.data.allow_pipe=true "
                "if this config is trusted"
            )
        return
    if s in ("s3", "gs"):
        if _cloud_cli(s) is None:
            need = "the AWS CLI (aws)" if s == "s3" else "the Google Cloud CLI (gcloud or gsutil)"
            raise ValueError(f"{url!r}: reading {s}:// shards needs {need} on PATH")
        return
    raise ValueError(f"{url!r}: unsupported URL scheme {s!r} (local paths, file:, http(s)://, hf://, s3://, gs://)")


def resolve_hf(url: str) -> tuple[str, dict[str, str]]:
    """``hf://`` URL -> (https URL on the Hub, request headers with the token when there is one)."""
    from huggingface_hub import get_token, hf_hub_url

    parts = url[len("hf://"):].split("/")
    repo_type = None
    if parts[0] in ("datasets", "spaces", "models"):
        repo_type = {"datasets": "dataset", "spaces": "space", "models": None}[parts[0]]
        parts = parts[1:]
    if len(parts) < 3:
        raise ValueError(f"{url!r}: hf:// URLs look like hf://datasets/ORG/NAME[@REVISION]/PATH")
    name, _, revision = parts[1].partition("@")
    https = hf_hub_url(
        f"{parts[0]}/{name}", "/".join(parts[2:]), repo_type=repo_type, revision=unquote(revision) or None,
        endpoint=os.environ.get("HF_ENDPOINT") or None,
    )
    token = get_token()
    return https, ({"Authorization": f"Bearer {token}"} if token else {})


# --------------------------------------------------------------------------- http(s)


class _HTTPStream(io.RawIOBase):
    """A GET that survives transient failures by resuming with Range requests."""

    def __init__(self, url: str, opts: OpenOptions, *, start: int, end: int | None, headers: dict[str, str],
                 shown: str) -> None:
        super().__init__()
        self.url, self.opts, self.headers, self.shown = url, opts, headers, shown
        self.pos, self.end = start, end
        self.retries_used = 0
        self._resp: http.client.HTTPResponse | None = None
        self._expected_end: int | None = None
        self._connect()

    def _fail(self, why: str) -> ShardUnavailable:
        return ShardUnavailable(f"{self.shown}: {why} (after {self.retries_used + 1} attempt(s))")

    def _request(self) -> http.client.HTTPResponse:
        headers = dict(self.headers)
        if self.pos or self.end is not None:
            last = "" if self.end is None else str(self.end - 1)
            headers["Range"] = f"bytes={self.pos}-{last}"
        resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.opts.timeout)
        ctype = resp.headers.get("Content-Type", "") or ""
        if ctype.split(";")[0].strip().lower() == "text/html":
            resp.close()
            raise _Permanent(f"HTTP {resp.status} answered with text/html: an error or login page, not a shard")
        body_start = self.pos
        if "Range" in headers and resp.status != 206:
            # The server ignored the Range header: skip what was already read.
            _discard(resp, self.pos)
            body_start = 0
        # http.client ends a body cut before its Content-Length with a quiet EOF: know where it must end.
        length = resp.headers.get("Content-Length")
        self._expected_end = body_start + int(length) if length and length.isdigit() else None
        return resp

    def _connect(self) -> None:
        while True:
            try:
                self._resp = self._request()
                return
            except _Permanent as exc:
                raise self._fail(str(exc)) from None
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 416 and self.pos > 0:
                    self._resp = None  # asked to start at (or past) the end: nothing is left to read
                    return
                if exc.code not in TRANSIENT_HTTP:
                    raise self._fail(f"HTTP {exc.code} {exc.reason}") from None
                self._retry_or_raise(f"HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", None) or exc
                self._retry_or_raise(f"{type(exc).__name__}: {reason}")

    def _retry_or_raise(self, why: str) -> None:
        if self.retries_used >= self.opts.retries:
            raise self._fail(why)
        time.sleep(self.opts.backoff(self.retries_used))
        self.retries_used += 1

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while True:
            if self._resp is None:
                return 0
            try:
                n = self._resp.readinto(buffer)
                if not n and len(buffer) and self._expected_end is not None and self.pos < self._expected_end:
                    raise http.client.IncompleteRead(b"", self._expected_end - self.pos)
            except (OSError, http.client.HTTPException) as exc:
                self._resp.close()
                self._retry_or_raise(f"transfer cut at byte {self.pos}: {type(exc).__name__}: {exc}")
                self._connect()
                continue
            self.pos += n
            return n

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        super().close()


class _Permanent(Exception):
    pass


def _discard(stream, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise _Permanent(f"stream ended {n} bytes before the requested offset")
        n -= len(chunk)


# --------------------------------------------------------------------------- commands (cloud CLIs, pipe:)


class _CommandStream(io.RawIOBase):
    """stdout of a command, with a read timeout; restarted (skipping what was read) on failure."""

    def __init__(self, argv: list[str] | str, opts: OpenOptions, *, start: int, shown: str) -> None:
        super().__init__()
        self.argv, self.opts, self.shown = argv, opts, shown
        self.pos = 0
        self.retries_used = 0
        self._proc: subprocess.Popen | None = None
        self._stderr: BinaryIO | None = None
        self._start()
        if start:
            self._skip(start)

    def _skip(self, n: int) -> None:
        try:
            _discard(self, n)
        except _Permanent as exc:
            self._stop()
            raise ShardUnavailable(f"{self.shown}: {exc}") from None

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            shell=isinstance(self.argv, str), start_new_session=True,
        )

    def _stop(self) -> str:
        """Kill the command if it runs; return the tail of what it wrote to stderr."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-400:].decode("utf-8", "replace").strip()
            self._stderr.close()
            self._stderr = None
        return tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            fd = proc.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], self.opts.timeout)
            if ready:
                data = os.read(fd, len(buffer))
                if data:
                    buffer[: len(data)] = data
                    self.pos += len(data)
                    return len(data)
                code = proc.wait()
                if code == 0:
                    return 0
                why = f"command exited with status {code}"
            else:
                why = f"no data for {self.opts.timeout:g} s"
            tail = self._stop()
            why += f": {tail}" if tail else ""
            if self.retries_used >= self.opts.retries:
                raise ShardUnavailable(f"{self.shown}: {why} (after {self.retries_used + 1} attempt(s))")
            time.sleep(self.opts.backoff(self.retries_used))
            self.retries_used += 1
            done, self.pos = self.pos, 0
            self._start()
            self._skip(done)

    def close(self) -> None:
        if not self.closed:
            self._stop()
        super().close()


# --------------------------------------------------------------------------- entry points


def open_shard(url: str, opts: OpenOptions, start: int = 0, end: int | None = None) -> BinaryIO:
    """A buffered binary stream of ``url`` from byte ``start`` (to ``end``, exclusive, when given).

    Raises ``ShardUnavailable`` naming the URL when it cannot be opened after the retries
    (reads from the returned stream raise it too), ``ValueError`` for refused URLs.
    """
    check_url(url, allow_pipe=opts.allow_pipe)
    s = scheme(url)
    if s in ("", "file"):
        path = local_path(url)
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise ShardUnavailable(f"{url}: {exc.strerror or exc}") from None
        handle.seek(start)
        return handle if end is None else io.BufferedReader(_Limited(handle, end - start))
    if s in ("http", "https", "hf"):
        target, headers = resolve_hf(url) if s == "hf" else (url, {})
        raw: io.RawIOBase = _HTTPStream(target, opts, start=start, end=end, headers=headers, shown=url)
    elif s == "pipe":
        raw = _CommandStream(url[len("pipe:"):], opts, start=start, shown=url)
    else:
        cli = _cloud_cli(s)
        assert cli is not None  # check_url refused it otherwise
        raw = _CommandStream([*cli, url, *(["-"] if s == "s3" else [])], opts, start=start, shown=url)
    if end is not None:
        raw = _Limited(raw, end - start)  # also when a server answered a Range request with the whole body
    return io.BufferedReader(raw, buffer_size=1 << 16)


class _Limited(io.RawIOBase):
    """At most ``limit`` bytes of another stream."""

    def __init__(self, inner, limit: int) -> None:
        super().__init__()
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self.left)]
        n = self.inner.readinto(view)
        self.left -= n or 0
        return n or 0

    def close(self) -> None:
        self.inner.close()
        super().close()


def read_range(url: str, start: int, end: int, opts: OpenOptions) -> bytes:
    """Bytes ``[start, end)`` of ``url`` (a seek, a Range request, or a skip for command streams)."""
    with open_shard(url, opts, start=start, end=end) as stream:
        data = stream.read()
    if len(data) != end - start:
        raise ShardUnavailable(f"{url}: wanted bytes {start}..{end}, the source holds only {start + len(data)}")
    return data


def read_small(url: str, opts: OpenOptions) -> bytes | None:
    """A small file (an index) in full; None when it does not exist (local file missing, HTTP 404/403/410).

    Errors other than "not there" raise ``ShardUnavailable`` naming the URL. For ``s3://``,
    ``gs://`` and ``pipe:`` a failing command also means "not there": their CLIs do not tell a
    missing object from other errors in a way worth parsing.
    """
    s = scheme(url)
    if s in ("", "file"):
        path = local_path(url)
        return open(path, "rb").read() if os.path.isfile(path) else None
    if s in ("http", "https", "hf"):
        target, headers = resolve_hf(url) if s == "hf" else (url, {})
        try:
            with urllib.request.urlopen(urllib.request.Request(target, headers=headers), timeout=opts.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (403, 404, 410):
                return None
            raise ShardUnavailable(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise ShardUnavailable(f"{url}: {getattr(exc, 'reason', None) or exc}") from None
    try:
        with open_shard(url, OpenOptions(timeout=opts.timeout, retries=0, allow_pipe=opts.allow_pipe)) as stream:
            return stream.read()
    except (ShardUnavailable, ValueError):
        return None
