"""The sandbox for model-written code: limits, isolation, clean-up, HumanEval and pass@k."""

from __future__ import annotations

import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from learnforget.errors import ConfigError
from learnforget.eval import sandbox
from learnforget.eval.sandbox import (
    CodeExecutionNotAllowed,
    check_completion,
    humaneval_program,
    pass_at_k,
    run_in_sandbox,
)

ADD_PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "entry_point": "add",
    "test": ("\n\nMETADATA = {}\n\n\ndef check(candidate):\n"
             "    assert candidate(2, 3) == 5\n"
             "    assert candidate(-1, 1) == 0\n"
             "    assert candidate(10, 0) == 10\n"),
}


@pytest.fixture(scope="module")
def info() -> dict:
    return sandbox.isolation_info()


def run(program: str, **kw) -> sandbox.SandboxResult:
    return run_in_sandbox(program, allowed=True, **kw)


def processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and int(name) != os.getpid():
            found.append(int(name))
    return found


# --------------------------------------------------------------------------------- opt-in

def test_opt_in_is_required():
    with pytest.raises(CodeExecutionNotAllowed, match="eval.allow_code_execution=true") as e:
        run_in_sandbox("print(1)", allowed=False)
    assert "model-generated code" in str(e.value)
    assert isinstance(e.value, ConfigError)
    with pytest.raises(CodeExecutionNotAllowed, match="eval.allow_code_execution=true"):
        check_completion(ADD_PROBLEM, "    return a + b\n", allowed=False)
    with pytest.raises(CodeExecutionNotAllowed):
        sandbox.require_opt_in(False)
    sandbox.require_opt_in(True)


def test_bad_limits_are_config_errors():
    with pytest.raises(ConfigError, match="timeout_s"):
        run("pass", timeout_s=0)
    with pytest.raises(ConfigError, match="entry_point"):
        check_completion({"prompt": "", "test": ""}, "", allowed=True)


# --------------------------------------------------------------------------------- basics

def test_runs_in_fresh_private_directory_with_minimal_environment(monkeypatch):
    monkeypatch.setenv("LEARNFORGET_SANDBOX_SECRET", "do-not-leak")
    res = run("import os, sys\n"
              "print(os.getcwd())\n"
              "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
              "assert 'LEARNFORGET_SANDBOX_SECRET' not in os.environ, os.environ\n"
              "assert sys.flags.isolated == 1\n"
              "assert os.listdir('.') == []\n"
              "assert sys.stdin.read() == ''\n"
              "open('inside.txt', 'w').write('kept')\n"
              "assert open('inside.txt').read() == 'kept'\n"
              "import tempfile\n"
              "with tempfile.NamedTemporaryFile(dir=None) as f:\n"
              "    assert f.name.startswith(os.getcwd())\n")
    assert res.passed, res.stderr
    workdir = res.stdout.strip()
    assert workdir and not os.path.exists(workdir)  # deleted afterwards


def test_output_is_the_tail_and_exit_codes_map_to_status():
    res = run("print('x' * 5000 + 'END')")
    assert res.passed and res.returncode == 0
    assert len(res.stdout) == 2000 and res.stdout.endswith("END\n")
    res = run("import sys\nsys.stderr.write('boom')\nsys.exit(3)")
    assert res.status == "failed" and res.returncode == 3 and res.stderr == "boom"
    res = run("raise ValueError('bad value')")
    assert res.status == "failed" and "ValueError: bad value" in res.stderr
    res = run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert res.status == "killed" and res.returncode == -9 and not res.passed


# --------------------------------------------------------------------------------- limits

def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.monotonic()
    res = run("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and res.returncode is None and not res.passed
    assert 1.0 <= res.wall_s < 2.0
    assert elapsed < 3.0


def test_fork_bomb_is_contained_and_cleaned_up(info):
    if not info["process_limit"]:
        pytest.skip("no RLIMIT_NPROC for the sandbox here (running as root without a fresh uid)")
    marker = f"learnforget_forkbomb_{uuid.uuid4().hex}"
    program = f"# {marker}\nimport os\nwhile True:\n    os.fork()\n"
    t0 = time.monotonic()
    res = run(program, timeout_s=3.0, max_processes=16)
    assert time.monotonic() - t0 < 6.0
    assert res.status != "passed"
    assert processes_with(marker) == []


def test_stray_background_process_is_killed():
    marker = f"learnforget_stray_{uuid.uuid4().hex}"
    # The child leaves the process group and outlives the program.
    program = (f"# {marker}\nimport os, time\n"
               "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
               "time.sleep(0.2)\n")
    res = run(program, timeout_s=5.0)
    assert res.passed, res.stderr
    assert processes_with(marker) == []


def test_large_allocation_fails_and_machine_is_fine():
    res = run("x = bytearray(8 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert res.status in ("failed", "killed")
    assert "allocated" not in res.stdout
    if res.status == "failed":
        assert "MemoryError" in res.stderr
    assert run("x = bytearray(16 * 1024**2)\nprint(len(x))").stdout == f"{16 * 1024**2}\n"


def test_file_size_limit():
    res = run("open('big.bin', 'wb').write(b'0' * (3 * 1024 * 1024))", max_file_mb=1)
    assert res.status in ("failed", "killed") and "File too large" in res.stderr


# --------------------------------------------------------------------------------- isolation

def _escape_program(targets: list[Path]) -> str:
    lines = ["import os", "blocked = 0"]
    for t in targets:
        lines += ["try:", f"    open({str(t)!r}, 'w').write('escaped')",
                  "except OSError as e:", "    blocked += 1", "    print('blocked:', e)"]
    lines += ["open('inside.txt', 'w').write('fine')",
              "assert open('inside.txt').read() == 'fine'",
              f"assert blocked == {len(targets)}, blocked"]
    return "\n".join(lines) + "\n"


def test_write_outside_the_working_directory_fails():
    tag = uuid.uuid4().hex
    targets = [Path(f"/tmp/learnforget_sandbox_escape_{tag}"),
               Path(__file__).resolve().parent / f"learnforget_sandbox_escape_{tag}",
               Path("/var/tmp") / f"learnforget_sandbox_escape_{tag}"]
    try:
        res = run(_escape_program(targets))
        assert res.passed, res.stdout + res.stderr
        assert res.stdout.count("blocked:") == len(targets)
        assert not any(t.exists() for t in targets)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_write_outside_fails_below_python_too(info):
    """The read-only view is in the OS: a shell the program starts cannot write either."""
    if not info["readonly_filesystem"]:
        pytest.skip("no private read-only mount view here (the Python-level guard refuses "
                    "starting programs instead)")
    target = Path(f"/tmp/learnforget_sandbox_escape_{uuid.uuid4().hex}")
    try:
        res = run(f"import subprocess\n"
                  f"r = subprocess.run(['/bin/sh', '-c', 'echo x > {target}'])\n"
                  f"assert r.returncode != 0\n"
                  f"r = subprocess.run(['/bin/sh', '-c', 'echo x > inside.txt && cat inside.txt'],"
                  f" capture_output=True, text=True)\n"
                  f"assert r.stdout == 'x\\n', r\n")
        assert res.passed, res.stderr
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_fallback_without_namespaces_still_refuses_outside_writes():
    """Where unshare does not work: the Python-level guard refuses writes outside the cwd."""
    tag = uuid.uuid4().hex
    targets = [Path(f"/tmp/learnforget_sandbox_escape_{tag}"),
               Path(__file__).resolve().parent / f"learnforget_sandbox_escape_{tag}"]
    try:
        res, report = sandbox._run(_escape_program(targets), iso=sandbox._NO_ISOLATION,
                                   timeout_s=10.0, memory_mb=512, max_processes=16,
                                   max_file_mb=16)
        assert res.passed, res.stdout + res.stderr
        assert not any(t.exists() for t in targets)
        assert report["setup"]["fs_readonly"] is False and res.network_isolated is False
        res, _ = sandbox._run("import os\nos.system('true')", iso=sandbox._NO_ISOLATION,
                              timeout_s=10.0, memory_mb=512, max_processes=16, max_file_mb=16)
        assert res.status == "failed" and "PermissionError" in res.stderr
        prog = humaneval_program(ADD_PROBLEM["prompt"], "    return a + b\n",
                                 ADD_PROBLEM["test"], "add")
        res, _ = sandbox._run(prog, iso=sandbox._NO_ISOLATION, timeout_s=10.0, memory_mb=512,
                              max_processes=16, max_file_mb=16)
        assert res.passed, res.stderr
        # A fork bomb: RLIMIT_NPROC under a fresh uid, or (root) no fork at all.
        marker = f"learnforget_forkbomb_{uuid.uuid4().hex}"
        res, report = sandbox._run(f"# {marker}\nimport os\nwhile True:\n    os.fork()\n",
                                   iso=sandbox._NO_ISOLATION, timeout_s=3.0, memory_mb=512,
                                   max_processes=16, max_file_mb=16)
        assert res.status == "failed"
        if os.geteuid() == 0 and not report["setup"]["fresh_uid"]:
            assert "PermissionError: sandbox: os.fork is not allowed" in res.stderr
        assert processes_with(marker) == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_no_network_when_isolated(info):
    if not info["network_isolated"]:
        pytest.skip("no network namespace here (unshare --net does not work): not isolated")
    # The one connect attempt fails at once inside the namespace: no route, nothing is sent.
    res = run("import socket\n"
              "s = socket.socket()\n"
              "try:\n"
              "    s.connect(('8.8.8.8', 53))\n"
              "except OSError as e:\n"
              "    print('refused:', e)\n"
              "else:\n"
              "    raise SystemExit('connected')\n", timeout_s=5.0)
    assert res.passed, res.stdout + res.stderr
    assert res.network_isolated is True and "refused:" in res.stdout
    assert res.wall_s < 3.0


# --------------------------------------------------------------------------------- HumanEval

def test_humaneval_program_layout():
    prog = humaneval_program("P", "C", "T", "f")
    assert prog == "PC\nT\ncheck(f)\n"


def test_humaneval_correct_passes_wrong_fails():
    good = check_completion(ADD_PROBLEM, "    return a + b\n", allowed=True)
    assert good.passed and good.status == "passed", good.stderr
    wrong = check_completion(ADD_PROBLEM, "    return a - b\n", allowed=True)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr
    broken = check_completion(ADD_PROBLEM, "    return a +\n", allowed=True)
    assert broken.status == "failed" and "SyntaxError" in broken.stderr
    slow = check_completion(ADD_PROBLEM, "    while True:\n        pass\n", allowed=True,
                            timeout_s=0.5)
    assert slow.status == "timeout"


def test_check_completion_in_a_thread_pool():
    completions = ["    return a + b\n", "    return a * b\n"] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: check_completion(ADD_PROBLEM, c, allowed=True),
                                completions))
    assert [r.passed for r in results] == [True, False] * 3


# --------------------------------------------------------------------------------- pass@k

def test_pass_at_k_known_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 5, 2) == 1.0
    assert pass_at_k(5, 0, 2) == 0.0
    assert pass_at_k(5, 0, 1) == 0.0


def test_pass_at_k_matches_combinatorial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 7, 10), (200, 13, 100), (50, 49, 2), (7, 0, 7)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="larger than"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 0)


def test_program_has_no_capabilities_and_no_new_privileges():
    res = run("status = dict(line.split(':\\t') for line in open('/proc/self/status')"
              " .read().splitlines() if ':\\t' in line)\n"
              "for key in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb'):\n"
              "    assert int(status[key], 16) == 0, (key, status[key])\n"
              "assert status['NoNewPrivs'].strip() == '1'\n")
    assert res.passed, res.stderr


def test_probe_falls_back_when_unshare_does_not_work(monkeypatch):
    broken = sandbox._Isolation(prefix=("/bin/false",), mount=True, pidns=True, net=True)
    monkeypatch.setattr(sandbox, "_candidates", lambda: [broken])
    monkeypatch.setattr(sandbox, "_probed", None)
    info = sandbox.isolation_info()
    assert info["unshare"] is None and info["network_isolated"] is False
    assert info["readonly_filesystem"] is False
    res = run("print('still runs')")
    assert res.passed and res.stdout == "still runs\n" and res.network_isolated is False


def test_large_program_and_main_guard():
    filler = "# " + "x" * 150 + "\n"
    program = filler * 1000 + "if __name__ == '__main__':\n    print('main ran')\n"
    res = run(program)
    assert res.passed and res.stdout == "main ran\n", res.stderr


def test_nul_byte_program_fails_cleanly():
    from learnforget.eval.sandbox import run_in_sandbox

    res = run_in_sandbox("x = 1\x00\n", allowed=True, timeout_s=5)
    assert res.status == "failed" and "null" in res.stderr.lower()
