"""The sandbox's child side (`python -I -c _CHILD_BOOT PACKAGE_PARENT CONFIG PROGRAM`, behind
unshare): set up the mount view, fork the program's process (limits, fresh uid, guard) and wait
for it as a supervisor (pid 1 of the pid namespace when there is one), reporting on the report
pipe. Imports nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import sys

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC = 32, 4096, 16384
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_MOUNT_OPTION_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                       "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
                       "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    return libc


def _mount(libc, src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    import ctypes

    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    if libc.mount(enc(src), enc(target), enc(fstype), flags,
                  None if data is None else ctypes.c_char_p(data.encode())) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _mount_table() -> dict[str, int]:
    """Mount point -> flags to keep on remount (from /proc/self/mountinfo; topmost wins)."""
    import re

    table: dict[str, int] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
            flags = 0
            for opt in parts[5].split(","):
                flags |= _MOUNT_OPTION_FLAGS.get(opt, 0)
            table[point] = flags
    return table


def _python_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def _blocked_at(path: str) -> str | None:
    """The topmost directory above `path` that other users cannot enter, if any."""
    import stat

    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        d = "/" + "/".join(parts[:i])
        try:
            st = os.stat(d)
        except OSError:
            return d
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return d
    return None


def _readable_by_others(path: str) -> bool:
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    need = (stat.S_IROTH | stat.S_IXOTH) if stat.S_ISDIR(mode) else stat.S_IROTH
    return mode & need == need


def _setup_mounts(cfg: dict, closed: dict[str, list[str]]) -> list[str]:
    """In the private mount namespace: over each directory in `closed` (others cannot enter it)
    a small tmpfs with only the listed paths bound in; the working directory bound on itself;
    then every other mount remounted read-only + nosuid. Returns what failed (empty: all)."""
    libc = _libc()
    workdir = cfg["workdir"]
    binds = sorted({p for paths in closed.values() for p in paths if p != workdir})
    binds = [p for i, p in enumerate(binds)  # a path inside another bound one comes along
             if not any(p.startswith(q + "/") for q in binds[:i])]
    fds = {t: os.open(t, os.O_PATH | os.O_CLOEXEC) for t in [workdir, *binds]}
    try:
        for where in sorted(closed):
            _mount(libc, "tmpfs", where, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=64k")
        for p in binds:
            if os.path.isdir(f"/proc/self/fd/{fds[p]}"):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                open(p, "w").close()
            _mount(libc, f"/proc/self/fd/{fds[p]}", p, None, _MS_BIND | _MS_REC)
        os.makedirs(workdir, mode=0o700, exist_ok=True)  # under a tmpfs: a fresh mount point
        _mount(libc, f"/proc/self/fd/{fds[workdir]}", workdir, None, _MS_BIND)
    finally:
        for fd in fds.values():
            os.close(fd)
    os.chdir(workdir)  # the cwd must be the read-write bind, not the directory below it
    errors: list[str] = []
    table = _mount_table()
    for point, keep in table.items():
        if point == workdir:
            continue
        try:
            _mount(libc, None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | keep)
        except OSError as e:
            errors.append(f"remount {point} read-only: {e}")
    _mount(libc, None, workdir, None,
           _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV | table.get(workdir, 0))
    return errors


def _install_guard(workdir: str, writes: bool, forks: bool) -> None:
    """Python-level fallback (audit hooks cannot be removed). `writes`, without the read-only
    mount view: refuse writes outside `workdir`, starting programs and ctypes. `forks`, for a
    root program (RLIMIT_NPROC does not bind root): refuse os.fork too."""
    root = os.path.realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    one_path = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                "shutil.rmtree", "os.mkfifo", "os.mknod"}
    two_paths = {"os.rename", "os.link", "os.symlink"}
    refused = (("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                "ctypes.") if writes else ()) + (("os.fork", "os.forkpty") if forks else ())

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        p = os.path.realpath(os.fsdecode(path))
        return p == root or p.startswith(root + os.sep) or p == "/dev/null"

    def deny(what) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed here")

    def hook(event: str, args: tuple) -> None:
        if event.startswith(refused):
            deny(event)
        if not writes:
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if path is not None and writing and not inside(path):
                deny(f"writing {path!r}")
        elif event in one_path:
            if args and not inside(args[0]):
                deny(f"{event} on {args[0]!r}")
        elif event in two_paths:
            if not (inside(args[0]) or event == "os.symlink") or not inside(args[1]):
                deny(f"{event} {args[0]!r} -> {args[1]!r}")

    sys.addaudithook(hook)


def _limit(resource, which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _clear_capabilities(ctypes, libc) -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _become_program(cfg: dict, drop: bool, fs_readonly: bool) -> None:
    """In the forked program process: limits, the fresh uid, no capabilities, no_new_privs,
    the guard."""
    import resource

    os.close(cfg["report_fd"])
    _limit(resource, resource.RLIMIT_CORE, 0)
    _limit(resource, resource.RLIMIT_CPU, int(cfg["cpu_s"]))
    _limit(resource, resource.RLIMIT_FSIZE, int(cfg["fsize_bytes"]))
    _limit(resource, resource.RLIMIT_NOFILE, 256)
    _limit(resource, resource.RLIMIT_NPROC, int(cfg["nproc"]))
    _limit(resource, resource.RLIMIT_AS, int(cfg["memory_bytes"]))
    sys.dont_write_bytecode = True
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:  # empty the capability bounding set, and no capabilities for root on exec
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
    except (OSError, ValueError):
        last_cap = 63
    for cap in range(last_cap + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    libc.prctl(28, 0x3, 0, 0, 0)  # PR_SET_SECUREBITS: SECBIT_NOROOT, locked
    if drop:
        uid = int(cfg["uid"])
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _clear_capabilities(ctypes, libc)  # e.g. root of a user namespace: may not remount
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    # root without its own uid or user namespace: RLIMIT_NPROC does not bind it
    unlimited = os.getuid() == 0 and not drop and not cfg["userns"]
    if unlimited or not fs_readonly:
        _install_guard(cfg["workdir"], writes=not fs_readonly, forks=unlimited)


def _run_program(source: str, path: str) -> int:
    """Run `source` as __main__ like the interpreter would; its exit status."""
    import builtins
    import linecache
    import traceback
    import types

    linecache.cache[path] = (len(source), None, source.splitlines(True), path)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [path]
    code = 0
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # the program's own error: print it as Python does
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from its own frame
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = code or 1
    return code


def child_main(argv: list[str]) -> None:
    cfg = json.loads(argv[0])
    source = argv[1]
    path = cfg["program_file"] or os.path.join(cfg["workdir"], "program.py")
    if cfg["program_file"]:
        with open(cfg["program_file"], encoding="utf-8", errors="surrogatepass") as f:
            source = f.read()
    report = os.fdopen(cfg["report_fd"], "w", closefd=False)

    def say(obj: dict) -> None:
        report.write(json.dumps(obj) + "\n")
        report.flush()

    uid, errors = cfg["uid"], []
    closed: dict[str, list[str]] = {}  # directory others cannot enter -> paths under it
    drop = uid is not None
    if drop:
        for p in [cfg["workdir"], *_python_paths()]:
            where = _blocked_at(p)
            if where is not None:
                closed.setdefault(where, []).append(p)
            elif p != cfg["workdir"] and not _readable_by_others(p):
                errors.append(f"{p} is not readable by other users")
        if errors or (closed and not cfg["mount"]):
            drop = False  # the fresh uid could not load Python's own files
            errors.append("runs as the harness's user: Python's files are out of others' reach")
            closed = {}
    fs_readonly = False
    if cfg["mount"]:
        try:
            mount_errors = _setup_mounts(cfg, closed)
            errors += mount_errors
            fs_readonly = not mount_errors
        except OSError as e:
            errors.append(f"mount setup: {e}")
            drop = drop and not closed
    if uid is not None and not drop:
        os.chown(cfg["workdir"], os.getuid(), os.getgid())  # the program runs as us, then
    net_isolated = False
    if cfg["net"]:
        import socket

        try:
            net_isolated = {name for _i, name in socket.if_nameindex()} <= {"lo"}
        except OSError:
            pass
    say({"setup": {"fs_readonly": fs_readonly, "net_isolated": net_isolated,
                   "fresh_uid": drop, "errors": errors}})
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                _become_program(cfg, drop=drop, fs_readonly=fs_readonly)
            except BaseException:
                import traceback

                print("learnforget sandbox: setting up the program's process failed:",
                      file=sys.stderr)
                traceback.print_exc()
                sys.stderr.flush()
                raise
            code = _run_program(source, path)
        finally:
            os._exit(code)
    while True:  # reap everything (pid 1 inherits orphans) until the program itself ends
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if done == pid:
            break
    if os.WIFSIGNALED(status):
        say({"signal": os.WTERMSIG(status)})
        os._exit(128 + os.WTERMSIG(status))
    code = os.waitstatus_to_exitcode(status)
    say({"exit": code})
    os._exit(code)
