"""Progress of a stage: a tqdm bar on a terminal, plain periodic lines otherwise (logs, Ray).

Lines go through logging, not print: Ray Train V2 echoes a worker's stdout twice, its log
records once.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("transferline.progress")


class Progress:
    def __init__(self, name: str, *, total: int, initial: int = 0, enabled: bool = True,
                 min_interval_s: float = 5.0) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.min_interval_s = min_interval_s
        self._t0 = time.perf_counter()
        self._start_step = initial
        self._last_print = 0.0
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, leave=False)
        self._step = initial
        if enabled:
            logging.getLogger("transferline").setLevel(logging.INFO)

    def update(self, step: int, *, loss: float, lr: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._step)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.0f}")
            self._step = step
            return
        self._step = step
        now = time.perf_counter()
        if now - self._last_print < self.min_interval_s and step < self.total:
            return
        self._last_print = now
        done = step - self._start_step
        eta = (now - self._t0) / done * (self.total - step) if done > 0 else float("nan")
        log.info("[%s] step %d/%d loss %.4f lr %.2e %.0f samples/s eta %.0fs",
                 self.name, step, self.total, loss, lr, samples_per_s, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
