"""DataLoader worker processes that die with the process that started them.

A forked loader worker inherits its parent's sockets. When a Ray Train worker is SIGKILLed, its
orphaned loader child keeps the dead worker's connections open, so Ray never sees the death and
the other ranks wait in a collective forever; a SIGKILLed local run leaves its loader children
holding shared memory for minutes. Linux's parent-death signal ends them with their parent.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id: int, *, parent: int | None) -> None:
    """`worker_init_fn`: SIGKILL this worker when its parent process dies. `parent`: the pid it
    must still have (None when a forkserver, not the loader's process, is the parent)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed in loader worker {worker_id}: {os.strerror(err)}")
    if parent is not None and os.getppid() != parent:  # the parent died between fork and prctl: nobody is left to signal us
        os._exit(1)


def worker_init(mp_context: str | None = None) -> Callable[[int], None]:
    """A picklable `worker_init_fn` for a loader this process starts with start method `mp_context`."""
    return functools.partial(die_with_parent, parent=None if mp_context == "forkserver" else os.getpid())
