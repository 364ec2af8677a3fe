"""Locks on cluster file systems (learnforget.locks): where flock raises (Lustre noflock) or
excludes one node only (Lustre localflock, NFS local_lock), found from a fake mount table or
from flock's error, the lock is an O_EXCL lock file. Each exclusion check uses a second real
process; takeover of a stale holder (heartbeat too old, dead process on this host, the same
SLURM job before a requeue) and its serialisation (one winner among racing processes)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from learnforget import locks
from learnforget.errors import ConfigError
from learnforget.runfolder import RunFolder, RunLock

SRC = Path(locks.__file__).resolve().parents[1]

LUSTRE = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 0:55 / {root} rw,relatime shared:40 - lustre 10.0.0.1@o2ib:/scratch rw,{lock},lazystatfs
"""
# /proc/mounts form, NFS with local flock locks
NFS = "nfs01:/home {root} nfs4 rw,relatime,vers=4.2,local_lock={local},addr=10.0.0.2 0 0\n"

# a second process: optional fake mount table / flock raising ENOSYS / another host name,
# then try_lock on argv[1]; prints "held" or "busy" and holds the lock until stdin closes
HOLDER = r"""
import errno, fcntl, socket, sys
from pathlib import Path
from learnforget import locks
args = dict(a.split("=", 1) for a in sys.argv[2:])
if "table" in args:
    locks.MOUNTINFO = Path(args["table"])
if "noflock" in args:
    def flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    locks.fcntl.flock = flock
if "host" in args:
    socket.gethostname = lambda: args["host"]
lock = locks.try_lock(Path(sys.argv[1]))
print("held" if lock else "busy", lock.kind if lock else "", flush=True)
sys.stdin.read()
if lock:
    lock.release()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (locks.LOCK_ENV, "SLURM_JOB_ID")}
    return {**env, "PYTHONPATH": str(SRC), **extra}


def _holder(path: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """A second process trying the lock: (the process, its first line)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), *args], env=_env(**env),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def _stop(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(timeout=30)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(locks.LOCK_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    locks._FALLBACK.clear()
    yield
    locks._FALLBACK.clear()


def _noflock(monkeypatch) -> list[int]:
    calls = []

    def flock(fd, op):
        calls.append(op)
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(locks.fcntl, "flock", flock)
    return calls


# ----------------------------------------------------------------------------- mount table

def test_mount_table_decides_the_lock_kind(tmp_path, monkeypatch):
    table = tmp_path / "mountinfo"
    root = tmp_path / "scratch"
    (root / "runs").mkdir(parents=True)
    monkeypatch.setattr(locks, "MOUNTINFO", table)
    expect = {"flock": "flock", "localflock": "file", "noflock": "file"}
    for opt, kind in expect.items():
        table.write_text(LUSTRE.format(root=root, lock=opt))
        m = locks.mount_of(root / "runs" / "exp" / "new-run")  # not created yet: its parent's
        assert (m.point, m.fstype) == (str(root), "lustre")
        assert locks.lock_kind(root / "runs/x/.lock")[0] == kind, opt
        assert locks.lock_kind(tmp_path / "elsewhere")[0] == "flock"  # ext4 at /
    for local, kind in (("none", "flock"), ("flock", "file"), ("all", "file")):
        table.write_text(NFS.format(root=root, local=local))
        k, why = locks.lock_kind(root / "runs/.lock")
        assert k == kind and (local in why if kind == "file" else why == ""), (local, why)
    for fstype, opt in (("nfs", "nolock"), ("gfs2", "localflocks"), ("beegfs", "rw")):
        assert locks.flock_is_global(locks.Mount("/x", fstype, frozenset({"rw", opt})))[0] is False
    for fstype in ("ext4", "xfs", "ceph", "gpfs", "tmpfs"):
        assert locks.flock_is_global(locks.Mount("/x", fstype, frozenset({"rw"}))) == (True, "")


def test_env_forces_the_lock_and_a_bad_value_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(locks.LOCK_ENV, "file")
    assert locks.lock_kind(tmp_path)[0] == "file"
    monkeypatch.setenv(locks.LOCK_ENV, "posix")
    with pytest.raises(ConfigError, match="LEARNFORGET_LOCK='posix'.*expected auto, flock or "):
        locks.lock_kind(tmp_path)


# ----------------------------------------------------------------------------- exclusion

def test_noflock_mount_falls_back_and_excludes_a_second_process(tmp_path, monkeypatch):
    calls = _noflock(monkeypatch)
    path = tmp_path / "run" / ".lock"
    lock = locks.try_lock(path)
    assert calls and lock is not None and lock.kind == "file"
    assert "ENOSYS" in lock.reason and (tmp_path / "run/.lock.excl").exists()
    p, line = _holder(path, "noflock=1")
    assert line == "busy"
    _stop(p)
    assert locks.is_locked(path)
    lock.release()
    assert not (tmp_path / "run/.lock.excl").exists() and not locks.is_locked(path)
    p, line = _holder(path, "noflock=1")
    assert line == "held file"  # released: the second process takes it
    assert locks.try_lock(path) is None  # and now excludes this one
    _stop(p)
    assert locks.try_lock(path) is not None


def test_localflock_mount_uses_the_lock_file_across_processes(tmp_path, monkeypatch):
    """On localflock flock would "work" on one node; the mount table sends it to the lock file,
    which a process on another node (another host name) sees as held."""
    table = tmp_path / "mountinfo"
    root = tmp_path / "scratch"
    root.mkdir()
    table.write_text(LUSTRE.format(root=root, lock="localflock"))
    monkeypatch.setattr(locks, "MOUNTINFO", table)
    folder = RunFolder(root / "exp" / "run")
    run_lock = RunLock(folder)
    assert run_lock.acquire()
    assert "lock file with a heartbeat" in run_lock.note and "localflock" in run_lock.note
    p, line = _holder(folder.lock_path, f"table={table}", "host=node-b")
    assert line == "busy"
    _stop(p)
    run_lock.release()
    p, line = _holder(folder.lock_path, f"table={table}", "host=node-b")
    assert line == "held file"
    assert folder.locked() and not RunLock(folder).acquire()
    _stop(p)
    assert not folder.locked()


def test_file_lock_waits_for_the_holder(tmp_path):
    path = tmp_path / ".prepare.lock"
    env = {locks.LOCK_ENV: "file"}
    p, line = _holder(path, **env)
    assert line == "held file"
    waiter = subprocess.Popen(
        [sys.executable, "-c", "import sys; from learnforget import locks; "
         "locks.WAIT_POLL_S = 0.05\nwith locks.file_lock(sys.argv[1]): print('in')", str(path)],
        env=_env(**env), stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting
    _stop(p)
    assert waiter.communicate(timeout=30)[0].strip() == "in"


# ----------------------------------------------------------------------------- takeover

def _plant(path: Path, host: str, pid: int, job: str = "-", age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{host} {pid} {job} {time.time():.0f} deadbeef\n")
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_stale_holders_are_taken_over_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(locks.LOCK_ENV, "file")
    path = tmp_path / ".lock"
    excl = tmp_path / ".lock.excl"
    _plant(excl, "node-b", 4242, age_s=locks.STALE_S - 30)  # another node, fresh heartbeat
    assert locks.try_lock(path) is None and locks.is_locked(path)
    _plant(excl, "node-b", 4242, age_s=locks.STALE_S + 30)  # its heartbeat stopped
    assert not locks.is_locked(path)
    lock = locks.try_lock(path)
    assert lock is not None and "heartbeat" in lock.reason and "node-b" in lock.reason
    lock.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket
    _plant(excl, socket.gethostname(), int(dead))  # this host, process gone: at once
    lock = locks.try_lock(path)
    assert lock is not None and f"process {dead}" in lock.reason
    lock.release()

    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a requeued job finds its earlier run's lock
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _plant(excl, "node-b", 4242, job="77.1")  # the same run of the job: held
    assert locks.try_lock(path) is None
    _plant(excl, "node-b", 4242, job="78.0")  # another job: held
    assert locks.try_lock(path) is None
    _plant(excl, "node-b", 4242, job="77.0")  # before the requeue: SLURM killed it
    lock = locks.try_lock(path)
    assert lock is not None and "requeue" in lock.reason
    assert excl.read_text().split()[2] == "77.1"
    lock.release()


def test_heartbeat_keeps_a_live_lock_and_a_killed_holder_is_taken_over(tmp_path, monkeypatch):
    """A holder on "another node" refreshes its lock every 0.1 s; while it lives a 1 s stale
    limit never fires; SIGKILLed, its lock is taken over once 1 s passed, not before."""
    monkeypatch.setenv(locks.LOCK_ENV, "file")
    monkeypatch.setattr(locks, "STALE_S", 1.0)
    path = tmp_path / ".lock"
    script = HOLDER.replace("from learnforget import locks",
                            "from learnforget import locks\nlocks.HEARTBEAT_S = 0.1")
    p = subprocess.Popen([sys.executable, "-c", script, str(path), "host=node-b"],
                         env=_env(**{locks.LOCK_ENV: "file"}), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held file"
    for _ in range(6):
        time.sleep(0.3)
        assert locks.try_lock(path) is None  # kept alive past STALE_S by the heartbeat
    p.kill()
    p.wait()
    killed = time.time()
    assert locks.try_lock(path) is None  # the heartbeat is still recent
    while (lock := locks.try_lock(path)) is None:
        assert time.time() - killed < 10
        time.sleep(0.05)
    assert time.time() - killed >= 0.5 and "node-b" in lock.reason
    lock.release()


def _race(path, i, q, barrier):
    """Process i reads the stale holder, waits for all to have read it, then i x 0.15 s more
    before trying to take over: the later ones come after the first has taken it (they must
    re-read the holder and back off)."""
    os.environ[locks.LOCK_ENV] = "file"
    read = locks.Holder.read
    first = [True]

    def slow_read(p):
        h = read(p)
        if first[0]:
            first[0] = False
            barrier.wait()
            time.sleep(0.15 * i)
        return h
    locks.Holder.read = staticmethod(slow_read)
    lock = locks.try_lock(path)
    q.put(1 if lock else 0)
    time.sleep(1.0)  # hold it while the others try
    if lock:
        lock.release()


def test_one_winner_among_processes_racing_for_a_stale_lock(tmp_path):
    excl = tmp_path / ".lock.excl"
    ctx = get_context("fork")
    for _ in range(2):
        _plant(excl, "node-b", 4242, age_s=1000)
        q, barrier = ctx.Queue(), ctx.Barrier(4)
        procs = [ctx.Process(target=_race, args=(tmp_path / ".lock", i, q, barrier))
                 for i in range(4)]
        for pr in procs:
            pr.start()
        wins = [q.get(timeout=30) for _ in procs]
        for pr in procs:
            pr.join(30)
        assert sum(wins) == 1, wins
        assert not excl.exists()  # released by the winner
        assert not (tmp_path / ".lock.excl.break").exists()


def test_a_run_trains_under_the_lock_file_and_says_so(make_cfg, monkeypatch):
    from learnforget.train.loop import train

    monkeypatch.setenv(locks.LOCK_ENV, "file")
    out = train(make_cfg("method=lora", "method.r=4"))
    rec = RunFolder(out).read_record()
    assert rec.status == "finished"
    assert any("run lock: .lock.excl" in n and "LEARNFORGET_LOCK=file" in n
               for n in rec.train.notes), rec.train.notes
    assert not (out / ".lock.excl").exists()  # released
