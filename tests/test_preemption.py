"""How a SLURM job hands a stop signal on (issue 29, item 5; the cluster test is
test_preemption_slurm.py). Submitit's USR2 (a pre-emption with --signal, a time limit) asks
submitit to requeue the job; a bare SIGTERM comes from SLURM itself (scontrol requeue, scancel,
a pre-emption without the user signal), which requeues the job when it means to: asking
submitit to requeue it again fails (`scontrol requeue` exits 1 on a job being requeued) and
that failure became the job's result while SLURM ran it again, so the sweep reported a job
failed that later finished. Now the process exits 143 with no result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os, signal, sys
from learnforget.train.signals import StopSignals
from learnforget.studies.job import _hand_interrupt_to_submitit
from learnforget.private_api import requeue_signal
usr = requeue_signal()
def submitit_handler(signum, frame):   # what submitit installs: checkpoint and requeue
    print("submitit requeues the job", flush=True)
    sys.exit(0)
signal.signal(usr, submitit_handler)
with StopSignals():
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
_hand_interrupt_to_submitit()
print("returned", flush=True)
"""


@pytest.mark.parametrize(("sig", "code", "said"), [
    ("SIGTERM", 143, "SIGTERM from SLURM"),
    ("SIGUSR2", 0, "submitit requeues the job"),
])
def test_sigterm_leaves_the_requeue_to_slurm_and_usr2_goes_to_submitit(sig, code, said):
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm"}
    p = subprocess.run([sys.executable, "-c", CHILD, sig], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == code, p.stdout + p.stderr
    assert said in p.stdout and "returned" not in p.stdout
    if sig == "SIGTERM":
        assert "submitit requeues" not in p.stdout
