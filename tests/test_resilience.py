"""Two gloo ranks on the CPU, started the way srun starts them (one process per rank, RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, no torchrun agent that would end the job for us),
with faults injected from outside the package (tests/rank_worker.py):

- rank 0 spends longer in a single-rank step (its first budget checkpoint) than the process
  group's timeout: the other rank waits on the c10d store, not in a collective, and the run
  finishes; with the old collective barrier the same setting times out (slow test);
- one rank is killed (SIGKILL) while rank 0 works alone: the other notices within
  train.distributed.dead_rank_s (heartbeats on the store; rank 0's death also by its store
  going away), exits 75 with one line naming the dead rank, and the rerun resumes from the
  last (timed) resume state.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MULTI_RANK, multi_rank_env

from learnforget.runfolder import RunFolder
from learnforget.train.watchdog import EXIT_DEAD_RANK

WORKER = Path(__file__).parent / "rank_worker.py"
ARGS = ["train", *MULTI_RANK, "train.batch_size=2", "train.heldout_batches=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env: dict[str, str], *overrides: str, world: int = 2) -> list[subprocess.Popen]:
    """`world` ranks of `learnforget train` through tests/rank_worker.py, as srun would."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        renv = {**env, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *ARGS, *overrides], env=renv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout, stderr))
    return out


def _slow_rank0(tmp_path: Path, cache_dir: Path, experiment: str, old_barrier: bool):
    env = {**multi_rank_env(tmp_path, cache_dir), "LF_TEST_SLOW_CKPT_S": "12"}
    if old_barrier:
        env["LF_TEST_OLD_BARRIER"] = "1"
    t0 = time.monotonic()
    results = finish(launch(env, "train.distributed.timeout_min=0.1", "train.resume_every_min=0",
                            f"experiment_name={experiment}"))
    return results, time.monotonic() - t0


@pytest.mark.slow  # ~40 s on 2 busy cores
def test_a_long_rank0_step_does_not_trip_a_short_process_group_timeout(tmp_path, cache_dir):
    """Process-group timeout 6 s; rank 0 writes its first budget checkpoint 12 s late while
    rank 1 waits for it: the run finishes on both ranks."""
    results, took = _slow_rank0(tmp_path, cache_dir, "store", old_barrier=False)
    for rc, _, stderr in results:
        assert rc == 0, stderr[-3000:]
    run = next((tmp_path / "runs/store").iterdir())
    info = RunFolder(run).read_record()
    assert info.status == "finished" and info.train.ranks == 2
    assert info.train.checkpoints == ["step-000002", "step-000004"]
    assert took >= 12  # the delay did happen
    print(f"2 ranks, timeout 6 s, rank 0 alone for 12 s: finished in {took:.1f}s")


@pytest.mark.slow
def test_the_same_setting_times_out_with_a_collective_barrier(tmp_path, cache_dir):
    """The check that the test above can fail: rank 1 waiting in dist.barrier() (as before)
    hits the 6 s process-group timeout while rank 0 is still in its checkpoint."""
    results, took = _slow_rank0(tmp_path, cache_dir, "collective", old_barrier=True)
    rc1, _, stderr1 = results[1]
    assert rc1 != 0
    assert "timed out" in stderr1.lower() or "timeout" in stderr1.lower(), stderr1[-3000:]
    run = next((tmp_path / "runs/collective").iterdir())
    assert RunFolder(run).read_record().status != "finished"
    print(f"collective barrier: rank 1 failed (rc {rc1}) after {took:.1f}s")


@pytest.mark.slow  # ~30-60 s on 2 busy cores (one or two launches)
@pytest.mark.parametrize("killed", [1, 0])
def test_a_dead_rank_ends_the_job_in_bounded_time_and_the_rerun_resumes(tmp_path, cache_dir,
                                                                        killed):
    """One rank is SIGKILLed while rank 0 spends 120 s alone in a checkpoint (rank 1 waits at
    the barrier after it). Killed rank 1: rank 0 exits 75 within dead_rank_s (3 s) plus a
    heartbeat interval and slack, naming rank 1; without the watchdog it would finish its
    120 s and then wait in a collective (NCCL: the 30-minute process-group timeout). Killed
    rank 0 (the store's host): rank 1 exits 75 naming rank 0. The rerun resumes from the
    timed resume state of step 1."""
    marks, survivor = tmp_path / "marks", 1 - killed
    env = {**multi_rank_env(tmp_path, cache_dir), "LF_TEST_SLOW_CKPT_S": "120",
           "LF_TEST_MARK_DIR": str(marks)}
    overrides = ["train.distributed.dead_rank_s=3", "train.resume_every_min=0.0001",
                 "experiment_name=dead"]
    procs = launch(env, *overrides)
    try:
        deadline = time.monotonic() + 180
        while not (marks / "slow").exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.1)
        assert (marks / "slow").exists(), "rank 0 never reached its checkpoint"
        os.kill(int((marks / f"pid-{killed}").read_text()), signal.SIGKILL)
        t_kill = time.monotonic()
        procs[survivor].wait(timeout=60)
        took = time.monotonic() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = finish(procs)
    assert results[killed][0] == -signal.SIGKILL
    rc, _, stderr = results[survivor]
    assert rc == EXIT_DEAD_RANK, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if "is dead" in x]
    assert len(lines) == 1 and f"rank {killed} of 2 is dead" in lines[0], stderr[-3000:]
    assert took <= 3 + 12, took  # dead_rank_s, then at most an interval and slack
    if killed == 1:
        assert took >= 3  # rank 0 noticed by the missing heartbeat, nothing sooner
    print(f"rank {survivor} exited {took:.1f}s after rank {killed} was killed "
          f"(dead_rank_s=3): {lines[0]}")

    run = next((tmp_path / "runs/dead").iterdir())
    assert RunFolder(run).read_record().status == "running"  # died mid-run
    if killed == 0:
        return
    results = finish(launch(multi_rank_env(tmp_path, cache_dir), *overrides))
    for rc, _, stderr in results:
        assert rc == 0, stderr[-3000:]
    assert f"resuming {run.name} from step 1" in results[0][1], results[0][1][-2000:]
    info = RunFolder(run).read_record()
    assert info.status == "finished" and info.train.steps_done == 4


# ------------------------------------------------------------------ in one process (fast)

def _store(world: int = 2):
    from datetime import timedelta

    import torch.distributed as dist

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=10))

    def connect():
        return dist.TCPStore("127.0.0.1", port, world, is_master=False,
                             timeout=timedelta(seconds=10))

    return server, connect


class _Recording:
    """Watchdog.die without the os._exit: the dead rank it named, and when."""

    def __init__(self, dog):
        self.dead: list[tuple[int, float]] = []
        dog.die = lambda r, **_: (self.dead.append((r, time.monotonic())), dog.stopped.set())


def test_the_watchdog_names_a_rank_that_stopped_heartbeating():
    """Rank 0's watchdog on a real TCPStore: rank 1 heartbeats, then stops without leaving
    (a crash): rank 0 names it dead after dead_after_s (0.6 s), give or take an interval."""
    from learnforget.train.watchdog import Watchdog

    _server, connect = _store()
    zero = Watchdog(connect, 0, 2, 0.6, "t1")
    one = Watchdog(connect, 1, 2, 0.6, "t1")
    seen = _Recording(zero)
    zero.start(), one.start()
    time.sleep(1.0)
    assert seen.dead == []  # both alive for longer than dead_after_s
    one.abandon()
    stopped = time.monotonic()
    deadline = stopped + 5
    while not seen.dead and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r for r, _ in seen.dead] == [1]
    assert 0.6 - 0.2 <= seen.dead[0][1] - stopped <= 0.6 + 3 * zero.interval


def test_a_rank_that_left_cleanly_is_not_dead():
    from learnforget.train.watchdog import Watchdog

    _server, connect = _store()
    zero = Watchdog(connect, 0, 2, 0.6, "t2")
    one = Watchdog(connect, 1, 2, 0.6, "t2")
    seen = _Recording(zero)
    zero.start(), one.start()
    time.sleep(0.3)
    one.done()
    time.sleep(1.5)
    assert seen.dead == []
    zero.done()  # rank 0 waits for the others' `done`: there already


def test_only_the_outermost_training_leaves_the_job(monkeypatch):
    """train() nests for cooldown branches: a branch ending is not the rank leaving; a raise at
    any depth stops the heartbeat."""
    from learnforget.train import distributed

    calls: list[str] = []

    class Dog:
        def done(self):
            calls.append("done")

        def abandon(self):
            calls.append("abandon")

    monkeypatch.setattr(distributed, "_JOB", distributed._Job(None, 1.0, Dog()))
    with distributed.session():
        with distributed.session():
            pass
        assert calls == []
    assert calls == ["done"]
    with pytest.raises(ValueError), distributed.session(), distributed.session():
        raise ValueError
    assert calls == ["done", "abandon", "abandon"]


@pytest.mark.parametrize("key,value", [("timeout_min", 0), ("timeout_min", "soon"),
                                       ("wait_min", -1), ("dead_rank_s", -5)])
def test_a_bad_distributed_setting_is_one_config_error(key, value):
    from learnforget.errors import ConfigError
    from learnforget.train.distributed import setting

    with pytest.raises(ConfigError, match=f"train.distributed.{key}="):
        setting({key: value}, key, 1.0, zero_ok=key == "dead_rank_s")
    assert setting({}, key, 7.0) == 7.0
