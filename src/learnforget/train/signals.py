"""Stop signals while a run trains: SLURM's pre-emption (SIGTERM, SIGUSR1, SIGUSR2) makes the
loop save its state and stop at the next step boundary; afterwards the signal goes on to the
handler that was there before (a job framework's: submitit requeues the job)."""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_RECEIVED: list[str] = []  # every stop signal this process received while training, by name


def received_stop_signals() -> list[str]:
    """The stop signals (names) this process received while training, in order."""
    return list(_RECEIVED)


class StopSignals:
    """While training: SIGTERM, SIGUSR1, SIGUSR2 ask the loop to save and stop at the next
    step boundary (SLURM's pre-emption). The previous handlers come back on exit."""

    def __init__(self):
        self.signal: str | None = None
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name
        _RECEIVED.append(self.signal)
        if signum not in self.received:
            self.received.append(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def pass_on(self) -> None:
        pass_on_signals(self.received, self.previous)


def pass_on_signals(received: list[int], previous: dict[int, Any]) -> None:
    """After an interrupted run is saved, give each stop signal to the handler that was installed
    before train() took it over: a job framework's handler (submitit's USR2 handler checkpoints
    the job, requeues it with `scontrol requeue` and exits, so the requeued job resumes this run).
    Default and ignored dispositions are left alone: a plain run just returns "interrupted"."""
    for signum in received:
        handler = previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, None)
