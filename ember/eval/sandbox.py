"""Run untrusted generated code (HumanEval samples) so that a bad sample fails instead of harming the
machine or hanging the evaluation.

Each program runs in its own Python subprocess:
- in a new empty temporary directory (its cwd and HOME), deleted afterwards, with a minimal environment;
- in its own session, so a timeout kills it and anything it started (the whole process group);
- with a wall-clock timeout, a CPU-time limit and an address-space limit (RLIMIT_AS);
- with a guard installed before the program: leaving early (sys.exit, os._exit: a failure, since the
  tests after that point never ran), process creation (fork, exec, spawn, subprocess,
  multiprocessing, os.system), sockets, ctypes, signals to other processes and file deletion or
  renaming are replaced by a function that prints `denied: <what>` and exits the process with
  status 3 at once, so a program that tries one is scored as a failure even if it catches exceptions;
- with no network namespace either, where the machine allows it (`unshare -n`, probed once).

A sample passes when its process exits with status 0 within the limits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

DENIED_EXIT = 3

_GUARD = r'''
import builtins, os, sys
_exit = os._exit
def _deny(what):
    def f(*a, **k):
        try:
            sys.stderr.write("denied: " + what + "\n"); sys.stderr.flush()
        finally:
            _exit(%(code)d)
    return f
import resource
resource.setrlimit(resource.RLIMIT_AS, (%(mem)d, %(mem)d))
resource.setrlimit(resource.RLIMIT_CPU, (%(cpu)d, %(cpu)d))
resource.setrlimit(resource.RLIMIT_FSIZE, (%(fsize)d, %(fsize)d))
for name in ("fork", "forkpty", "vfork", "system", "popen", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "execl", "execle",
             "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "kill", "killpg", "remove",
             "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
             "chown", "lchown", "fchmod", "fchown", "chroot", "setuid", "setgid", "putenv", "_exit", "abort"):
    if hasattr(os, name):
        setattr(os, name, _deny("os." + name))
import shutil, subprocess, socket
shutil.rmtree = _deny("shutil.rmtree"); shutil.move = _deny("shutil.move")
subprocess.Popen = _deny("subprocess"); subprocess.run = _deny("subprocess"); subprocess.call = _deny("subprocess")
subprocess.check_call = _deny("subprocess"); subprocess.check_output = _deny("subprocess")
socket.socket = _deny("socket"); socket.create_connection = _deny("socket"); socket.socketpair = _deny("socket")
socket.create_server = _deny("socket"); socket.fromfd = _deny("socket")
for mod in ("_socket", "ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "resource", "pty"):
    sys.modules[mod] = None
builtins.exit = builtins.quit = _deny("exit")
del builtins, resource
with open(%(path)r) as _f:
    _src = _f.read()
_g = {"__name__": "__main__"}
try:
    exec(compile(_src, "program.py", "exec"), _g)
except SystemExit:  # sys.exit() before the tests ran is not a pass
    sys.stderr.write("the program exited before its end\n"); sys.stderr.flush()
    _exit(4)
'''


@dataclass
class Outcome:
    passed: bool
    result: str  # "passed", "failed: ...", "timed out", "denied: ..."


@lru_cache(maxsize=1)
def _unshare() -> Optional[list[str]]:
    """`unshare -n` (no network) when this machine lets us create a network namespace."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "-n", "--map-root-user", "true"], capture_output=True, timeout=10)
        if r.returncode == 0:
            return [exe, "-n", "--map-root-user"]
        r = subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10)
        return [exe, "-n"] if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> Outcome:
    """Run one Python program under the guard; passed = exit status 0 in time."""
    tmp = tempfile.mkdtemp(prefix="ember-sandbox-")
    try:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(program)
        guard = _GUARD % {"code": DENIED_EXIT, "mem": memory_mb * 2 ** 20, "cpu": int(timeout) + 1,
                          "fsize": 16 * 2 ** 20, "path": path}
        cmd = [sys.executable, "-I", "-c", guard]
        wrap = _unshare()
        if wrap:
            cmd = wrap + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        p = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(p)
            return Outcome(False, "timed out")
        finally:
            _kill(p)
        text = err.decode("utf-8", "replace").strip()
        if p.returncode == 0:
            return Outcome(True, "passed")
        if p.returncode == DENIED_EXIT and "denied:" in text:
            return Outcome(False, text[text.rindex("denied:"):].splitlines()[0])
        if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return Outcome(False, "timed out")
        last = text.splitlines()[-1] if text else f"exit status {p.returncode}"
        return Outcome(False, "failed: " + last[:200])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass


def run_programs(programs: Sequence[str], timeout: float = 5.0, memory_mb: int = 1024,
                 workers: int = 2) -> list[Outcome]:
    with ThreadPoolExecutor(max(1, workers)) as ex:
        return list(ex.map(lambda prog: run_program(prog, timeout, memory_mb), programs))
