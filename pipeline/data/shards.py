"""Stage-one stream: webdataset shards -> exactly ``steps`` equal batches on every rank.

The stream follows OpenCLIP's ``get_wds_dataset`` idea, written for our needs:

    shard list (brace-expanded, local or http(s)) -> per-epoch seeded shuffle, the same on every
    rank -> split by rank (our arguments, never the environment) -> split by loader worker ->
    tar -> samples, epochs repeated endlessly -> sample shuffle buffer -> decode (PIL) ->
    transform -> (tensor, int) -> batched(partial=False) -> WebLoader(...).with_epoch(steps)

Because every worker's stream is endless and the loader is cut at ``steps`` batches after
batching, every rank yields exactly ``steps`` full batches however uneven the shards are, so
DDP never waits on a rank that ran dry. Every pipeline stage is a module-level function or a
``functools.partial`` of one, so spawn/forkserver loader workers (what Ray recommends) can pickle it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from torch.utils.data import default_collate, get_worker_info

INFO_NAME = "_info.json"
_ON_ERROR = {"raise": wds.reraise_exception, "warn": wds.warn_and_continue}


# --------------------------------------------------------------------------- shard lists


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list: brace patterns (``a-{000..009}.tar``), ``::``-joined
    specs, or an explicit list (each item brace-expanded too)."""
    if isinstance(urls, str):
        return wds.shardlists.expand_urls(urls)
    return [u for item in urls for u in wds.shardlists.expand_urls(item)]


def is_local(url: str) -> bool:
    """True for plain paths and ``file:`` URLs (webdataset opens the rest with curl, pipes, ...)."""
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    """Filesystem path of a local shard URL."""
    parsed = urlparse(url)
    return url2pathname(parsed.path) if parsed.scheme == "file" else url


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
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]


def _worker() -> tuple[int, int]:
    info = get_worker_info()  # set inside DataLoader workers; None in the main process
    return (0, 1) if info is None else (info.id, info.num_workers)


def _endless_samples(
    urls: list[str], *, seed: int, rank: int, world_size: int, start_epoch: int, on_error: str
) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes) of this rank's and worker's shards, epoch after epoch."""
    worker, num_workers = _worker()
    for epoch in itertools.count(start_epoch):
        shards = epoch_shards(
            urls, epoch=epoch, seed=seed, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
        )
        count = 0
        for sample in wds.tarfile_samples([{"url": u} for u in shards], handler=_ON_ERROR[on_error]):
            count += 1
            yield sample
        if count == 0:  # without this an endless loop over empty shards would hang the rank
            raise ValueError(f"rank {rank} loader worker {worker}: no samples in its shards {shards}")


def _shuffle_samples(src: Iterator, *, bufsize: int, seed: int, rank: int, start_epoch: int) -> Iterator:
    """Sample shuffle buffer, seeded per (seed, rank, worker) so runs are reproducible."""
    worker, _ = _worker()
    rng = random.Random(f"samples-{seed}-{rank}-{worker}-{start_epoch}")
    return wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


def _to_pair(sample: dict[str, Any], *, image_keys: list[str], label_key: str, transform: Callable) -> tuple:
    """Decoded sample -> (transformed image, int label); a missing key is a config error."""
    image_key = next((k for k in image_keys if k in sample), None)
    if image_key is None or label_key not in sample:
        missing = ";".join(image_keys) if image_key is None else label_key
        which = "image_key" if image_key is None else "label_key"
        available = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(
            f"{which} {missing!r} not found in sample {sample.get('__key__')!r} of {sample.get('__url__')}; "
            f"available keys: {available}"
        )
    label = sample[label_key]
    try:
        label = int(label)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"label_key {label_key!r} holds {label!r}, not an integer class index") from exc
    return transform(sample[image_key]), label


def _collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = default_collate(batch)
    return images, labels


# --------------------------------------------------------------------------- loader


def check_shards(urls: str | Sequence[str], *, world_size: int = 1, num_workers: int = 0) -> list[str]:
    """Validate a shard spec before anything starts; return the expanded shard list.

    Raises ``ValueError`` when there are no shards or fewer than ``world_size * max(1, num_workers)``
    (a reader without shards would hang its rank), ``FileNotFoundError`` naming missing local shards.
    Remote shards are not probed here.
    """
    shard_list = expand_urls(urls)
    readers = world_size * max(1, num_workers)
    if len(shard_list) < readers:
        raise ValueError(
            f"{len(shard_list)} shard(s) in {urls!r} cannot feed world_size={world_size} x "
            f"num_workers={max(1, num_workers)} = {readers} readers; every reader needs at least one "
            f"shard: write more, smaller shards or use fewer workers"
        )
    missing = [u for u in shard_list if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"shard not found: {', '.join(missing[:3])}{more}")
    return shard_list


def build_shard_loader(
    urls: str | Sequence[str],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    steps: int,
    shuffle_buffer: int,
    transform: Callable,
    image_key: str = "png;jpg;jpeg;webp",
    label_key: str = "cls",
    seed: int = 0,
    mp_context: str | None = None,
    start_epoch: int = 0,
    pin_memory: bool = False,
    on_error: str = "raise",
) -> wds.WebLoader:
    """Build the stage-one loader: an iterable of ``(images[B, C, H, W], labels[B])``.

    Every iteration over the returned loader yields exactly ``steps`` full batches on every
    rank (``len(loader) == steps``) and starts the stream afresh (epoch ``start_epoch``); pass
    another ``start_epoch`` (e.g. on resume) to continue with fresh shard and sample orders.

    Args:
        urls: brace pattern, ``::``-joined patterns or a list; local paths, ``file:`` or
            ``http(s)://`` URLs (webdataset opens those with curl).
        rank, world_size: this process's place among the data-parallel ranks; shards are split
            by these arguments, not by environment variables.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes (0: read in this process).
        steps: batches to yield per iteration.
        shuffle_buffer: sample shuffle buffer size (<= 1 disables it).
        transform: PIL image -> tensor (e.g. `build_transform`); must pickle for workers.
        image_key: ``;``-separated sample keys to take the image from (first found wins).
        label_key: sample key of the integer label.
        seed: seeds the per-epoch shard order and the sample shuffle buffers.
        mp_context: multiprocessing start method for workers (None: torch's default).
        start_epoch: first shard-order epoch.
        pin_memory: pin batches for faster host-to-GPU copies.
        on_error: "raise" (default) or "warn" (skip unreadable shards/members and go on).

    Raises:
        ValueError: bad arguments, or fewer shards than ``world_size * max(1, num_workers)``
            readers (a reader without shards would hang its rank).
        FileNotFoundError: a local shard is missing (checked before anything starts).
    """
    if steps < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"need steps>=1, batch_size>=1, num_workers>=0; got {steps}, {batch_size}, {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {sorted(_ON_ERROR)}, got {on_error!r}")
    if not callable(transform):
        raise ValueError(f"transform must be callable, got {transform!r}")
    shard_list = check_shards(urls, world_size=world_size, num_workers=num_workers)

    image_keys = [k for k in image_key.split(";") if k]
    pipeline = [
        functools.partial(
            _endless_samples, shard_list, seed=seed, rank=rank, world_size=world_size,
            start_epoch=start_epoch, on_error=on_error,
        ),
    ]
    if shuffle_buffer > 1:
        pipeline.append(
            functools.partial(_shuffle_samples, bufsize=shuffle_buffer, seed=seed, rank=rank, start_epoch=start_epoch)
        )
    pipeline += [
        # Decode only the fields we use: no surprise unpickling of other members.
        wds.decode("pil", only=[*image_keys, label_key]),
        wds.map(functools.partial(_to_pair, image_keys=image_keys, label_key=label_key, transform=transform)),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    ]
    dataset = wds.DataPipeline(*pipeline)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,  # batching happens in the pipeline, per worker
        shuffle=False,
        num_workers=num_workers,
        multiprocessing_context=mp_context if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    return loader.with_epoch(steps).with_length(steps, silent=True)


# --------------------------------------------------------------------------- shard info


def info_url(urls: str | Sequence[str]) -> str:
    """Where ``_info.json`` sits for a shard spec: next to its first shard."""
    first = expand_urls(urls)[0]
    if is_local(first):
        return str(Path(local_path(first)).parent / INFO_NAME)
    return first.rsplit("/", 1)[0] + "/" + INFO_NAME


def read_shard_info(urls: str | Sequence[str], *, timeout: float = 10.0) -> dict | None:
    """Read ``_info.json`` next to the first shard (local or http(s)); None when there is none.

    Other remote schemes (pipe:, gs:, ...) return None. An http server that answers with an error
    other than 404, or cannot be reached, raises ``ConnectionError`` naming the URL.
    """
    where = info_url(urls)
    if is_local(where):
        path = Path(where)
        return json.loads(path.read_text()) if path.is_file() else None
    if urlparse(where).scheme not in ("http", "https"):
        return None
    try:
        with urllib.request.urlopen(where, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise ConnectionError(f"cannot read {where}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ConnectionError(f"cannot read {where}: {exc.reason}") from exc
