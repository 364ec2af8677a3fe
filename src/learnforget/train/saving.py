"""When the train loop saves its resume state, and how: at budget and branch points, on a stop
signal, and every ``train.resume_every_min`` minutes between them (0: off), so that a crash
(GPU error, OOM kill, a dead node: none of them sends a stop signal first) loses at most that
interval, not the hours to the last budget.

All ranks must save at the same step: rank 0's clock decides, and its verdict rides on the
all-reduce the loop does every step anyway for stop signals (one number, the max over ranks:
2 = a stop signal somewhere, 1 = rank 0 says a timed save is due).

A timed save does not hold training up longer than copying the state: in one process and in
DDP (rank 0 saves alone) the trainable weights, optimizer state, schedule and RNG are copied
to the CPU at the step boundary and written (atomically: a temporary file, renamed) by a
background thread while training goes on; the next save, and the run's end, first wait for it.
With FSDP every rank writes its shards: torch.distributed.checkpoint.async_save would overlap
that too, but it needs a CPU process group for its background collectives and its completion
(the shard folder's rename and resume.pt) ordered after every rank's write; the timed FSDP save
is synchronous (torch.distributed.checkpoint.save, as at budgets), which the run notes. A
kill during a background write leaves the previous resume state in place (the write is
atomic): the resume then starts from that one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.train import distributed
from learnforget.train.distributed import Dist
from learnforget.train.run_state import resume_state, save_resume, write_resume

STOP, TIMED = "stop", "timed"


def resume_every_s(t: Any) -> float:
    """train.resume_every_min in seconds (0: no timed saves); a ConfigError when not >= 0."""
    value = t.get("resume_every_min", 0)
    try:
        minutes = float(0 if value is None else value)
    except (TypeError, ValueError):
        minutes = -1.0
    if not minutes >= 0:
        raise ConfigError(f"train.resume_every_min={value!r} is not valid (expected minutes >= 0;"
                          " 0: save resume state only at budgets and on stop signals)")
    return 60.0 * minutes


def heldout_every(t: Any) -> int:
    """train.heldout_every: steps between held-out losses besides the checkpoints (0: off)."""
    value = t.get("heldout_every", 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"train.heldout_every={value!r} is not valid (expected steps >= 0; "
                          "0: the held-out loss only at checkpoints)")
    return value


class ResumeSaver:
    """The resume saves of one run (every save resets rank 0's clock)."""

    def __init__(self, every_s: float, d: Dist, sharded: bool):
        self.every_s, self.d, self.sharded = every_s, d, sharded
        self.last = time.monotonic()
        self.pending: Future | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.timed_saves = 0

    def decide(self, stop_signal: str | None, step: int, last_step: int) -> str | None:
        """STOP, TIMED or None for this step boundary, the same on every rank (a collective)."""
        due = (self.d.main and self.every_s > 0 and step < last_step
               and time.monotonic() - self.last >= self.every_s)
        code = distributed.all_reduce(2.0 if stop_signal else 1.0 if due else 0.0, self.d, "max")
        return STOP if code >= 2 else TIMED if code >= 1 else None

    def save(self, path: Path, model, optimizer, scheduler, progress: dict[str, Any],
             background: bool = False) -> None:
        """The resume state into `path` (ranks that take part call this: rank 0, or every rank
        with FSDP). `background`: copy now, write in a thread (not for FSDP, see above)."""
        self.wait()
        self.last = time.monotonic()
        if not background or self.sharded:
            save_resume(path, model, optimizer, scheduler, progress, self.d)
            return
        state = resume_state(model, optimizer, scheduler, progress, snapshot=True)
        self.pool = self.pool or ThreadPoolExecutor(1, thread_name_prefix="learnforget-resume")
        self.pending = self.pool.submit(write_resume, path, state)

    def timed(self, path: Path, model, optimizer, scheduler, progress: dict[str, Any]) -> None:
        self.timed_saves += 1
        self.save(path, model, optimizer, scheduler, progress, background=True)

    def wait(self) -> None:
        """Until the background write (if any) is on disk; its error, if it failed."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
                self.pool = None
