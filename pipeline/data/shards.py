"""Stage-one stream: webdataset shards -> exactly ``steps`` equal batches on every rank, resumable.

The stream follows OpenCLIP's ``get_wds_dataset`` idea, written for what we need at scale:

    sources (brace-expanded URLs, weights) -> per source: per-epoch seeded shard order, the same
    on every rank, split by rank and loader worker (or, resampled: shards drawn with
    replacement) -> tar -> raw samples (``tarsamples``) -> weighted mix of the sources ->
    sample shuffle buffer -> decode (PIL) + transform, bad samples skipped and counted ->
    batches -> DataLoader -> ``ShardStream`` (exactly ``steps`` batches; positions kept)

Every worker's stream is endless, so every rank yields exactly ``steps`` full batches however
uneven its shards are and DDP never waits on a rank that ran dry.

Bad data is expected in a crawl and costs no sleep: an undecodable image, an HTML page saved as
``.jpg``, a missing or non-integer label, a duplicate member is skipped and counted; a
truncated shard gives its good samples and counts as partial; an unreachable shard is retried
(``sources``) and then skipped and counted, or stops the run naming the URL
(``shard_errors="raise"``). A *configuration* error is not bad data: when the first 64 samples a
worker reads are all unusable, it stops with the reasons (wrong ``image_key``, ``label_key``,
``num_classes``); ``probe_stream`` finds the same on the driver before anything starts.

Exact resume: each batch carries its worker's position (``position``); ``ShardStream`` keeps
the latest per worker and hands it to the checkpoint; a stream built from it continues with the
very samples (and augmentations) an uninterrupted run would have seen. DataLoader workers take
batches in turn, so a resumed loader rotates worker roles to continue the turn order too.
Stages are module-level classes and functions, so spawn/forkserver workers can pickle them.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import position as pos
from pipeline.data.augment import SampleAugment
from pipeline.data.workers import worker_init
from pipeline.data.device_decode import DECODE_MODES, DEVICE_JPEG_MODES, DeferredAugment, EncodedJpeg, pack_batch
from pipeline.data.sources import (
    OpenOptions,
    ShardUnavailable,
    check_url,
    is_local,
    local_path,
    open_shard,
    read_small,
)
from pipeline.data.tarsamples import COMPLETE, FAILED, PARTIAL, RawSample, TarSamples, read_samples

log = logging.getLogger("transferline.data")

INFO_NAME = "_info.json"
#: A worker whose first this-many samples are all unusable stops: that is a configuration error.
CONFIG_PROBE_SAMPLES = 64
#: Image formats PIL may decode. Others (EPS runs Ghostscript, ...) are refused: untrusted bytes never run code.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
SHARD_ERRORS = ("skip", "raise")
#: Detailed log lines per worker and reason before bad samples are only counted.
_LOG_PER_REASON = 3


class DataConfigError(ValueError):
    """A data setting that cannot work; the message starts with the full config key."""


# --------------------------------------------------------------------------- shard lists and plans


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list: brace patterns (``a-{000..009}.tar``), ``::``-joined
    specs, or an explicit list (each item brace-expanded too)."""
    if isinstance(urls, str):
        return wds.shardlists.expand_urls(urls)
    return [u for item in urls for u in wds.shardlists.expand_urls(item)]


def absolutize_urls(spec: str, base: str | None = None) -> str:
    """A shard spec with its relative local paths made absolute against `base` (default: the
    working directory), each of its ``::``-joined parts; URLs with a scheme (``http:``,
    ``pipe:``, ...) are left alone."""
    from pipeline.data.sources import scheme

    parts = spec.split("::") if spec else []
    return "::".join(p if scheme(p) or os.path.isabs(p) else os.path.abspath(os.path.join(base or ".", p))
                     for p in parts)


def epoch_shards(
    urls: Sequence[str],
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
) -> list[str]:
    """The shards one loader worker of one rank reads in ``epoch``.

    All ranks shuffle with the same ``(seed, epoch)`` and take interleaved slices, so within an
    epoch the ranks' (and workers') shards are disjoint and together cover every shard.
    """
    order = list(urls)
    pos.seeded_random("shards", seed, epoch).shuffle(order)
    return order[rank::world_size][worker::num_workers]


def info_url(urls: str | Sequence[str]) -> str:
    """Where ``_info.json`` sits for a shard spec: next to its first shard."""
    first = expand_urls(urls)[0]
    if is_local(first):
        return str(Path(local_path(first)).parent / INFO_NAME)
    return first.rsplit("/", 1)[0] + "/" + INFO_NAME


def read_shard_info(urls: str | Sequence[str], *, timeout: float = 10.0, allow_pipe: bool = False) -> dict | None:
    """``_info.json`` next to the first shard (local, http(s), hf, s3, gs); None when there is none.

    Raises ``ConnectionError`` naming the URL when a server answers with an error other than
    "not found" or cannot be reached.
    """
    where = info_url(urls)
    try:
        data = read_small(where, OpenOptions(timeout=timeout, retries=1, retry_delay=0.5, allow_pipe=allow_pipe))
    except ShardUnavailable as exc:
        raise ConnectionError(f"cannot read {exc}") from None
    if data is None:
        return None
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e}); fix or delete it (it is the shards' index)") from None
    if not isinstance(info, dict):
        raise ValueError(f"{where} holds {type(info).__name__}, not the shards' index (a JSON object)")
    return info


def index_counts(info: Mapping[str, Any] | None) -> dict[str, int]:
    """Samples per shard (by file name) from an index: ours (``shards: [{url, num_samples}]``)
    or wids-style (``shardlist: [{url, nsamples}]``)."""
    out: dict[str, int] = {}
    for entry in (info or {}).get("shards") or (info or {}).get("shardlist") or []:
        if isinstance(entry, Mapping) and "url" in entry:
            n = entry.get("num_samples", entry.get("nsamples"))
            if isinstance(n, int):
                out[str(entry["url"]).rsplit("/", 1)[-1]] = n
    return out


@dataclass
class SourcePlan:
    """One source of shards: its URLs, its sampling weight and what its index says."""

    key: str
    urls: list[str]
    weight: float = 1.0
    info: dict | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def expected(self, url: str) -> int | None:
        return self.counts.get(url.rsplit("/", 1)[-1])


@dataclass
class StreamPlan:
    """Everything a worker needs to know about the shards (picklable)."""

    sources: list[SourcePlan]
    resampled: bool = False
    opts: OpenOptions = field(default_factory=OpenOptions)
    shard_errors: str = "skip"
    samples_per_shard: int = 0

    @property
    def fingerprint(self) -> str:
        return pos.fingerprint([(s.urls, s.weight) for s in self.sources], self.resampled)

    @property
    def info(self) -> dict | None:
        """The index of the first source, with ``num_classes`` checked across sources."""
        infos = [(s.key, s.info) for s in self.sources if s.info]
        if not infos:
            return None
        classes = {key: i["num_classes"] for key, i in infos if i.get("num_classes")}
        if len(set(classes.values())) > 1:
            raise DataConfigError(
                f"pretrain.data.num_classes: the sources' _info.json disagree ({classes}); set it explicitly"
            )
        merged = dict(infos[0][1])
        if classes:
            merged["num_classes"] = max(classes.values())
        return merged


def plan_stream(
    urls: str | Sequence[str] | None = None,
    sources: Sequence[tuple[str | Sequence[str], float]] | None = None,
    *,
    resampled: bool = False,
    opts: OpenOptions | None = None,
    shard_errors: str = "skip",
    samples_per_shard: int = 0,
    read_index: bool = True,
) -> StreamPlan:
    """Expand and check the shard URLs of ``urls`` or of weighted ``sources``; read their indexes.

    Raises ``DataConfigError`` (message starting with the key) for an empty spec, a refused
    or unsupported URL, a bad weight; ``ConnectionError`` when an index server errs.
    """
    opts = opts or OpenOptions()
    if shard_errors not in SHARD_ERRORS:
        raise DataConfigError(f"pretrain.data.shard_errors: must be one of {SHARD_ERRORS}, got {shard_errors!r}")
    specs: list[tuple[str, str | Sequence[str], float]] = []
    if sources:
        if urls:
            raise DataConfigError("pretrain.data.sources: give pretrain.data.urls or pretrain.data.sources, not both")
        specs = [(f"pretrain.data.sources[{i}].urls", u, float(w)) for i, (u, w) in enumerate(sources)]
    elif urls:
        specs = [("pretrain.data.urls", urls, 1.0)]
    else:
        raise DataConfigError("pretrain.data.urls: no shards given (set pretrain.data.urls or pretrain.data.sources)")
    plans = []
    for key, spec, weight in specs:
        if not weight > 0:
            raise DataConfigError(f"{key.rsplit('.', 1)[0]}.weight: must be > 0, got {weight}")
        expanded = expand_urls(spec) if spec else []
        if not expanded:
            raise DataConfigError(f"{key}: {spec!r} names no shards")
        for url in expanded:
            try:
                check_url(url, allow_pipe=opts.allow_pipe)
            except ValueError as exc:
                raise DataConfigError(f"{key}: {exc}") from None
        info = None
        if read_index:
            info = read_shard_info(expanded, timeout=opts.timeout, allow_pipe=opts.allow_pipe)
        plans.append(SourcePlan(key=key, urls=expanded, weight=weight, info=info, counts=index_counts(info)))
    return StreamPlan(plans, resampled=resampled, opts=opts, shard_errors=shard_errors,
                      samples_per_shard=samples_per_shard)


def plan_from_config(d: Any, *, read_index: bool = True) -> StreamPlan:
    """The plan of a ``ShardDataConfig`` (``pretrain.data``)."""
    sources = [(s.urls, s.weight) for s in (getattr(d, "sources", None) or [])]
    return plan_stream(
        d.urls or None, sources or None, resampled=d.resampled,
        opts=OpenOptions(timeout=d.timeout, retries=d.retries, retry_delay=d.retry_delay, allow_pipe=d.allow_pipe),
        shard_errors=d.shard_errors, samples_per_shard=d.samples_per_shard, read_index=read_index,
    )


def check_stream(plan: StreamPlan, *, world_size: int = 1, num_workers: int = 0) -> None:
    """Refuse before anything starts: too few shards for ``world_size x max(1, num_workers)``
    readers (a reader without shards would hang its rank), missing local shards."""
    readers = world_size * max(1, num_workers)
    for source in plan.sources:
        n = len(source.urls)
        if not plan.resampled and n < readers:
            raise DataConfigError(
                f"{source.key}: {n} shard(s) cannot feed world_size={world_size} x "
                f"num_workers={max(1, num_workers)} = {readers} readers; every reader needs at least one "
                f"shard: write more, smaller shards, use fewer workers, or set pretrain.data.resampled=true"
            )
        local = [local_path(u) for u in source.urls if is_local(u)]
        missing = [p for p in local if not os.path.exists(p)]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DataConfigError(f"{source.key}: shard not found: {', '.join(missing[:3])}{more}")
        for p in local:
            if not os.path.isfile(p):
                raise DataConfigError(f"{source.key}: {p} is not a file (a directory?), so not a shard")
            if not os.access(p, os.R_OK):
                raise DataConfigError(f"{source.key}: shard {p} exists but cannot be read: permission denied")


def check_shards(urls: str | Sequence[str], *, world_size: int = 1, num_workers: int = 0) -> list[str]:
    """`check_stream` for one plain shard spec; returns the expanded list."""
    plan = plan_stream(urls, read_index=False)
    check_stream(plan, world_size=world_size, num_workers=num_workers)
    return plan.sources[0].urls


# --------------------------------------------------------------------------- samples -> (image, label)


class BadSample(Exception):
    """One unusable sample: ``reason`` is a counter suffix (``undecodable``, ``missing_label``, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


#: The label of every sample of a stream read without a ``label_key`` (a loss that used it would fail).
NO_LABEL = -1


@dataclass(frozen=True)
class SampleSpec:
    """How a raw sample becomes ``(image tensor, label)``; an empty ``label_key`` reads no label."""

    image_keys: tuple[str, ...]
    label_key: str
    num_classes: int
    transform: Callable
    defer_jpeg: bool = False
    """Read only the header of an L/RGB JPEG and hand it on encoded (`device_decode.EncodedJpeg`)."""

    def image_and_label(self, sample: RawSample) -> tuple[Image.Image | EncodedJpeg, int]:
        if "__error__" in sample:
            raise BadSample("duplicate", sample["__error__"])
        image_key = next((k for k in self.image_keys if k in sample), None)
        if image_key is None:
            raise BadSample("missing_image", f"no member {'/'.join(self.image_keys)}; it has {_members(sample)}")
        label = self.label(sample)
        try:
            image = Image.open(io.BytesIO(sample[image_key]), formats=IMAGE_FORMATS)
            if self.defer_jpeg and image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES:
                return EncodedJpeg(bytes(sample[image_key]), image.size), label
            image.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise BadSample("undecodable", f"{image_key!r}: {type(exc).__name__}: {exc}") from None
        return image, label

    def label(self, sample: RawSample) -> int:
        """The sample's class, or `NO_LABEL` without a ``label_key`` (label-free objectives read none)."""
        if not self.label_key:
            return NO_LABEL
        if self.label_key not in sample:
            raise BadSample("missing_label", f"no member {self.label_key!r}; it has {_members(sample)}")
        raw = sample[self.label_key]
        try:
            label = int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, ValueError, TypeError):
            raise BadSample("bad_label", f"{self.label_key!r} holds {bytes(raw)[:20]!r}, not an integer") from None
        if label < 0 or (self.num_classes and label >= self.num_classes):
            raise BadSample("bad_label", f"label {label} outside [0, {self.num_classes or 'inf'})")
        return label

    def __call__(self, sample: RawSample) -> tuple[torch.Tensor, int]:
        image, label = self.image_and_label(sample)
        try:
            return self.transform(image), label
        except Exception as exc:  # noqa: BLE001 - a transform failing on one odd image is bad data
            raise BadSample("undecodable", f"transform failed: {type(exc).__name__}: {exc}") from None


def _members(sample: RawSample) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


_KEY_OF_REASON = {
    "missing_image": "pretrain.data.image_key", "undecodable": "pretrain.data.image_key",
    "missing_label": "pretrain.data.label_key", "bad_label": "pretrain.data.label_key",
    "duplicate": "pretrain.data.urls", "incomplete": "pretrain.data.urls",
}


# --------------------------------------------------------------------------- one worker's stream


class _SourceReader:
    """One worker's endless walk over one source's shards: raw samples, with a resumable position."""

    def __init__(self, worker: _WorkerStream, index: int, state: Mapping[str, Any] | None) -> None:
        ds = worker.ds
        self.worker, self.index = worker, index
        self.plan = ds.plan.sources[index]
        self.resampled = ds.plan.resampled
        self.epoch, self.shard, self.draws, self.dry = ds.start_epoch, 0, 0, 0
        self.rng = pos.seeded_random("resample", ds.seed, ds.rank, worker.logical, index)
        self.current: dict[str, Any] | None = None
        if state:
            self.epoch, self.shard = int(state["epoch"]), int(state["shard"])
            self.draws, self.dry = int(state["draws"]), int(state["dry"])
            self.rng = pos.unpack_random(state["rng"])
            self.current = dict(state["current"]) if state.get("current") else None
        self._order: tuple[int, list[str]] | None = None
        self._reader: TarSamples | None = None
        self._samples: Iterator[RawSample] | None = None
        self._stream: Any = None
        self._skip_below = 0

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard": self.shard, "draws": self.draws, "dry": self.dry,
                "rng": pos.pack_random(self.rng), "current": dict(self.current) if self.current else None}

    def _epoch_order(self) -> list[str]:
        if self._order is None or self._order[0] != self.epoch:
            ds = self.worker.ds
            self._order = (self.epoch, epoch_shards(
                self.plan.urls, epoch=self.epoch, seed=ds.seed + 7919 * self.index, rank=ds.rank,
                world_size=ds.world_size, worker=self.worker.logical, num_workers=ds.num_workers,
            ))
        return self._order[1]

    def _dry_limit(self) -> int:
        return max(16, 2 * len(self.plan.urls)) if self.resampled else len(self._epoch_order())

    def _next_url(self) -> str:
        if self.resampled:
            self.draws += 1
            return self.plan.urls[self.rng.randrange(len(self.plan.urls))]
        order = self._epoch_order()
        if self.shard >= len(order):
            self.epoch, self.shard = self.epoch + 1, 0
            order = self._epoch_order()
        self.shard += 1
        return order[self.shard - 1]

    def _open(self) -> bool:
        """Open the current shard (a new one when there is none); False when it failed."""
        if self.current is None:
            url = self._next_url()
            self.current = {"slot": self.worker.new_slot(url), "url": url, "index": 0, "offset": 0}
        cur = self.current
        self.worker.slot_urls[cur["slot"]] = cur["url"]
        start = max(int(cur["offset"]), 0)
        self._skip_below = int(cur["index"]) if cur["offset"] < 0 else 0
        try:
            self._stream = open_shard(cur["url"], self.worker.ds.plan.opts, start=start)
        except (ShardUnavailable, ValueError) as exc:
            self._finish_shard(FAILED, str(exc), unavailable=True)
            return False
        first = 0 if cur["offset"] < 0 else int(cur["index"])
        self._reader = TarSamples(self._stream, url=cur["url"], slot=cur["slot"], first_index=first,
                                  base_offset=start)
        self._samples = iter(self._reader)
        return True

    def next(self) -> RawSample:
        while True:
            if self._samples is None and not self._open():
                continue
            assert self._samples is not None and self.current is not None
            sample = next(self._samples, None)
            if sample is None:
                reader = self._reader
                assert reader is not None
                status, error = reader.status or PARTIAL, reader.error
                expected = self.plan.expected(self.current["url"])
                total = reader.first_index + reader.yielded
                if status == COMPLETE and expected is not None and total < expected:
                    status, error = PARTIAL, f"the index says {expected} samples, the shard holds {total}"
                self.worker.count("skipped_incomplete", reader.incomplete)
                self._finish_shard(status, error, unavailable=bool(reader.unavailable))
                continue
            ref = sample["__ref__"]
            if ref[1] < self._skip_below:
                continue
            self.current["index"] = ref[1] + 1
            self.current["offset"] = ref[3] if ref[2] >= 0 else -1
            self.dry = 0
            return sample

    def _finish_shard(self, status: str, error: str, *, unavailable: bool) -> None:
        assert self.current is not None
        url, got = self.current["url"], self.current["index"]
        if self._stream is not None:
            self.worker.count("retries", getattr(getattr(self._stream, "raw", None), "retries_used", 0))
            self._stream.close()
        self._stream = self._reader = self._samples = None
        self.current = None
        self.worker.count("shards_done")
        if status != COMPLETE:
            self.worker.count("failed_shards" if status == FAILED else "partial_shards")
            self.worker.problem(url, status, error)
            if self.worker.ds.plan.shard_errors == "raise" and (status == FAILED or unavailable):
                where = "" if error.startswith(url) else f"{url}: "
                raise ShardUnavailable(f"{where}{error} (pretrain.data.shard_errors=raise)")
            log.warning("%s shard %s: %s", status, url, error)
        self.dry = 0 if got else self.dry + 1
        if self.dry >= self._dry_limit():
            problems = "; ".join(f"{u}: {why}" for u, _, why in self.worker.problems[-3:])
            raise RuntimeError(
                f"{self.plan.key}: rank {self.worker.ds.rank} loader worker {self.worker.logical} read "
                f"{self.dry} shard(s) in a row without a sample; last problems: {problems or 'empty shards'}"
            )


class _WorkerStream:
    """Batches of one loader worker (logical id ``logical``), resumable from ``state``."""

    def __init__(self, ds: ShardStreamDataset, logical: int, state: Mapping[str, Any] | None) -> None:
        self.ds, self.logical = ds, logical
        self.counters = pos.new_counters()
        self.problems: list[list[str]] = []
        self.slot_urls: dict[int, str] = {}
        self.next_slot, self.batches = 0, 0
        self.logged: Counter[str] = Counter()
        self.last_detail = ""  # the latest bad sample, for the configuration-error message
        seed, rank = ds.seed, ds.rank
        self.mix_rng = pos.seeded_random("mix", seed, rank, logical)
        self.shuffle_rng = pos.seeded_random("shuffle", seed, rank, logical)
        self.augment_rng = pos.seeded_torch_state("augment", seed, rank, logical)
        self.buffer: list[RawSample] = []
        saved_sources = (state or {}).get("sources") or [None] * len(ds.plan.sources)
        if state:
            self.counters = pos.add_counters(pos.new_counters(), state["counters"])
            self.problems = [list(p) for p in state.get("problems", [])]
            self.next_slot, self.batches = int(state["next_slot"]), int(state["batches"])
            self.mix_rng = pos.unpack_random(state["mix_rng"])
            self.shuffle_rng = pos.unpack_random(state["shuffle_rng"])
            self.augment_rng = pos.torch_state(state["augment_rng"])
            self.slot_urls = {int(k): v for k, v in state["slots"].items()}
        self.readers = [_SourceReader(self, i, saved_sources[i]) for i in range(len(ds.plan.sources))]
        total = sum(s.weight for s in ds.plan.sources)
        self.cumulative = [sum(s.weight for s in ds.plan.sources[: i + 1]) / total for i in range(len(ds.plan.sources))]
        if state is not None and len(state["buffer"]):
            self._restore_buffer(pos.unpack_refs(state["buffer"]))

    # -- bookkeeping
    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.counters[name] += n
            if name.startswith("skipped_"):
                self.counters["skipped_samples"] += n

    def problem(self, url: str, status: str, why: str) -> None:
        if len(self.problems) < pos.MAX_PROBLEMS:
            self.problems.append([url, status, why[:300]])

    def new_slot(self, url: str) -> int:
        self.next_slot += 1
        self.slot_urls[self.next_slot - 1] = url
        return self.next_slot - 1

    def _restore_buffer(self, refs: list[tuple[int, int, int, int]]) -> None:
        by_slot: dict[int, list[tuple[int, int, int, int]]] = {}
        for ref in refs:
            by_slot.setdefault(ref[0], []).append(ref)
        found: dict[tuple[int, int], RawSample] = {}
        for slot, slot_refs in by_slot.items():
            url = self.slot_urls[slot]
            try:
                for index, sample in read_samples(url, slot_refs, self.ds.plan.opts).items():
                    found[(slot, index)] = sample
            except (ShardUnavailable, ValueError) as exc:
                log.warning("resume: %d buffered sample(s) of %s are lost: %s", len(slot_refs), url, exc)
        self.buffer = [found[(r[0], r[1])] for r in refs if (r[0], r[1]) in found]
        self.count("skipped_incomplete", len(refs) - len(self.buffer))

    def state(self) -> dict[str, Any]:
        refs = [s["__ref__"] for s in self.buffer]
        live = {r[0] for r in refs} | {r.current["slot"] for r in self.readers if r.current}
        self.slot_urls = {s: u for s, u in self.slot_urls.items() if s in live}
        return {
            "sources": [r.state() for r in self.readers],
            "mix_rng": pos.pack_random(self.mix_rng),
            "shuffle_rng": pos.pack_random(self.shuffle_rng),
            "augment_rng": self.augment_rng.numpy().tobytes(),
            "buffer": pos.pack_refs(refs),
            "slots": {s: self.slot_urls[s] for s in sorted({r[0] for r in refs})},
            "next_slot": self.next_slot,
            "batches": self.batches,
            "counters": dict(self.counters),
            "problems": [list(p) for p in self.problems],
        }

    # -- the stream
    def _pull(self) -> RawSample:
        reader = self.readers[0]
        if len(self.readers) > 1:
            r = self.mix_rng.random()
            reader = self.readers[next((i for i, c in enumerate(self.cumulative) if r < c), len(self.readers) - 1)]
        sample = reader.next()
        self.count("samples_read")
        return sample

    def _next_raw(self) -> RawSample:
        size = self.ds.shuffle_buffer
        if size <= 1:
            return self._pull()
        while len(self.buffer) < size:
            self.buffer.append(self._pull())
        k = self.shuffle_rng.randrange(len(self.buffer))
        out = self.buffer[k]
        self.buffer[k] = self._pull()
        return out

    def _skip(self, bad: BadSample, sample: RawSample) -> None:
        self.count(f"skipped_{bad.reason}")
        if self.logged[bad.reason] < _LOG_PER_REASON:
            self.logged[bad.reason] += 1
            log.warning("skipped sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), bad.detail)
        if self.counters["samples_used"] == 0 and self.counters["skipped_samples"] >= CONFIG_PROBE_SAMPLES:
            self._config_error()

    def _config_error(self) -> None:
        reasons = {k[len("skipped_"):]: v for k, v in self.counters.items()
                   if k.startswith("skipped_") and k != "skipped_samples" and v}
        top = max(reasons, key=reasons.get)  # type: ignore[arg-type]
        raise DataConfigError(
            f"{_KEY_OF_REASON.get(top, 'pretrain.data')}: none of the first {self.counters['skipped_samples']} "
            f"samples read by rank {self.ds.rank} loader worker {self.logical} is usable ({reasons}); "
            f"e.g. {self.last_detail}. That is a configuration error (image_key={'/'.join(self.ds.spec.image_keys)!r}, "
            f"label_key={self.ds.spec.label_key!r}, num_classes={self.ds.spec.num_classes}), not bad data"
        )

    def batches_forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        spec, size = self.ds.spec, self.ds.batch_size
        while True:
            images: list[torch.Tensor] = []
            labels: list[int] = []
            keys: list[str] = []
            outer = torch.get_rng_state()
            torch.set_rng_state(self.augment_rng)  # augmentations draw from the stream's own RNG
            try:
                while len(images) < size:
                    sample = self._next_raw()
                    try:
                        image, label = spec(sample)
                    except BadSample as bad:
                        self.last_detail = f"{sample.get('__key__')} of {sample.get('__url__')}: {bad.detail}"
                        self._skip(bad, sample)
                        continue
                    images.append(image)
                    labels.append(label)
                    keys.append(sample["__key__"])
                    self.counters["samples_used"] += 1
            finally:
                self.augment_rng = torch.get_rng_state()
                torch.set_rng_state(outer)
            self.batches += 1
            meta = {"worker": self.logical, "position": self.state(), "keys": keys}
            batch = self.ds.collate(images)
            if self.ds.batch_transform is not None:
                batch = self.ds.batch_transform(batch)
            yield batch, torch.tensor(labels, dtype=torch.int64), meta


class ShardStreamDataset(IterableDataset):
    """The per-worker batch stream (what DataLoader workers iterate; pickled into spawn workers)."""

    def __init__(self, plan: StreamPlan, *, spec: SampleSpec, rank: int, world_size: int, num_workers: int,
                 batch_size: int, shuffle_buffer: int, seed: int, start_epoch: int = 0,
                 batch_transform: Callable | None = None, collate: Callable = torch.stack) -> None:
        super().__init__()
        self.plan, self.spec, self.batch_transform, self.collate = plan, spec, batch_transform, collate
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.start_epoch = seed, start_epoch
        self.positions: list[dict | None] = [None] * self.num_workers
        self.rotation = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = get_worker_info()
        physical, count = (0, 1) if info is None else (info.id, info.num_workers)
        if count != self.num_workers:
            raise RuntimeError(f"built for {self.num_workers} loader worker(s), run by {count}")
        logical = (physical + self.rotation) % self.num_workers
        return _WorkerStream(self, logical, self.positions[logical]).batches_forever()


# --------------------------------------------------------------------------- the training-side loader


class ShardStream:
    """Exactly ``steps`` batches of ``(images[B, C, H, W], labels[B])`` per iteration, on every rank.

    Keeps the latest position of every loader worker (it arrives with each batch), so
    ``state_dict`` is where the consumer is, however far the workers prefetched. Iterating
    again continues the stream where the last iteration stopped.
    """

    def __init__(self, dataset: ShardStreamDataset, *, steps: int, num_workers: int, mp_context: str | None,
                 pin_memory: bool, position: Mapping[str, Any] | None = None) -> None:
        self.dataset, self.steps = dataset, steps
        self.num_workers, self.mp_context, self.pin_memory = num_workers, mp_context, pin_memory
        self.layout = pos.layout(rank=dataset.rank, world_size=dataset.world_size, workers=dataset.num_workers,
                                 fingerprint=dataset.plan.fingerprint)
        self.batches = 0
        self.carried = pos.new_counters()
        self.latest: list[dict | None] = [None] * dataset.num_workers
        self.resumed = "fresh"
        self.last_keys: list[str] = []
        if position is not None:
            mine, why = pos.rank_position(position, self.layout)
            if mine is not None:
                self.batches = int(mine["batches"])
                self.latest = list(mine["workers"])
                self.carried = pos.add_counters(pos.new_counters(), mine.get("carried"))
                self.resumed = "exact"
            else:
                # Not exactly resumable: fresh shard orders after the last epoch any worker reached.
                dataset.start_epoch = max(dataset.start_epoch, pos.max_epoch(position) + 1)
                if dataset.rank == 0:
                    self.carried = pos.total_counters(position)
                self.resumed = "inexact"
                log.warning("data position not restored exactly (%s): the stream restarts at epoch %d with "
                            "fresh shard orders", why, dataset.start_epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        ds.positions = list(self.latest)
        ds.rotation = self.batches % ds.num_workers  # the worker whose turn is next plays worker 0
        loader = DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
            multiprocessing_context=self.mp_context if self.num_workers > 0 else None,
            persistent_workers=False, pin_memory=self.pin_memory,
            worker_init_fn=worker_init(self.mp_context) if self.num_workers > 0 else None,
            generator=torch.Generator(),  # leave the global RNG (model init, dropout) alone
        )
        it = iter(loader)
        try:
            for _ in range(self.steps):
                try:
                    images, labels, meta = next(it)
                except (ConnectionError, EOFError) as e:
                    raise _dead_worker_error(it, e) from e
                self.latest[int(meta["worker"])] = meta["position"]
                self.last_keys = list(meta["keys"])
                self.batches += 1
                yield images, labels
        finally:
            del it

    # -- position and counters
    def state_dict(self) -> dict[str, Any]:
        """This rank's position (see `pipeline.data.position`), as checkpoints hold it."""
        return {"layout": dict(self.layout), "batches": self.batches,
                "workers": [pos.for_checkpoint(w) for w in self.latest], "carried": dict(self.carried)}

    def gather_state(self) -> dict[str, Any]:
        """Every rank's position, gathered (a collective: call it on all ranks). What checkpoints hold."""
        from pipeline.distributed import all_gather_object

        return {"version": pos.VERSION, "ranks": all_gather_object(self.state_dict())}

    def local_counters(self) -> dict[str, int]:
        total = pos.add_counters(pos.new_counters(), self.carried)
        for worker in self.latest:
            if worker:
                pos.add_counters(total, worker["counters"])
        return total

    def global_counters(self) -> dict[str, int]:
        """Counters summed over loader workers and ranks (a collective: call it on all ranks)."""
        from pipeline.distributed import all_reduce_sum

        return pos.counters_from_tensor(all_reduce_sum(pos.counters_tensor(self.local_counters())))

    def problems(self) -> list[list[str]]:
        return [p for worker in self.latest if worker for p in worker.get("problems", [])]

    def metrics(self, prefix: str) -> dict[str, int]:
        """Bad-data counters for the step metrics (a collective: call it on all ranks)."""
        counters = self.global_counters()
        return {f"{prefix}/{k}": counters[k] for k in ("skipped_samples", "partial_shards", "failed_shards")}

    def summary(self, *, estimate: bool = True) -> dict[str, Any]:
        """What the run's summary says about its data (a collective: call it on all ranks).

        ``estimate``: may count the first shard to size an epoch when there is no index.
        """
        from pipeline.distributed import all_gather_object

        counters = self.global_counters()
        problems = [p for rank in all_gather_object(self.problems()) for p in rank]
        ds = self.dataset
        epoch = describe_epoch(ds.plan, batch_size=ds.batch_size, world_size=ds.world_size, estimate=estimate)
        return {
            **epoch,
            "epochs_seen": counters["samples_used"] / epoch["epoch_samples"] if epoch["epoch_samples"] else None,
            "skipped_samples": counters["skipped_samples"],
            "partial_shards": counters["partial_shards"],
            "failed_shards": counters["failed_shards"],
            "samples_read": counters["samples_read"],
            "samples_used": counters["samples_used"],
            "shards_done": counters["shards_done"],
            "retries": counters["retries"],
            "skipped_by_reason": {k[len("skipped_"):]: v for k, v in counters.items()
                                  if k.startswith("skipped_") and k != "skipped_samples"},
            "problem_shards": [{"url": u, "status": s, "reason": r} for u, s, r in problems[:20]],
            "resumed_position": self.resumed,
        }


def _dead_worker_error(it: Any, error: BaseException) -> BaseException:
    """A connection error while reading a batch: when a loader worker died (the batch's shared memory
    came from it), torch's own words for that, as torch says them when it notices first; else ``error``."""
    workers = list(getattr(it, "_workers", []))
    for w in workers:
        w.join(timeout=2.0)  # a SIGKILLed worker is reaped within moments; a live one just waits here
    dead = [w.pid for w in workers if not w.is_alive()]
    if not dead:
        return error
    return RuntimeError(f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly")


def build_shard_loader(
    urls: str | Sequence[str] | StreamPlan,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    steps: int,
    shuffle_buffer: int,
    transform: Callable,
    batch_transform: Callable | None = None,
    image_key: str = "png;jpg;jpeg;webp",
    label_key: str = "cls",
    num_classes: int = 0,
    seed: int = 0,
    mp_context: str | None = None,
    start_epoch: int = 0,
    pin_memory: bool = False,
    position: Mapping[str, Any] | None = None,
    decode: str = "worker",
) -> ShardStream:
    """Build the stage-one loader: an iterable of ``(images[B, C, H, W], labels[B])``.

    Every iteration yields exactly ``steps`` full batches on every rank (``len(loader) == steps``).

    Args:
        urls: a `StreamPlan` (`plan_from_config`: sources, weights, resampling, retries), or a
            brace pattern / list of local, ``file:``, ``http(s)://``, ``hf://``, ``s3://`` or
            ``gs://`` URLs with default options.
        rank, world_size: this process's place among the data-parallel ranks; shards are split
            by these arguments, not by environment variables.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes (0: read in this process).
        steps: batches per iteration.
        shuffle_buffer: sample shuffle buffer size (<= 1 disables it).
        transform: PIL image -> tensor (e.g. `augment.SampleAugment` or `build_transform`); must
            pickle for workers.
        batch_transform: applied to each stacked batch in the worker (e.g. `augment.BatchNormalize`).
        image_key: ``;``-separated sample keys to take the image from (first found wins).
        label_key: sample key of the integer label; empty: read none (every label is ``NO_LABEL``).
        num_classes: labels outside ``[0, num_classes)`` are bad samples (0: no upper bound).
        seed: seeds shard orders, shard draws, the shuffle buffers and the augmentations.
        mp_context: multiprocessing start method for workers (None: torch's default).
        start_epoch: first shard-order epoch of a fresh stream.
        pin_memory: pin batches for faster host-to-GPU copies.
        position: a saved ``gather_state()``; the stream continues exactly where it was when
            ranks, workers and shards match, else restarts after the epochs it had reached.
        decode: ``worker`` decodes every image in the loader workers; ``device`` leaves L/RGB
            JPEGs encoded (``transform`` must then be a `SampleAugment`, ``batch_transform``
            None) and yields packed batches for `device_decode.DeviceDecoder`.

    Raises:
        ValueError: bad arguments; ``DataConfigError`` for too few shards for
            ``world_size * max(1, num_workers)`` readers, missing local shards, refused URLs.
    """
    if steps < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"need steps>=1, batch_size>=1, num_workers>=0; got {steps}, {batch_size}, {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    if not callable(transform):
        raise ValueError(f"transform must be callable, got {transform!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    collate: Callable = torch.stack
    if decode == "device":
        if not isinstance(transform, SampleAugment) or batch_transform is not None:
            raise ValueError("decode='device' needs a SampleAugment transform and no batch_transform "
                             "(the device normalises)")
        transform, collate = DeferredAugment(transform), pack_batch
    plan = urls if isinstance(urls, StreamPlan) else plan_stream(urls, read_index=True)
    check_stream(plan, world_size=world_size, num_workers=num_workers)
    spec = SampleSpec(tuple(k for k in image_key.split(";") if k), label_key, num_classes, transform,
                      defer_jpeg=decode == "device")
    dataset = ShardStreamDataset(plan, spec=spec, rank=rank, world_size=world_size, num_workers=num_workers,
                                 batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                                 start_epoch=start_epoch, batch_transform=batch_transform, collate=collate)
    return ShardStream(dataset, steps=steps, num_workers=num_workers, mp_context=mp_context,
                       pin_memory=pin_memory, position=position)


# --------------------------------------------------------------------------- checks before training


#: A share of probed samples with labels beyond `num_classes` this large is a configuration
#: error (the run would skip them all as bad samples), not bad data.
LABEL_RANGE_ERROR_SHARE = 0.5


def probe_stream(plan: StreamPlan, *, image_key: str, label_key: str, num_classes: int = 0,
                 samples: int = CONFIG_PROBE_SAMPLES, max_shards: int = 3) -> dict[str, int]:
    """Read the first ``samples`` samples of each source (up to ``max_shards`` shards) without
    transforming them; raise `DataConfigError` naming the key when none is usable (wrong
    image_key, label_key, num_classes), when `LABEL_RANGE_ERROR_SHARE` of them have labels
    beyond ``num_classes``, or when no shard of the first ones can be read. Returns reason counts."""
    spec = SampleSpec(tuple(k for k in image_key.split(";") if k), label_key, 0, lambda x: x)
    seen: Counter[str] = Counter()
    for source in plan.sources:
        errors, details, labels, read = [], [], [], 0
        for url in source.urls[:max_shards]:
            try:
                with open_shard(url, plan.opts) as stream:
                    reader = TarSamples(stream, url=url, slot=0)
                    for sample in reader:
                        read += 1
                        try:
                            labels.append(spec.image_and_label(sample)[1])
                        except BadSample as bad:
                            seen[bad.reason] += 1
                            details.append((bad.reason, f"{sample['__key__']} of {url}: {bad.detail}"))
                        if read >= samples:
                            break
                    if reader.status == FAILED:
                        errors.append(f"{url}: {reader.error}")
                    elif not reader.yielded:
                        errors.append(f"{url}: a tar with no samples in it")
            except (ShardUnavailable, ValueError) as exc:
                errors.append(str(exc))
            if read >= samples:
                break
        beyond = [y for y in labels if num_classes and y >= num_classes]
        seen["usable"] += len(labels) - len(beyond)
        seen["bad_label"] += len(beyond)
        if beyond and len(beyond) >= LABEL_RANGE_ERROR_SHARE * read:
            raise DataConfigError(
                f"pretrain.data.num_classes: {num_classes}, but {len(beyond)} of the first {read} samples of "
                f"{source.key} have labels beyond it (labels seen: {min(labels)}..{max(labels)}); they would all "
                f"be skipped: set num_classes to at least {max(labels) + 1}, or 0 to read it from the shards' _info.json")
        if len(labels) > len(beyond):
            continue
        if not read:
            raise DataConfigError(f"{source.key}: none of the first shards can be read: {'; '.join(errors)}")
        reasons = Counter(r for r, _ in details)
        top = reasons.most_common(1)[0][0]
        raise DataConfigError(
            f"{_KEY_OF_REASON.get(top, source.key)}: none of the first {read} samples of {source.key} is usable "
            f"({dict(reasons)}), e.g. {details[0][1]}; check image_key={image_key!r}, label_key={label_key!r}, "
            f"num_classes={num_classes}"
        )
    return dict(seen)


def count_shard_samples(url: str, opts: OpenOptions | None = None) -> int:
    """Samples in one shard (read through, not decoded)."""
    with open_shard(url, opts or OpenOptions()) as stream:
        return sum(1 for _ in TarSamples(stream, url=url, slot=0))


def describe_epoch(plan: StreamPlan, *, batch_size: int, world_size: int, estimate: bool = True) -> dict[str, Any]:
    """How many samples one pass over the shards holds: exact from the indexes, from
    ``samples_per_shard``, or estimated by counting the first shard of each source (``estimate``)."""
    total, how = 0, "index"
    for source in plan.sources:
        known = [source.expected(u) for u in source.urls]
        if all(n is not None for n in known):
            total += sum(known)  # type: ignore[arg-type]
            continue
        if plan.samples_per_shard:
            per, how = plan.samples_per_shard, "samples_per_shard"
        elif estimate:
            per, how = count_shard_samples(source.urls[0], plan.opts), "estimated"
        else:
            return {"epoch_samples": None, "epoch_samples_from": None, "steps_per_epoch": None}
        total += sum(n if n is not None else per for n in known)
    return {"epoch_samples": total, "epoch_samples_from": how,
            "steps_per_epoch": total / (batch_size * world_size)}
