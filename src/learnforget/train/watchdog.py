"""A dead rank ends its job in bounded time (``train.distributed.dead_rank_s``).

When one rank of a data-parallel job dies (OOM kill, GPU error, a Python exception, kill -9),
the others would wait in their next collective until the process-group timeout (NCCL does not
notice a peer's death; gloo notices only on a direct connection). Here every rank runs a
daemon thread that heartbeats on the job's c10d TCPStore (the one torch's env:// rendezvous
made, through its own client connection so that a long blocking store call of the main
thread never delays it): rank 0 watches every rank, the other ranks watch rank 0. A rank whose
heartbeat has not moved for ``dead_rank_s`` seconds is dead: the watcher prints one line naming
it and ends its own process with exit code 75 (``os._exit``: a main thread blocked inside a
collective cannot be interrupted, which is also what NCCL's async error handling does). Rank 0
first publishes the dead rank's number so the other ranks end with the same line; a rank that
loses rank 0's store (rank 0 died) names rank 0. A rerun or requeue resumes from the last
resume state. Ranks that leave cleanly (``done``) are no longer watched; a rank whose training
raised stops heartbeating at once, so the others end without waiting for the collective
timeout. Heartbeats are cheap (one store ``add`` per interval per rank, rank 0 reads the others).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

EXIT_DEAD_RANK = 75  # EX_TEMPFAIL: the job can be rerun (it resumes)


def interval_s(dead_after_s: float) -> float:
    """How often a rank heartbeats and checks the others: a sixth of the dead time, 0.1-5 s."""
    return min(5.0, max(0.1, dead_after_s / 6))


class Watchdog:
    """The heartbeat thread of one rank. `connect()` returns a fresh store client (its own TCP
    connection to the job's store); `prefix` keeps the keys of one launch apart."""

    def __init__(self, connect, rank: int, world: int, dead_after_s: float, prefix: str):
        self.rank, self.world, self.dead_after_s = rank, world, float(dead_after_s)
        self.prefix, self.interval = prefix, interval_s(dead_after_s)
        self.store = connect()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="learnforget-watchdog", daemon=True)

    def key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def start(self) -> Watchdog:
        self.store.add(self.key("hb", self.rank), 1)
        self.thread.start()
        return self

    def watched(self) -> list[int]:
        return list(range(1, self.world)) if self.rank == 0 else [0]

    def _run(self) -> None:
        now = time.monotonic()
        last = {r: (-1, now) for r in self.watched()}  # rank -> (heartbeat count, when it moved)
        seen_done_0 = False
        while not self.stopped.wait(self.interval):
            try:
                self.store.add(self.key("hb", self.rank), 1)
                if self.rank != 0 and self.store.check([self.key("dead")]):
                    self.die(int(self.store.get(self.key("dead")).decode()), published=True)
                now = time.monotonic()
                for r, (count, moved) in list(last.items()):
                    if self.store.check([self.key("done", r)]):
                        seen_done_0 |= r == 0
                        del last[r]
                        continue
                    beat = int(self.store.add(self.key("hb", r), 0))
                    if beat != count:
                        last[r] = (beat, now)
                    elif now - moved > self.dead_after_s:
                        self.die(r)
            except Exception as e:  # the store is gone: rank 0, its host, has ended
                if self.stopped.is_set() or seen_done_0 or self.rank == 0:
                    return
                self.die(0, why=f"its store stopped answering: {type(e).__name__}")

    def die(self, dead: int, published: bool = False, why: str | None = None) -> None:
        why = why or ("rank 0 found it dead" if published else
                      f"no heartbeat for {self.dead_after_s:g}s, train.distributed.dead_rank_s")
        print(f"learnforget: error: rank {dead} of {self.world} is dead ({why}); rank "
              f"{self.rank} ends the job (exit {EXIT_DEAD_RANK}): rerun or requeue it to resume "
              "from the last resume state", file=sys.stderr, flush=True)
        if self.rank == 0:
            try:  # the other ranks read it before rank 0's store goes away with this process
                self.store.set(self.key("dead"), str(dead))
                time.sleep(2 * self.interval)
            except Exception:
                pass
        os._exit(EXIT_DEAD_RANK)

    def done(self) -> None:
        """This rank left the job cleanly: the others stop watching it. Rank 0 (the store's
        host) then waits, at most dead_rank_s, until the other ranks have left too, so that none
        mistakes its ending for a death."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.store.set(self.key("done", self.rank), "1")
            if self.rank == 0 and self.world > 1:
                self.store.wait([self.key("done", r) for r in range(1, self.world)],
                                timedelta(seconds=self.dead_after_s))
        except Exception:
            pass

    def abandon(self) -> None:
        """This rank failed: stop heartbeating (without `done`), so the others end soon."""
        self.stopped.set()
