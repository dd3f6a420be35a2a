"""Progress of a stage: a tqdm bar on a terminal, plain periodic lines otherwise (logs, Ray).

Both show the step, loss, learning rate, samples/s and the ETA. Ray workers write to log
files, never to a terminal, so under Ray the lines are what reaches the driver. Lines go
through logging, not print: Ray Train V2 echoes a worker's stdout twice, its log records once.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("transferline.progress")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class Progress:
    """`update` after log steps; `close` at the end. `enabled=False` (ranks > 0) shows nothing."""

    def __init__(self, name: str, *, total: int, initial: int = 0, enabled: bool = True,
                 min_interval_s: float = 5.0, stream: TextIO | None = None) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.min_interval_s = min_interval_s
        self._t0 = time.perf_counter()
        self._start_step = initial
        self._step = initial
        self._last_print = float("-inf")
        self._bar: tqdm | None = None
        stream = sys.stderr if stream is None else stream
        if enabled and _is_terminal(stream):
            # tqdm's own n/total, elapsed<remaining (the ETA) and rate; loss etc. as postfix.
            self._bar = tqdm(total=total, initial=initial, desc=name, file=stream, dynamic_ncols=True,
                             leave=True, unit="step")
        if enabled:
            logging.getLogger("transferline").setLevel(logging.INFO)

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the mean speed since this bar started; None before the first step."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * max(self.total - step, 0)

    def update(self, step: int, *, loss: float, lr: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._step)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.0f}",
                                  refresh=False)
            self._step = step
            return
        self._step = step
        now = time.perf_counter()
        if now - self._last_print < self.min_interval_s and step < self.total:
            return
        self._last_print = now
        eta = self.eta_s(step)
        log.info("[%s] step %d/%d loss %.4f lr %.2e %.0f samples/s eta %s", self.name, step, self.total,
                 loss, lr, samples_per_s, "?" if eta is None else tqdm.format_interval(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
