"""SIGTERM and SIGINT ask a run to stop after its current optimizer step, with a checkpoint to resume from.

    with graceful_stop():
        ...                                   # the training loop
        if stop_requested(accelerator): ...   # once per optimizer step, on every process

The handler only records the signal, so a step, an evaluation or a checkpoint save in progress finishes.
A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once; checkpoints are atomic, so the previous one
stays loadable. Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


def _record(signum: int, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt
    _received.append(signum)


@contextlib.contextmanager
def graceful_stop():
    """Record SIGTERM and SIGINT instead of dying, for the duration of the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


def received() -> int | None:
    """The first stop signal this process received, if any."""
    return _received[0] if _received else None


def stop_requested(accelerator) -> int | None:
    """The stop signal received by any process (the largest number), agreed by all of them; None to go on.

    Every process must call this at the same point of every step: a signal that reached one rank only
    (a node drained, a local Ctrl-C) stops all of them after the same step, so none waits forever in a
    collective the others have left."""
    local = received() or 0
    if accelerator.num_processes == 1:
        return local or None
    flag = torch.tensor([local], dtype=torch.int64, device=accelerator.device)
    agreed = int(accelerator.reduce(flag, "max").item())
    return agreed or None


def exit_code(signum: int) -> int:
    """128 + the signal number, the shell's status for a process ended by it: 143 SIGTERM, 130 SIGINT."""
    return 128 + signum
