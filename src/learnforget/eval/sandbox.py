"""Run untrusted (model-written) Python in a sandbox, and HumanEval's pass@k. This is the parent
side (isolation probe, launch, clean-up); the sandbox's own first process is `sandbox_child`.

HumanEval is scored by running each completion against the problem's tests. The code is
untrusted, so nothing runs without the explicit opt-in `eval.allow_code_execution=true`
(`require_opt_in`), and every program runs in `run_in_sandbox`:

* a separate process (`sys.executable -I`: isolated mode, no user site, no PYTHON* variables)
  with a minimal environment, stdin from /dev/null, stdout/stderr to private files (last 2000
  characters kept), and a wall-clock timeout after which its whole process group is killed;
* resource limits in the program's process: RLIMIT_CPU (seconds, then SIGKILL), RLIMIT_AS
  (memory), RLIMIT_FSIZE (largest file it may write), RLIMIT_NPROC (processes), no core files;
* a fresh temporary directory as cwd, HOME and TMPDIR, deleted afterwards.

Where the OS allows it (probed once per process, then cached; see `isolation_info`):

* `unshare --net --mount --pid --fork --kill-child --mount-proc` (with `--map-root-user` when
  not root): no network (a new network namespace has only a loopback device, and it is down),
  a private view of the mounts, and a process namespace whose processes all die with it;
* in that mount namespace every mount is remounted read-only and nosuid, and only the working
  directory is bound read-write on top: a write anywhere else fails (EROFS), root or not;
* when the harness runs as root, the program runs as a fresh unprivileged uid (a random one
  per run, so RLIMIT_NPROC, which counts per uid, contains a fork bomb to this one run, and no
  two runs can signal each other), with no supplementary groups. Python's own files must stay
  readable for it: directories it cannot enter (a pyenv under a 0700 /root) are covered, in the
  mount namespace only, by a small tmpfs that holds just those files;
* always: no capabilities (bounding set emptied too, so the root of a user namespace cannot
  remount anything writable) and no_new_privs (no setuid programs).

Where a mechanism is missing the run goes on without it and says so: `SandboxResult.
network_isolated` is False without a network namespace, and without the read-only mount view a
Python-level guard (an audit hook) refuses writes outside the working directory, starting other
programs and ctypes; a program left running as root (no fresh uid possible) may not fork
either, as RLIMIT_NPROC does not bind root. The guard is a second line only.

After every run all processes of the run are killed and waited for: its process group, its pid
namespace, and its uid (when it had its own).

`check_completion` keeps no state but the cached probe, so it can run from a thread pool.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from learnforget.errors import ConfigError

OPT_IN_SETTING = "eval.allow_code_execution=true"
TAIL_CHARS = 2000
# The program travels to the sandbox on the command line up to this size, else in a file.
_ARGV_PROGRAM_MAX = 100_000
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
_UID_RANGE = (1_600_000_000, 2_000_000_000)  # fresh uids for runs as root (no passwd entry)
# The sandbox's first process imports this module from where the harness has it (isolated
# mode ignores PYTHONPATH), then takes that directory off sys.path again.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CHILD_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); import learnforget.eval.sandbox_child as s; "
               "del sys.path[0]; s.child_main(sys.argv[2:])")
_UNSHARE_FULL = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "killed"
    returncode: int | None  # exit code, or -signal when killed; None on timeout
    stdout: str  # last 2000 characters
    stderr: str  # last 2000 characters
    wall_s: float
    network_isolated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class CodeExecutionNotAllowed(ConfigError):
    """Running model-generated code was not explicitly allowed."""


def require_opt_in(allowed: bool) -> None:
    """Raise CodeExecutionNotAllowed unless `allowed`."""
    if allowed is not True:
        raise CodeExecutionNotAllowed(
            "HumanEval scoring runs model-generated code (in a sandbox), which needs an "
            f"explicit opt-in: set {OPT_IN_SETTING} to allow it")


# ----------------------------------------------------------------------------- isolation probe

@dataclass(frozen=True)
class _Isolation:
    prefix: tuple[str, ...] = ()  # the unshare command line, () for none
    userns: bool = False  # --map-root-user: no uid change inside
    mount: bool = False
    pidns: bool = False
    net: bool = False


_NO_ISOLATION = _Isolation()
_probe_lock = threading.Lock()
_probed: tuple[_Isolation, dict] | None = None  # the one piece of module state


def _candidates() -> list[_Isolation]:
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    userns = os.geteuid() != 0
    extra = ("--map-root-user",) if userns else ()
    options = [_UNSHARE_FULL, ("--net", "--mount"), ("--net",)]
    return [_Isolation(prefix=(unshare, *opts, *extra), userns=userns, mount="--mount" in opts,
                       pidns="--pid" in opts, net=True) for opts in options]


def _probe() -> tuple[_Isolation, dict]:
    """The strongest isolation that works here, and what a program got under it: a trivial
    program runs through each candidate until one delivers what it promises. Once per process."""
    global _probed
    with _probe_lock:
        if _probed is None:
            for iso in [*_candidates(), _NO_ISOLATION]:
                try:
                    res, report = _run("pass", iso=iso, timeout_s=20.0, memory_mb=256,
                                       max_processes=4, max_file_mb=1)
                except OSError:
                    continue
                setup = report.get("setup", {})
                if iso is _NO_ISOLATION or (
                        res.passed and setup.get("net_isolated") is True
                        and setup.get("fs_readonly") is iso.mount):
                    _probed = (iso, setup)
                    break
        return _probed


def isolation_info() -> dict:
    """What a sandboxed program gets on this machine (runs the probe once): for logs, reports
    and tests."""
    iso, setup = _probe()
    fresh_uid = bool(setup.get("fresh_uid"))
    return {
        "unshare": " ".join(iso.prefix) or None,
        "network_isolated": bool(setup.get("net_isolated")),
        "readonly_filesystem": bool(setup.get("fs_readonly")),  # else the Python-level guard
        "pid_namespace": iso.pidns,
        "fresh_uid": fresh_uid,
        # RLIMIT_NPROC binds the run alone under its own uid or user namespace; a root
        # process is exempt from it.
        "process_limit": fresh_uid or iso.userns or os.geteuid() != 0,
        "notes": list(setup.get("errors", [])),
    }


# ----------------------------------------------------------------------------- running

def run_in_sandbox(program: str, *, allowed: bool, timeout_s: float = 10.0, memory_mb: int = 1024,
                   max_processes: int = 16, max_file_mb: int = 16) -> SandboxResult:
    """Run `program` (Python source) with sys.executable -I (isolated mode) in the sandbox."""
    require_opt_in(allowed)
    if not isinstance(program, str):
        raise ConfigError(f"program must be Python source (str), got {type(program).__name__}")
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb),
                        ("max_processes", max_processes), ("max_file_mb", max_file_mb)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"sandbox {name} must be a positive number, got {value!r}")
    result, _ = _run(program, iso=_probe()[0], timeout_s=float(timeout_s), memory_mb=int(memory_mb),
                     max_processes=int(max_processes), max_file_mb=int(max_file_mb))
    return result


def _run(program: str, *, iso: _Isolation, timeout_s: float, memory_mb: int, max_processes: int,
         max_file_mb: int) -> tuple[SandboxResult, dict]:
    root = os.geteuid() == 0
    uid = (_UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])
           if root and not iso.userns else None)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="learnforget_sbx_"))
    report_r, report_w = os.pipe()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        program_file = None
        if "\x00" in program or len(program.encode("utf-8", "surrogatepass")) > _ARGV_PROGRAM_MAX:
            # a NUL byte cannot travel in argv; Python then reports it as a SyntaxError
            program_file = os.path.join(workdir, "program.py")
            with open(program_file, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(program)
        cfg = {
            "workdir": workdir,
            "uid": uid,
            "mount": iso.mount,
            "net": iso.net,
            "userns": iso.userns,
            "report_fd": report_w,
            "program_file": program_file,
            "cpu_s": math.ceil(timeout_s) + 1,
            "memory_bytes": memory_mb * 1024 * 1024,
            "fsize_bytes": max_file_mb * 1024 * 1024,
            # RLIMIT_NPROC counts per uid: exact with a fresh uid, or in a user namespace
            # (Linux >= 5.14 counts there); otherwise on top of the user's other processes.
            "nproc": max_processes if (uid is not None or iso.userns or root)
            else max_processes + _count_processes_of(os.getuid()),
        }
        cmd = [*iso.prefix, sys.executable, "-I", "-c", _CHILD_BOOT, _PACKAGE_PARENT,
               json.dumps(cfg), "" if program_file else program]
        env = {"PATH": _MINIMAL_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=workdir, env=env, start_new_session=True,
                                        pass_fds=(report_w,))
            finally:
                os.close(report_w)
                report_w = -1
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            wall_s = time.monotonic() - t0
            pidns = _pid_ns_of_children(proc.pid) if (timed_out and iso.pidns) else None
            _kill_all(pgid=proc.pid, uid=uid, pidns=pidns)
            proc.wait()
            report = _read_report(report_r)
            stdout, stderr = _tail(out), _tail(err)
        status, returncode = _classify(timed_out, report, proc.returncode)
        net = bool(report.get("setup", {}).get("net_isolated", False)) if report else iso.net
        return SandboxResult(status=status, returncode=returncode, stdout=stdout, stderr=stderr,
                             wall_s=wall_s, network_isolated=net), report
    finally:
        if report_w >= 0:
            os.close(report_w)
        os.close(report_r)
        _rmtree(workdir)


def _classify(timed_out: bool, report: dict, rc: int | None) -> tuple[str, int | None]:
    if timed_out:
        return "timeout", None
    if "signal" in report:
        return "killed", -int(report["signal"])
    if "exit" in report:
        code = int(report["exit"])
        return ("passed" if code == 0 else "failed"), code
    # No word from the supervisor (it died): the launcher's own status.
    if rc is None or rc < 0:
        return "killed", rc
    return ("passed" if rc == 0 else "failed"), rc


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * TAIL_CHARS))
    return f.read().decode("utf-8", "replace")[-TAIL_CHARS:]


def _read_report(fd: int) -> dict:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    report: dict = {}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            report.update(json.loads(line))
        except ValueError:
            continue
    return report


def _rmtree(path: str) -> None:
    def unlock(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=unlock)
    shutil.rmtree(path, ignore_errors=True)


def _pid_ns_of_children(pid: int) -> str | None:
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid_for_children")
        return None if ns == os.readlink("/proc/self/ns/pid") else ns
    except OSError:
        return None


def _proc_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _count_processes_of(uid: int) -> int:
    n = 0
    for pid in _proc_pids():
        try:
            n += os.stat(f"/proc/{pid}").st_uid == uid
        except OSError:
            pass
    return n


def _members(pgid: int, uid: int | None, pidns: str | None) -> list[int]:
    """Live (non-zombie) processes of a run: in its process group, with its uid, or in its pid
    namespace."""
    me, found = os.getpid(), []
    for pid in _proc_pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] in (b"Z", b"X"):
                continue
            if (int(fields[2]) == pgid
                    or (uid is not None and os.stat(f"/proc/{pid}").st_uid == uid)
                    or (pidns is not None and os.readlink(f"/proc/{pid}/ns/pid") == pidns)):
                found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def _kill_all(pgid: int, uid: int | None, pidns: str | None, deadline_s: float = 5.0) -> None:
    """SIGKILL every process of the run until none is left (or the deadline passes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    end = time.monotonic() + deadline_s
    while True:
        left = _members(pgid, uid, pidns)
        if not left or time.monotonic() > end:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


# ----------------------------------------------------------------------------- HumanEval

def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval's own harness runs."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def check_completion(problem: dict, completion: str, *, allowed: bool,
                     timeout_s: float = 10.0) -> SandboxResult:
    """Run `completion` against a HumanEval problem (keys prompt, test, entry_point)."""
    require_opt_in(allowed)
    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise ConfigError(f"HumanEval problem lacks {', '.join(missing)} (expected the keys "
                          "prompt, test, entry_point of HumanEval's jsonl)")
    program = humaneval_program(problem["prompt"], completion, problem["test"],
                                problem["entry_point"])
    return run_in_sandbox(program, allowed=allowed, timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), n samples with c correct."""
    import numpy as np

    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
