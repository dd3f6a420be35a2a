"""The data position of the stage-one stream, as plain data that checkpoints can hold.

Every loader worker of every rank owns a position: per source, the epoch, the next shard of its
epoch order (or, resampled, the shard-drawing RNG), the shard being read with its sample index
and byte offset; the shuffle buffer as references ``(slot, index, start, end)`` into shards; the
RNG states of the source mix, the shuffle and the augmentations; and its counters (bad samples,
partial and failed shards). A worker sends its position with every batch; the training process
keeps the latest one per worker, so a checkpoint records exactly what was *consumed*, not what
was prefetched. All ranks' positions are gathered to rank 0 and saved as
``train_state["data_position"]``::

    {"version": 1, "ranks": [{"layout": {...}, "batches": N, "workers": [worker position | None, ...],
                              "carried": {counter: n}}, ...]}

Only tensors, ints, floats, strings, lists and dicts: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

VERSION = 1

#: Counters every worker keeps; summed over workers and ranks for metrics and the summary.
COUNTERS = (
    "samples_read",          # raw samples taken from shards
    "samples_used",          # samples that went into batches
    "skipped_samples",       # bad samples skipped (the sum of the skipped_* reasons below)
    "skipped_undecodable",   # image bytes PIL cannot decode (HTML saved as .jpg, truncated JPEG, ...)
    "skipped_missing_image",  # no member under any image_key
    "skipped_missing_label",  # no member under label_key
    "skipped_bad_label",     # label not an integer in [0, num_classes)
    "skipped_duplicate",     # a member name twice in one sample
    "skipped_incomplete",    # the sample a truncated shard cut off, or one lost when resuming
    "shards_done",           # shards finished (complete, partial or failed)
    "partial_shards",        # truncated shards, or fewer samples than the index says
    "failed_shards",         # unreadable shards (unreachable, HTTP error, not a tar) skipped
    "retries",               # request retries (transient network errors)
)
#: At most this many problem shards (url, status, reason) are kept per worker.
MAX_PROBLEMS = 8


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def add_counters(total: dict[str, int], more: Mapping[str, int] | None) -> dict[str, int]:
    for key, value in (more or {}).items():
        total[key] = total.get(key, 0) + int(value)
    return total


def counters_tensor(counters: Mapping[str, int]) -> torch.Tensor:
    return torch.tensor([int(counters.get(k, 0)) for k in COUNTERS], dtype=torch.float64)


def counters_from_tensor(values: torch.Tensor) -> dict[str, int]:
    return {k: int(round(v)) for k, v in zip(COUNTERS, values.tolist())}


def pack_random(rng: random.Random) -> tuple[int, ...]:
    """A ``random.Random`` state as its 625 words (cheap to send; `for_checkpoint` makes it a tensor)."""
    version, internal, gauss = rng.getstate()
    if version != 3 or gauss is not None:
        raise ValueError("unexpected random.Random state")
    return internal


def unpack_random(state: torch.Tensor | Sequence[int]) -> random.Random:
    rng = random.Random()
    words = state.tolist() if isinstance(state, torch.Tensor) else state
    rng.setstate((3, tuple(int(v) for v in words), None))
    return rng


def pack_refs(refs: Sequence[tuple[int, int, int, int]]) -> bytes:
    """Shuffle-buffer references ``(slot, index, start, end)`` as int64 bytes."""
    return array.array("q", itertools.chain.from_iterable(refs)).tobytes()


def unpack_refs(packed: torch.Tensor | bytes) -> list[tuple[int, int, int, int]]:
    if isinstance(packed, torch.Tensor):
        flat = packed.reshape(-1).tolist()
    else:
        flat = array.array("q", packed).tolist()
    return [tuple(flat[i:i + 4]) for i in range(0, len(flat), 4)]  # type: ignore[misc]


def torch_state(packed: torch.Tensor | bytes) -> torch.Tensor:
    """A torch CPU generator state from its checkpoint (tensor) or in-flight (bytes) form."""
    if isinstance(packed, torch.Tensor):
        return packed.clone()
    return torch.tensor(bytearray(packed), dtype=torch.uint8)


def for_checkpoint(worker: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A worker position as it travels with batches (bytes, tuples) -> as checkpoints hold it (tensors).

    Batches carry the cheap form: every tensor in a batch crosses the loader queue as its own
    shared-memory segment, which cost 10-40% of the stream's speed when positions were tensors.
    """
    if worker is None:
        return None

    def words(x: Any) -> Any:
        return torch.tensor(x, dtype=torch.int64) if isinstance(x, (tuple, list)) else x

    out = dict(worker)
    for key in ("mix_rng", "shuffle_rng"):
        out[key] = words(out[key])
    out["sources"] = [{**src, "rng": words(src["rng"])} for src in out["sources"]]
    if isinstance(out["augment_rng"], (bytes, bytearray)):
        out["augment_rng"] = torch_state(out["augment_rng"])
    if isinstance(out["buffer"], (bytes, bytearray)):
        flat = array.array("q", out["buffer"]).tolist()
        out["buffer"] = torch.tensor(flat, dtype=torch.int64).reshape(-1, 4)
    return out


def seeded_random(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from a readable, collision-free tuple (e.g. seed, rank, worker)."""
    return random.Random("-".join(str(p) for p in parts))


def seeded_torch_state(*parts: Any) -> torch.Tensor:
    digest = hashlib.sha256("-".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)).get_state()


def fingerprint(sources: Iterable[tuple[Sequence[str], float]], resampled: bool) -> str:
    """Identity of a shard layout: the same URLs, weights and mode give the same string."""
    blob = json.dumps({"sources": [[list(u), float(w)] for u, w in sources], "resampled": bool(resampled)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def layout(*, rank: int, world_size: int, workers: int, fingerprint: str) -> dict[str, Any]:
    """What must match for a rank's saved position to continue exactly."""
    return {"rank": rank, "world_size": world_size, "workers": workers, "fingerprint": fingerprint}


def rank_position(saved: Mapping[str, Any] | None, want: Mapping[str, Any]) -> tuple[dict | None, str]:
    """This rank's entry of a saved position if its layout matches ``want``; else ``(None, why)``."""
    if not saved:
        return None, "no data position in the checkpoint"
    if saved.get("version") != VERSION:
        return None, f"data position version {saved.get('version')!r}, this code reads {VERSION}"
    ranks = saved.get("ranks") or []
    rank = int(want["rank"])
    if len(ranks) != int(want["world_size"]):
        return None, f"saved for {len(ranks)} rank(s), now {want['world_size']}"
    entry = ranks[rank]
    have = dict(entry.get("layout", {}))
    for key in ("workers", "fingerprint"):
        if have.get(key) != want[key]:
            what = "loader workers" if key == "workers" else "shard list (URLs, weights or resampled)"
            return None, f"{what} changed: saved {have.get(key)!r}, now {want[key]!r}"
    return dict(entry), ""


def total_counters(saved: Mapping[str, Any] | None) -> dict[str, int]:
    """All counters of a saved position, over every rank and worker (carried into an inexact resume)."""
    total = new_counters()
    for entry in (saved or {}).get("ranks") or []:
        add_counters(total, entry.get("carried"))
        for worker in entry.get("workers") or []:
            if worker:
                add_counters(total, worker.get("counters"))
    return total


def max_epoch(saved: Mapping[str, Any] | None) -> int:
    """The highest source epoch any worker had reached (an inexact resume starts after it)."""
    best = -1
    for entry in (saved or {}).get("ranks") or []:
        for worker in entry.get("workers") or []:
            for source in (worker or {}).get("sources") or []:
                best = max(best, int(source.get("epoch", 0)))
    return best
