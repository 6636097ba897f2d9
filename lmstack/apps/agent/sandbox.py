"""Run untrusted Python in a separate, confined process (the agent's `run_python` tool).

The code never runs in the host process. Each call starts `python -I -X utf8` with an empty
environment in a fresh temporary working directory, and a small bootstrap confines that process
before it compiles the code (the code arrives on stdin, so it is not on any command line):

- resource limits (`setrlimit`): CPU seconds, address space, size of any file written, processes;
- no network: a new user + network namespace (`unshare(CLONE_NEWUSER | CLONE_NEWNET)`), whose only
  interface is a loopback that is down, so every connect fails, 127.0.0.1 included;
- writes only inside the working directory: a Landlock ruleset (Linux >= 5.13) that handles every
  write right and grants them beneath that directory alone (and `/dev/null`); on kernels with
  Landlock ABI >= 6 signals to processes outside the sandbox are refused too; Landlock also
  forbids ptrace of processes outside it, and `no_new_privs` keeps set-uid programs powerless.

The host kills the whole process group after a wall-clock deadline and keeps at most `max_output`
bytes of stdout+stderr. A machine where the namespace or Landlock cannot be created is refused with
an error (`sandbox_check`) rather than running the code with less isolation.

Limits of the design: reads are not confined (the process sees the files its user may read), and
RLIMIT_NPROC does not bind a process running as root (the kernel exempts it); the Landlock domain,
namespaces and the wall-clock kill still apply.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

SANDBOX_FAILED = 97  # exit status of the bootstrap when it could not confine itself

# Runs inside the child before the user's code; argv: cpu seconds, address-space bytes, file-size bytes, processes.
BOOTSTRAP = r"""
import ctypes, linecache, os, resource, struct, sys, traceback
code = sys.stdin.read()
sys.stdin.close()
cpu, memory, fsize, nproc = (int(x) for x in sys.argv[1:5])
libc = ctypes.CDLL(None, use_errno=True)
def fail(what):
    err = ctypes.get_errno()
    sys.stderr.write(f"sandbox: {what} failed: {os.strerror(err) if err else 'not supported'}\n")
    os._exit(97)
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit (SIGKILL at the hard one)
if libc.unshare(0x10000000 | 0x40000000) != 0:  # CLONE_NEWUSER | CLONE_NEWNET
    fail("unshare(CLONE_NEWUSER | CLONE_NEWNET)")
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))  # counted in the new user namespace
abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
if abi < 1:
    fail("Landlock")
write = 0b1111111110010  # WRITE_FILE, REMOVE_DIR/FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM
write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER, TRUNCATE
scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside the sandbox
attr = struct.pack("QQQ", write, 0, scoped) if abi >= 6 else struct.pack("Q", write)
ruleset = libc.syscall(444, attr, len(attr), 0)
if ruleset < 0:
    fail("landlock_create_ruleset")
for path, access in ((".", write), ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0))):
    fd = os.open(path, os.O_PATH)
    if libc.syscall(445, ruleset, 1, struct.pack("=Qi", access, fd), 0) != 0:  # LANDLOCK_RULE_PATH_BENEATH
        fail(f"landlock_add_rule({path})")
    os.close(fd)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("prctl(PR_SET_NO_NEW_PRIVS)")
if libc.syscall(446, ruleset, 0) != 0:  # landlock_restrict_self
    fail("landlock_restrict_self")
os.close(ruleset)
del ctypes, libc, struct, resource, attr
sys.argv = ["<code>"]
linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")  # source lines in tracebacks
try:
    exec(compile(code, "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as exc:
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    sys.exit(1)
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds before the process group is killed
    cpu_seconds: int = 10
    memory_mb: int = 512  # address space
    file_mb: int = 16  # largest file the code may write
    processes: int = 16
    max_output: int = 16_000  # bytes of stdout+stderr kept


@dataclass
class SandboxResult:
    output: str  # stdout and stderr interleaved, cut at max_output bytes
    exit_code: int | None  # None when killed for the wall-clock deadline
    timed_out: bool
    truncated: bool

    def report(self, limits: SandboxLimits) -> str:
        """The result as the model reads it: output, then what ended the run when it was not a clean exit."""
        notes = []
        if self.truncated:
            notes.append(f"[output cut at {limits.max_output} bytes]")
        if self.timed_out:
            notes.append(f"[killed: the code ran longer than {limits.timeout:g} s]")
        elif self.exit_code is not None and self.exit_code < 0:
            name = signal.Signals(-self.exit_code).name
            why = {"SIGXCPU": f"the CPU limit of {limits.cpu_seconds} s", "SIGXFSZ": "the file-size limit"}.get(name)
            notes.append(f"[killed by {name}" + (f": {why}]" if why else "]"))
        elif self.exit_code:
            notes.append(f"[exit status {self.exit_code}]")
        text = "\n".join([self.output.rstrip("\n"), *notes]).strip("\n")
        return text or "[no output]"


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in a confined child process (see the module docstring) and collect its output."""
    limits = limits or SandboxLimits()
    argv = [sys.executable, "-I", "-X", "utf8", "-c", BOOTSTRAP, str(limits.cpu_seconds),
            str(limits.memory_mb * 2**20), str(limits.file_mb * 2**20), str(limits.processes)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmstack-sandbox-") as workdir:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env={},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
        kept = bytearray()
        reader = threading.Thread(target=_read_capped, args=(proc.stdout, kept, limits.max_output), daemon=True)
        reader.start()
        with contextlib.suppress(BrokenPipeError):  # the child died before reading (it says why on stdout)
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # also ends anything the code left running in the background
        proc.wait()
        reader.join(timeout=5)
    output = bytes(kept[: limits.max_output]).decode("utf-8", errors="replace")
    return SandboxResult(output, None if timed_out else proc.returncode, timed_out, len(kept) > limits.max_output)


def _read_capped(stream, kept: bytearray, cap: int) -> None:
    """Keep the first cap+1 bytes (one more tells that output was cut) and drain the rest so the child never blocks."""
    while chunk := stream.read1(65536):
        if len(kept) <= cap:
            kept.extend(chunk[: cap + 1 - len(kept)])
    stream.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pid, signal.SIGKILL)


@functools.cache
def sandbox_check() -> str | None:
    """None when this machine can confine code; otherwise why not (probed once per process)."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces and Landlock; this is {sys.platform}"
    result = run_python("print('ready')", SandboxLimits(timeout=30))
    if result.exit_code == 0 and result.output.strip() == "ready":
        return None
    return result.output.strip() or f"the sandbox probe exited with status {result.exit_code}"
