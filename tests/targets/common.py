"""Helpers shared by the ProcessTracker tests: build and drive the target programs."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def in_emulated_guest() -> bool:
    """Whether the suite runs in a guest of the kernel matrix (5-10x slower under TCG)."""
    return os.environ.get("PAGEWATCH_KERNEL_MATRIX", "host") != "host"


def duration(default: float = 1.5) -> float:
    """How long concurrency tests run (env PAGEWATCH_TEST_SECONDS scales them)."""
    return float(os.environ.get("PAGEWATCH_TEST_SECONDS", default))


def process_backends() -> list[Any]:
    """ProcessTracker's two methods as pytest parameters, ``uffd-async`` then ``soft-dirty``:
    each marked with its backend, and skipped with the reason where this kernel lacks it."""
    import pytest

    from pagewatch import process
    from pagewatch.kernel.probe import probe_wp_async

    wp_ok, wp_why = probe_wp_async()
    sd_ok, sd_why = process.soft_dirty_available()
    return [
        pytest.param("uffd-async", marks=[pytest.mark.backend("uffd-async"), pytest.mark.skipif(
            not wp_ok, reason=f"uffd-async unavailable: {wp_why}")]),
        pytest.param("soft-dirty", marks=[pytest.mark.backend("soft-dirty"), pytest.mark.skipif(
            not sd_ok, reason=f"soft-dirty unavailable: {sd_why}")]),
    ]


@functools.cache
def build(name: str = "pattern") -> Path:
    """Compile ``tests/targets/<name>.c`` once per session into a temporary folder."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the process tests need a C compiler (cc)")
    folder = Path(tempfile.mkdtemp(prefix="pagewatch-targets-"))
    folder.chmod(0o755)  # tests run some targets as another user
    out = folder / name
    subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(HERE / f"{name}.c")],
                   check=True)
    return out


class Target:
    """A running target program driven one command line at a time."""

    def __init__(self, argv: list[str], **kw: object) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, **kw)  # type: ignore[call-overload]
        self.pid = self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        assert self.proc.stdout is not None
        out: str = self.proc.stdout.readline()
        if not out:
            raise EOFError(f"target {self.pid} closed its output (exit code "
                           f"{self.proc.poll()})")
        return out.strip()

    def cmd(self, line: str) -> str:
        self.send(line)
        return self.read()

    def wait_in_syscall(self, *numbers: int, timeout: float = 300.0) -> None:
        """Wait until the target blocks in one of the system calls ``numbers`` (x86-64), so
        that a test of an interrupted call interrupts one, however slow the machine."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/syscall") as f:
                nr = f.read().split()[0]
            if nr.lstrip("-").isdigit() and int(nr) in numbers:
                return
            time.sleep(0.005)
        raise TimeoutError(f"target {self.pid} did not block in syscall(s) {numbers}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


#: x86-64 system call numbers the tests wait for (a sleep cut short by a stop goes on in
#: restart_syscall)
SYS_READ, SYS_NANOSLEEP, SYS_RESTART_SYSCALL, SYS_CLOCK_NANOSLEEP = 0, 35, 219, 230
SLEEPING = (SYS_NANOSLEEP, SYS_RESTART_SYSCALL, SYS_CLOCK_NANOSLEEP)


#: a Python program that PTRACE_SEIZEs the thread argv[1] and holds it: "a debugger"
HOLD_TRACE = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    print("seize failed", ctypes.get_errno(), flush=True)
else:
    print("tracing", flush=True)
time.sleep(30)
"""


def pattern_target() -> Target:
    return Target([str(build("pattern")), "cmd"])


def python_target(code: str) -> Target:
    return Target([sys.executable, "-c", code])


def stop(pid: int, timeout: float = 300.0) -> None:
    """SIGSTOP ``pid`` and wait until every thread is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rpartition(")")[2].split()[0])
            except OSError:
                continue
        if states and all(s in "TtZX" for s in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop")


class Paced:
    """A target whose work comes in parts, each started by one byte on its stdin, so a test
    that needs N intervals of work gets them however slow the machine (never by the clock).

    ``step()`` lets the next part start; ``finish()`` closes stdin: the target does the rest
    at once and ends."""

    def __init__(self, cmd: list[str], **kwargs: object) -> None:
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]

    def step(self) -> None:
        if self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(b"\x01")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # it ended, or finish() came first
            pass

    def finish(self) -> None:
        if self.proc.stdin is None:
            return
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.stdin = None  # so that communicate() does not flush a closed file


#: the pattern target's run mode in this many paced parts (``pattern run ROUNDS STEPS``)
PATTERN_STEPS = 6


def paced_pattern(rounds: int, **kwargs: object) -> Paced:
    """``pattern run ROUNDS`` in PATTERN_STEPS parts: its output depends on ROUNDS only."""
    return Paced([str(build("pattern")), "run", str(rounds), str(PATTERN_STEPS)], **kwargs)


#: a Python workload of three threads churning dicts and lists until its stdin closes; it
#: prints "started" once the threads run and "done" at the end
PYTHON_WORKLOAD = """
import json, random, sys, threading
done = threading.Event()
def work(seed):
    r = random.Random(seed)
    d, lists = {}, []
    while not done.is_set():
        for _ in range(2000):
            d[r.randrange(1 << 20)] = [r.random() for _ in range(4)]
        lists.append(sorted(d)[:5000])
        if len(lists) > 20:
            lists.pop(0)
        json.dumps({str(k): v for k, v in list(d.items())[:500]})
        if len(d) > 200_000:
            d.clear()
threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.buffer.read()
done.set()
for t in threads:
    t.join()
print("done", flush=True)
"""


def python_workload() -> Paced:
    """PYTHON_WORKLOAD started, its threads running (it ends at ``finish()``)."""
    p = Paced([sys.executable, "-c", PYTHON_WORKLOAD], stdout=subprocess.PIPE)
    assert p.proc.stdout is not None and p.proc.stdout.readline() == b"started\n"
    return p
