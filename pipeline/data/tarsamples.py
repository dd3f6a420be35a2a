"""webdataset tar shards -> raw samples, each with its byte range, and an honest end status.

Members are grouped into samples as webdataset does: the key is the member name up to the first
dot of its base name, the extension (lower-cased) the rest; a sample is complete once the next
key starts or the archive ends. Python's ``tarfile`` reads the archive in stream mode; a
``TarInfo`` subclass records *how* the member list ended, because ``tarfile`` treats a missing,
truncated or garbled header after the first one as a quiet end of the archive:

- an all-zero block (the end-of-archive marker): the shard is ``complete``;
- no bytes, half a header or a bad checksum where a header should be: ``partial``; every sample
  read is passed on (a sample that lost a member to the cut fails its decode as a missing image
  or label, and is counted there);
- a read error inside a member: ``partial``; the sample being assembled is dropped
  (``incomplete``), so nothing half-built leaks into the next shard;
- nothing readable at all (not a tar, an empty file): ``failed``.

Each sample records ``(slot, index, start, end)``: where it lives, so a resumed stream can fetch
exactly the samples its shuffle buffer held (``read_samples``) and continue a shard at a byte
offset instead of re-reading it. Compressed tars have no useful byte offsets; their samples are
found again by index.
"""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from pipeline.data.sources import OpenOptions, ShardUnavailable, open_shard, read_range

RawSample = dict[str, Any]
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
COMPLETE, PARTIAL, FAILED = "complete", "partial", "failed"


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile which header error ended the member list."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar._end_error = exc  # type: ignore[attr-defined]
            raise


def split_name(name: str) -> tuple[str | None, str]:
    """``dir/abc.seg.jpg`` -> ``("dir/abc", "seg.jpg")``; ``(None, "")`` when the name has no extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__")


def _block_end(info: tarfile.TarInfo) -> int:
    return info.offset_data + ((info.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class TarSamples:
    """The samples of one shard stream; after iteration, ``status``, ``error`` and ``incomplete`` say how it ended.

    Args:
        stream: the shard's bytes from ``base_offset`` on (``sources.open_shard``).
        url, slot: recorded in every sample (``__url__``, ``__ref__``).
        first_index: index of the first sample in the stream (non-zero when continuing a shard).
        base_offset: byte offset of ``stream`` in the shard.
    """

    def __init__(self, stream: BinaryIO, *, url: str, slot: int, first_index: int = 0, base_offset: int = 0) -> None:
        self.stream, self.url, self.slot = stream, url, slot
        self.first_index, self.base_offset = first_index, base_offset
        self.status: str | None = None
        self.error = ""
        self.incomplete = 0
        self.yielded = 0
        self.addressable = True
        self.unavailable = False  # ended by a network/command failure after its retries

    def _ended(self, status: str, error: str = "") -> None:
        self.status, self.error = status, error

    def __iter__(self) -> Iterator[RawSample]:
        try:
            tar = tarfile.open(fileobj=self.stream, mode="r|*", tarinfo=_EndAwareTarInfo)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            self.unavailable = isinstance(exc, ShardUnavailable)
            late = self.first_index > 0
            self._ended(PARTIAL if late else FAILED, f"{'unreadable' if late else 'not a readable tar'}: {exc}")
            return
        self.addressable = getattr(tar.fileobj, "comptype", "tar") == "tar"
        current: RawSample | None = None
        start = end = 0
        index = self.first_index
        try:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_name(info.name)
                if key is None or _is_meta(info.name):
                    continue
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if current is not None and key != current["__key__"]:
                    yield self._finish(current, index, start, end)
                    index += 1
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": self.url}
                    start = info.offset
                if ext in current:
                    current["__error__"] = f"duplicate member {info.name!r}"
                current[ext] = data
                end = _block_end(info)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            self.unavailable = isinstance(exc, ShardUnavailable)
            if current is not None:
                self.incomplete = 1
            late = self.yielded or current is not None or self.first_index
            self._ended(PARTIAL if late else FAILED, f"{type(exc).__name__}: {exc}")
            return
        # The member list ended at a member boundary. Its last group holds whole members only: a
        # member cut off with the rest shows up as a missing image or label when it is decoded.
        if current is not None:
            yield self._finish(current, index, start, end)
        ended = getattr(tar, "_end_error", None)
        if isinstance(ended, tarfile.EOFHeaderError):
            self._ended(COMPLETE)
        elif not self.yielded and not self.first_index:
            self._ended(FAILED, f"not a readable tar: {ended}")
        else:
            what = "ends without the end-of-archive marker" if isinstance(ended, tarfile.EmptyHeaderError) else ended
            self._ended(PARTIAL, f"truncated: {what}")

    def _finish(self, sample: RawSample, index: int, start: int, end: int) -> RawSample:
        if self.addressable:
            ref = (self.slot, index, self.base_offset + start, self.base_offset + end)
        else:
            ref = (self.slot, index, -1, -1)
        sample["__ref__"] = ref
        self.yielded += 1
        return sample


def _parse_one(data: bytes, *, url: str, ref: tuple[int, int, int, int]) -> RawSample:
    """The single sample stored in ``data`` (the byte range of one sample, cut out of a shard)."""
    sample: RawSample = {"__url__": url, "__ref__": ref}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for info in tar:
                key, ext = split_name(info.name)
                if not info.isreg() or key is None or _is_meta(info.name):
                    continue
                if sample.setdefault("__key__", key) != key:
                    raise tarfile.ReadError(f"members of two samples ({sample['__key__']}, {key})")
                if ext in sample:
                    sample["__error__"] = f"duplicate member {info.name!r}"
                sample[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except tarfile.TarError as exc:
        raise ShardUnavailable(f"{url}: bytes {ref[2]}..{ref[3]} are not one sample (did the shard change?): {exc}")
    if "__key__" not in sample:
        raise ShardUnavailable(f"{url}: bytes {ref[2]}..{ref[3]} hold no sample (did the shard change?)")
    return sample


def read_samples(url: str, refs: Iterable[tuple[int, int, int, int]], opts: OpenOptions) -> dict[int, RawSample]:
    """Samples of one shard by reference, keyed by sample index.

    Byte-addressed references are fetched as ranges (nearby ones in one request); the others
    by reading the shard from the start up to the last index wanted.
    """
    refs = sorted(set(refs), key=lambda r: r[1])
    out: dict[int, RawSample] = {}
    ranged = [r for r in refs if r[2] >= 0]
    by_index = {r[1]: r for r in refs if r[2] < 0}
    # Coalesce ranges less than 256 KiB apart into one read.
    groups: list[list[tuple[int, int, int, int]]] = []
    for ref in sorted(ranged, key=lambda r: r[2]):
        if groups and ref[2] - groups[-1][-1][3] < (256 << 10):
            groups[-1].append(ref)
        else:
            groups.append([ref])
    for group in groups:
        lo, hi = group[0][2], max(r[3] for r in group)
        blob = read_range(url, lo, hi, opts)
        for ref in group:
            out[ref[1]] = _parse_one(blob[ref[2] - lo: ref[3] - lo], url=url, ref=ref)
    if by_index:
        last = max(by_index)
        with open_shard(url, opts) as stream:
            for sample in TarSamples(stream, url=url, slot=next(iter(by_index.values()))[0]):
                index = sample["__ref__"][1]
                if index in by_index:
                    sample["__ref__"] = by_index[index]
                    out[index] = sample
                if index >= last:
                    break
    return out
