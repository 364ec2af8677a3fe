"""A `learnforget` process for the multi-rank fault tests (tests/test_resilience.py,
tests/test_dead_rank_slurm.py): the real CLI, with faults injected from outside the package.

    python tests/rank_worker.py train ...

Environment: LF_TEST_SLOW_CKPT_S: rank 0's first budget checkpoint starts only after this many
seconds (work one rank does alone); LF_TEST_MARK_DIR: each rank writes `pid-<rank>` there, and
rank 0 writes `slow` as its slow checkpoint starts; LF_TEST_OLD_BARRIER=1: barriers are plain
collectives (dist.barrier, the behaviour before the store-based barrier) to show what it did.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import learnforget.train.loop as loop
from learnforget.cli import main
from learnforget.train import distributed

rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
marks = Path(os.environ["LF_TEST_MARK_DIR"]) if os.environ.get("LF_TEST_MARK_DIR") else None
if marks is not None:
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"pid-{rank}").write_text(str(os.getpid()))

delay = float(os.environ.get("LF_TEST_SLOW_CKPT_S") or 0)
if delay:
    original, calls = loop.save_checkpoint, []

    def slow_checkpoint(*args, **kwargs):
        if not calls:
            if marks is not None:
                (marks / "slow").write_text(str(time.time()))
            time.sleep(delay)
        calls.append(1)
        return original(*args, **kwargs)

    loop.save_checkpoint = slow_checkpoint

if os.environ.get("LF_TEST_OLD_BARRIER"):
    import torch.distributed as dist

    def collective_barrier(d):
        if d.world > 1:
            dist.barrier()

    distributed.barrier = collective_barrier

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
