"""Stopping stage one on notice: a committed checkpoint first, then a clean exit.

A SIGTERM is how schedulers ask a job to end: SLURM sends it before the time limit with
`--signal`, Kubernetes when it terminates a pod, `kill` by default. The process that gets it
(the local training process, or the Ray driver) records the request; stage one's ranks agree on
it at the next step (one collective), commit a checkpoint there and end with `StageStopped`; the
CLI prints one line and exits 143 (128 + SIGTERM). The same command resumes at that step, so
nothing is redone. A second SIGTERM is not caught: it ends the process at once.

A preemption notice (Ray Train's `get_preemption_info`: a node of the run is being drained) asks
for a checkpoint but not for a stop: Ray restarts the stage when the node goes, from that
checkpoint, counting `failure.max_preemption_failures`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: Exit status of a run stopped by SIGTERM (the shell's convention for "ended by signal 15").
STOPPED_EXIT_CODE = 128 + signal.SIGTERM

_requested: str | None = None
_listeners = 0


class StageStopped(Exception):
    """Stage one stopped on request after committing a checkpoint at `step`."""

    def __init__(self, step: int, reason: str, checkpoint: str | None = None) -> None:
        super().__init__(f"{reason}: stopped at step {step}" + (f", checkpoint {checkpoint}" if checkpoint else ""))
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


def request_stop(reason: str) -> None:
    """Ask the running stage to checkpoint and stop at its next step (safe from a signal handler)."""
    global _requested
    if _requested is None:
        _requested = reason


def stop_requested() -> str | None:
    """Why this process was asked to stop, or None."""
    return _requested


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Inside, stage one polls `stop_requested` after every step, so a SIGTERM only sets the request
    (outside, the handler ends the run at once)."""
    global _listeners
    _listeners += 1
    try:
        yield
    finally:
        _listeners -= 1


@contextlib.contextmanager
def keep_handlers(*signums: int) -> Iterator[None]:
    """This process's handlers of `signums` as they were before the block, whatever the block
    installs: ray.init sets a SIGTERM handler that exits at once (and its core worker one that
    dumps a stack and aborts); Ray Train's `fit` a SIGINT handler that aborts its controller and
    stays after `fit` returns, so a later Ctrl-C (stage two) did nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in before.items():
            if handler is not None:
                signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C inside the block waits for the block's end, then raises there: a checkpoint being
    written is finished and committed rather than torn (a KeyboardInterrupt inside `torch.save`'s
    zip writer surfaces as a RuntimeError, not as the interrupt). A second Ctrl-C still ends the
    process at once. Outside the main thread, where no Ctrl-C arrives, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or previous is signal.SIG_IGN:  # installed outside Python, or ignored: leave it
        yield
        return
    pending: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if pending:  # asked twice: do not wait any longer
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def clear_stop() -> None:
    global _requested
    _requested = None


@contextlib.contextmanager
def stop_on_sigterm(what: str = "SIGTERM") -> Iterator[None]:
    """While inside, the first SIGTERM requests a graceful stop (``what`` names it) and the next one
    gets the previous handler (by default: the process ends). Outside the main thread, where Python
    cannot install handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: the default is the closest we can restore
        previous = signal.SIG_DFL

    def handler(signum: int, frame: object) -> None:
        request_stop(what)
        signal.signal(signal.SIGTERM, previous)
        if not _listeners:  # nothing polls for it here (set-up, stage two): end now, like a Ctrl-C
            raise KeyboardInterrupt(what)

    clear_stop()
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: What a rank's notice asks of stage one: nothing, a checkpoint (and go on), or a checkpoint and a stop.
NONE, CHECKPOINT, STOP = 0, 1, 2


def agree(notice: int, world_size: int) -> int:
    """The strongest notice any rank has (every rank calls this after every step: one collective, so all
    of them checkpoint and stop at the same step)."""
    if world_size <= 1:
        return notice
    import torch
    import torch.distributed as dist

    flag = torch.tensor([notice], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
